"""Reuse never stalls the engine, and still changes nothing but speed: a prefix loading from
T2 (the real block store) leaves the other sequences decoding; a load broken midway or
aborted falls back or frees its slots; a long prompt is prefilled in chunks between decode
steps; a slow T2 is recomputed instead of loaded; small T0 never deadlocks. Every output
equals the one computed without reuse, without chunks and alone."""
import threading
import time

import pytest
from enginehelpers import BLOCK, GREEDY, assert_same, client, conversation, make_engine, prompt, reference, run
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.cache import CacheConfig, Tier, TieredKVCache
from services.blockstore.server import BlockStoreConfig, BlockStoreThread
from workers.engine import MIN_CHUNK_TOKENS, Engine, EngineConfig, Status
from workers.loadcost import LoadCostConfig
from workers.loader import builtin_model, kv_spec
from workers.sampling import SamplingParams

LONG = SamplingParams(max_tokens=30, ignore_eos=True)


@pytest.fixture(scope="module")
def store(redis_server):
    with BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_server.url)) as server:
        yield server


class ControlledRemote:
    """The real block store client, with its Get streams held back (``gate``), slowed
    (``delay_s`` per block) or broken after ``fail_after`` blocks."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.delay_s = 0.0
        self.fail_after: int | None = None
        self.gets = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_iter(self, namespace, hashes):
        self.gets += 1
        if not self.gate.wait(timeout=20):  # (on the engine's thread, this would stall it)
            raise TimeoutError("the test never opened the gate")
        blocks = self.inner.get_iter(namespace, hashes)
        try:
            for n, item in enumerate(blocks):
                if n == self.fail_after:
                    raise ConnectionError("block store connection lost mid-stream")
                time.sleep(self.delay_s)
                yield item
        finally:
            blocks.close()


def drain(engine, limit=2000):
    for _ in range(limit):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError(f"engine still busy after {limit} steps: a deadlock?")


def history_in_t2(c, seed, n1=45):
    """Turn 2's prompt of a conversation whose turn 1 another worker wrote to T2, and how
    many of its tokens are there (the full blocks of turn 1's computed tokens)."""
    p1, turn2 = conversation(seed=seed, n1=n1, n_user=11)
    first = make_engine(remote=c)
    out1 = run(first, p1).output
    first.cache.close()  # flushes the write-through to T2
    return turn2(out1), (len(p1) + len(out1) - 1) // BLOCK * BLOCK


def test_others_decode_while_a_prefix_loads_and_a_broken_load_is_recomputed(store):
    with client(store) as c:
        late_prompt, _ = history_in_t2(c, seed=40)
        remote = ControlledRemote(c)
        engine = make_engine(remote=remote)
        others = [engine.add_request(prompt(41 + i, 9 + 4 * i), LONG) for i in range(2)]
        engine.step()
        remote.gate.clear()  # the next Get waits: the load is in flight for as long as we like
        remote.fail_after = 5  # and breaks after 5 blocks
        late = engine.add_request(late_prompt, GREEDY)
        before = [len(s.output) for s in others]
        for _ in range(6):
            engine.step()
        assert late.status is Status.LOADING and remote.gets == 1
        assert [len(s.output) - b for s, b in zip(others, before)] == [6, 6]  # one token per step each
        remote.gate.set()
        drain(engine)
        assert late.usage.cached_tokens == [0, 0, 5 * BLOCK] and late.usage.load_s > 0
        assert engine.stats().failed_loads == 1 and engine.cache.stats().t2_errors == 1
        assert_same(late, reference(late_prompt))
        for s in others:
            assert_same(s, reference(s.tokens[:s.prompt_len], LONG))
        engine.cache.flush()
        engine.cache.check_invariants()
        assert engine.cache.stats().t0_in_use == 0


def test_a_complete_load_during_decodes_and_an_aborted_one(store):
    with client(store) as c:
        late_prompt, loaded = history_in_t2(c, seed=42)
        remote = ControlledRemote(c)
        engine = make_engine(remote=remote)
        other = engine.add_request(prompt(43, 13), LONG)
        engine.step()
        remote.gate.clear()
        gone = engine.add_request(late_prompt, GREEDY)
        engine.step()
        assert gone.status is Status.LOADING
        engine.abort(gone)  # its client went away mid-load
        late = engine.add_request(late_prompt, GREEDY)
        engine.step()
        assert late.status is Status.LOADING and gone.finish_reason == "abort"
        remote.gate.set()
        drain(engine)
        assert late.usage.cached_tokens == [0, 0, loaded] and late.usage.computed_prompt_tokens == len(late_prompt) - loaded
        assert (engine.stats().loads, engine.stats().failed_loads) == (1, 0)
        assert_same(late, reference(late_prompt))
        assert_same(other, reference(prompt(43, 13), LONG))
        engine.cache.flush()  # the aborted load released its slots when it ended
        engine.cache.check_invariants()
        assert engine.cache.stats().t0_in_use == 0


def test_load_times_are_recorded_by_the_coldest_tier_the_prefix_came_from(store):
    """A prefix from T2 and one from T1 only: each load's time in the loading state (the
    request's ``load_s``) goes to its tier's histogram."""
    always_load = EngineConfig(load_cost=LoadCostConfig(cost_aware=False))
    with client(store) as c:
        t2_prompt, _ = history_in_t2(c, seed=48)
        engine = make_engine(remote=c, t0=40, t1=64, engine=always_load)
        from_t2 = run(engine, t2_prompt)
        p1, turn2 = conversation(seed=49)
        out1 = run(engine, p1).output
        engine.cache.flush()
        engine.cache.release(engine.cache.allocate(40))  # evict all of T0 (written through to T1)
        from_t1 = run(engine, turn2(out1))
        engine.cache.close()
    assert from_t2.usage.cached_tokens[Tier.T2] > 0
    assert from_t1.usage.cached_tokens[Tier.T1] > 0 and from_t1.usage.cached_tokens[Tier.T2] == 0
    s = engine.stats()
    assert s.loads == 2 and s.t2_load_seconds.cumulative()[-1] == s.t1_load_seconds.cumulative()[-1] == 1
    assert s.t2_load_seconds.sum == from_t2.usage.load_s > 0 and s.t1_load_seconds.sum == from_t1.usage.load_s > 0


def test_chunked_prefill_of_a_prompt_with_a_cached_prefix_between_decode_steps():
    p1, turn2 = conversation(seed=44, n1=37, n_user=30)
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=8, max_prefill_tokens_alone=16, keep_logits=True)
    engine = make_engine(engine=config)
    first = run(engine, p1)  # 37 tokens alone: prefilled in chunks of 16
    assert engine.stats().prefill_chunks == 3
    assert_same(first, reference(p1))
    other = engine.add_request(prompt(45, 6), LONG)
    engine.step()
    seq = engine.add_request(turn2(first.output), GREEDY)
    cached = (len(p1) + len(first.output) - 1) // BLOCK * BLOCK
    steps = 0
    while seq.first_token_at is None:
        n = len(other.output)
        engine.step()
        steps += 1
        assert len(other.output) == n + 1  # the decode never waits for the prompt
    # 7 tokens per step next to the decode; the cached prefix is not recomputed
    assert seq.usage.cached_tokens[Tier.T0] == cached and steps == -(-(seq.prompt_len - cached) // 7)
    drain(engine)
    assert_same(seq, reference(turn2(first.output)))
    assert_same(other, reference(prompt(45, 6), LONG))


def test_a_slow_t2_is_recomputed_instead_of_loaded(store):
    with client(store) as c:
        warmup_prompt, _ = history_in_t2(c, seed=46)
        late_prompt, hit = history_in_t2(c, seed=47)
        remote = ControlledRemote(c)
        remote.delay_s = 0.02  # per block: ~100 KB/s for the tiny model's 2 KiB blocks
        engine = make_engine(remote=remote)
        warm = run(engine, warmup_prompt)  # the seeded rates say load; this load measures T2
        assert warm.usage.cached_tokens[Tier.T2] > 0 and remote.gets == 1
        rates = engine.stats().rates
        assert Tier.T2 in rates.measured and rates.t2_bytes_per_s < 2e5
        seq = run(engine, late_prompt)
        assert seq.usage.cached_tokens == [0, 0, 0] and seq.usage.recomputed_tokens == [0, 0, hit]
        assert remote.gets == 1 and engine.stats().recomputed_tokens == [0, 0, hit]
        assert_same(seq, reference(late_prompt))


@settings(max_examples=12, deadline=None)
@given(
    t0=st.integers(11, 16),
    requests=st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 18), st.integers(0, 6), st.booleans()), min_size=2, max_size=6,
    ),
)
def test_small_t0_never_deadlocks_and_outputs_stay_exact(t0, requests):
    """Requests share prefixes (loads from T1 through the loader thread), arrive over time,
    some are aborted; T0 holds one request at most a few times over."""
    bases = [prompt(50, 12), prompt(51, 8), prompt(52, 16)]
    engine = make_engine(t0=t0, t1=64, engine=EngineConfig(max_num_seqs=3, max_num_batched_tokens=8, keep_logits=True))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    seqs = []
    for base, tail, wait, abort in requests:
        seqs.append((engine.add_request(bases[base] + prompt(53 + tail, tail), params), abort))
        for _ in range(wait):
            engine.step()
        if abort:
            engine.abort(seqs[-1][0])
    drain(engine)
    engine.cache.flush()
    engine.cache.check_invariants()
    assert engine.cache.stats().t0_in_use == 0
    for seq, aborted in seqs:
        if not aborted:
            assert seq.finish_reason == "length"
            assert seq.output == reference(seq.tokens[:seq.prompt_len], params).output


def test_a_decode_share_cuts_long_prompts_chunks_beside_decodes_and_outputs_stay_exact():
    """min_decode_share near 1: once a decode-only step and a chunk beside it are measured, a
    prompt beside decodes advances MIN_CHUNK_TOKENS per step while more than long_prompt_tokens
    are left to prefill (the rest at the token budget); the outputs do not change."""
    config, model, digest = builtin_model("small")
    spec = kv_spec(config, "builtin-small", digest, block_size=BLOCK)

    def engine(share: float, long_prompt: int) -> Engine:
        return Engine(model, TieredKVCache(spec, CacheConfig(t0_blocks=128, t1_blocks=16)),
                      EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, min_decode_share=share,
                                   long_prompt_tokens=long_prompt))

    outputs = []
    for share, long_prompt in ((0.0, 0), (0.99, 0), (0.99, 128)):
        e = engine(share, long_prompt)
        other = e.add_request(prompt(60, 6), LONG)
        while len(other.output) < 3:  # decode-only steps: measured
            e.step()
        seq = e.add_request(prompt(61, 300), GREEDY)
        advanced = []  # (tokens left before the step, tokens it prefilled)
        while seq.first_token_at is None:
            before = seq.num_computed
            e.step()
            advanced.append((len(seq) - before, seq.num_computed - before))
        advanced = [(left, n) for left, n in advanced if n]
        if not share:
            assert {n for _, n in advanced[:-1]} == {63}, advanced
        else:  # the first chunk goes before a chunk was measured
            assert advanced[0][1] == 63 and {n for left, n in advanced[1:-1] if left > long_prompt} == \
                {MIN_CHUNK_TOKENS}, advanced
            assert {n for left, n in advanced[:-1] if left <= long_prompt} == ({63} if long_prompt else set()), advanced
        drain(e)
        outputs.append((seq.output, other.output))
    assert outputs[0] == outputs[1] == outputs[2]
