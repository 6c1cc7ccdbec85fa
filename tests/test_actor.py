"""The DecodeWorker Ray actor on a real local Ray: streamed tokens equal the in-process
engine's, concurrent streams, prefix reuse across requests, cancellation frees blocks."""
import dataclasses
import sys
import time

import pytest
import ray
from enginehelpers import GREEDY, make_engine, prompt, tiny

from kvstore.cache import CacheConfig, Tier
from kvstore.hashing import PrefixHasher
from workers.actor import GenerateEnd, GenerateRequest, WorkerConfig, remote_worker_class
from workers.engine import FinishReason
from workers.loader import kv_spec
from workers.sampling import SamplingParams


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    cfg = WorkerConfig(model="tiny", block_size=4, cache=CacheConfig(t0_blocks=64, t1_blocks=64), threads=1)
    w = remote_worker_class(num_cpus=1).remote("w0", cfg)
    yield w
    ray.get(w.shutdown.remote())
    ray.shutdown()


def stream(w, tokens, sampling=GREEDY):
    out = [ray.get(ref) for ref in w.generate.remote(GenerateRequest(tokens, sampling))]
    assert isinstance(out[-1], GenerateEnd) and all(isinstance(t, int) for t in out[:-1])
    return out[:-1], out[-1]


def test_streams_the_same_tokens_as_the_in_process_engine(worker):
    p = prompt(40, 29)
    (ref,) = make_engine().generate([p], GREEDY)
    tokens, final = stream(worker, p)
    assert tokens == ref.output and final.finish_reason is FinishReason.LENGTH
    assert final.usage.prompt_tokens == len(p) and final.worker_id == "w0"
    tokens2, final2 = stream(worker, p)  # the same prompt again: served from T0
    assert tokens2 == ref.output and final2.usage.cached_tokens[0] == 28
    assert ray.get(worker.prefetch.remote(p)) == 28  # already here: nothing to load
    s = ray.get(worker.stats.remote())
    assert s.loading == 0 and s.engine.prefill_chunks == 1 and s.engine.loaded_tokens[0] == 28
    config, _, digest = tiny()
    expected = PrefixHasher.for_namespace(kv_spec(config, "tiny", digest, 4).fingerprint, "default", 4)
    expected.extend(p)
    batch = ray.get(worker.block_events.remote())  # a first read: a snapshot of what T0/T1 hold
    stored_t0 = {e.block_hash for e in batch.events if e.tier is Tier.T0 and e.stored}
    assert batch.snapshot and set(expected.hashes) <= stored_t0  # the router learns which prefix w0 holds
    assert all(e.stored and e.tier is not Tier.T2 for e in batch.events)
    caught_up = ray.get(worker.block_events.remote(batch.cursor))
    assert (caught_up.incarnation, caught_up.events, caught_up.snapshot) == (batch.incarnation, [], False)
    assert caught_up.rates == ray.get(worker.stats.remote()).engine.rates  # the router's rates come with the poll
    assert ray.get(worker.info.remote()).incarnation == batch.incarnation
    # Each reader (a session-service replica) has its own cursor: one reading does not take events from another.
    stream(worker, prompt(60, 33))
    first = ray.get(worker.block_events.remote(caught_up.cursor))
    second = ray.get(worker.block_events.remote(caught_up.cursor))
    assert first.events == second.events and any(e.stored and e.tier is Tier.T0 for e in first.events)
    assert not first.snapshot and first.cursor == second.cursor != caught_up.cursor
    assert ray.get(worker.block_events.remote(first.cursor)).events == []
    other = dataclasses.replace(first.cursor, incarnation="another")  # a cursor of an earlier incarnation
    assert ray.get(worker.block_events.remote(other)).snapshot


def test_concurrent_streams(worker):
    prompts = [prompt(41 + i, 10 + 7 * i) for i in range(3)]
    refs = make_engine().generate(prompts, GREEDY)
    gens = [worker.generate.remote(GenerateRequest(p, GREEDY)) for p in prompts]
    outs = [[ray.get(r) for r in g] for g in gens]
    assert [o[:-1] for o in outs] == [r.output for r in refs]


def test_bad_request_and_cancellation(worker):
    tokens, final = stream(worker, [], SamplingParams(max_tokens=4))
    assert tokens == [] and final.finish_reason is FinishReason.ERROR and "at least one token" in final.error
    gen = worker.generate.remote(GenerateRequest(prompt(50, 12), SamplingParams(max_tokens=200, ignore_eos=True)))
    first = ray.get(next(gen))
    assert isinstance(first, int)
    ray.cancel(gen)
    assert ray.get(worker.stats.remote()).alive
    deadline = time.monotonic() + 30  # the abort is processed by the engine thread: poll
    while time.monotonic() < deadline:
        s = ray.get(worker.stats.remote())
        if s.aborted == 1 and s.running == 0:
            break
        time.sleep(0.01)
    assert s.aborted == 1 and s.running == 0 and s.cache.t0_in_use == 0


# The functions below run inside the actor (``__ray_call__``), whose process cannot import
# this test module: ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _hold_inbox(self):
    """In the actor: the engine thread stops taking requests until ``_release_inbox``."""
    import threading

    gate = threading.Event()
    drain = type(self)._drain_inbox.__get__(self)

    def held(streams):
        gate.wait()
        drain(streams)

    self._gate, self._drain_inbox = gate, held


def _release_inbox(self):
    del self._drain_inbox  # back to the class's method
    self._gate.set()


def _inbox_size(self):
    return self._inbox.qsize()


def _wait(w, condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_cancelling_before_the_engine_took_the_request_still_aborts_it(worker):
    before = ray.get(worker.stats.remote()).aborted
    ray.get(worker.__ray_call__.remote(_hold_inbox))
    try:
        gen = worker.generate.remote(GenerateRequest(prompt(53, 12), SamplingParams(max_tokens=2000, ignore_eos=True)))
        _wait(worker, lambda: ray.get(worker.__ray_call__.remote(_inbox_size)) == 1)  # the add is queued
        ray.cancel(gen)
        _wait(worker, lambda: ray.get(worker.__ray_call__.remote(_inbox_size)) == 2)  # and the abort after it
    finally:
        ray.get(worker.__ray_call__.remote(_release_inbox))
    _wait(worker, lambda: ray.get(worker.stats.remote()).aborted == before + 1)
    ray.get(worker.flush.remote())  # write-through copies pin their T0 source until done
    s = ray.get(worker.stats.remote())
    assert s.running == s.waiting == 0 and s.cache.t0_in_use == 0


def _fail_prefills_of_length(self, n):
    """In the actor: the forward pass fails for any batch holding a prompt of ``n`` tokens."""
    forward = type(self.engine)._forward.__get__(self.engine)

    def failing(batch):
        if any(seq.prompt_len == n for seq in batch):
            raise RuntimeError("injected forward failure")
        return forward(batch)

    self.engine._forward = failing


def _restore_forward(self):
    del self.engine._forward


def test_a_request_the_engine_fails_ends_with_an_error_record_and_others_go_on(worker):
    good_prompt = prompt(54, 12)
    (ref,) = make_engine().generate([good_prompt], GREEDY)
    ray.get(worker.__ray_call__.remote(_fail_prefills_of_length, 33))
    try:
        good = worker.generate.remote(GenerateRequest(good_prompt, GREEDY))
        first = ray.get(next(good))  # decoding when the bad request arrives
        tokens, final = stream(worker, prompt(55, 33))
        rest = [ray.get(r) for r in good]
    finally:
        ray.get(worker.__ray_call__.remote(_restore_forward))
    assert tokens == [] and final.finish_reason is FinishReason.ERROR
    assert "forward pass failed: RuntimeError: injected forward failure" in final.error
    assert [first] + rest[:-1] == ref.output and rest[-1].finish_reason is FinishReason.LENGTH
    ray.get(worker.flush.remote())  # write-through copies pin their T0 source until done
    s = ray.get(worker.stats.remote())
    assert s.running == s.waiting == 0 and s.cache.t0_in_use == 0
