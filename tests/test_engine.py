"""Reuse changes nothing but speed: greedy output and logits of a conversation's next turn are
the same whether its history is recomputed or reused from T0, T1, T2 (this process or
another), with a prefix ending mid-block, a fully cached prompt, batched decode, or a corrupt
T2 block."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from enginehelpers import BLOCK, GREEDY, assert_same, client, conversation, make_engine, prompt, reference, run

from kvstore.cache import Tier
from kvstore.hashing import PrefixHasher
from services.blockstore.server import BlockStoreConfig, BlockStoreThread
from services.blockstore.store import RedisBlockStore
from workers.engine import RequestFailed
from workers.sampling import SamplingParams

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def store(redis_server):
    with BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_server.url)) as server:
        yield server


def test_reuse_from_t0():
    p1, turn2 = conversation()
    engine = make_engine()
    out1 = run(engine, p1).output
    seq = run(engine, turn2(out1))
    assert seq.usage.cached_tokens[Tier.T0] >= (len(p1) + len(out1)) // BLOCK * BLOCK - BLOCK
    assert seq.usage.cached_tokens[Tier.T1] == seq.usage.cached_tokens[Tier.T2] == 0
    assert_same(seq, reference(turn2(out1)))


def test_reuse_from_t1_after_spill():
    p1, turn2 = conversation(seed=2)
    engine = make_engine(t0=40, t1=64)
    out1 = run(engine, p1).output
    engine.cache.release(engine.cache.allocate(40))  # evict all of T0 (already written through to T1)
    seq = run(engine, turn2(out1))
    assert seq.usage.cached_tokens[Tier.T0] == 0 and seq.usage.cached_tokens[Tier.T1] > 0
    assert_same(seq, reference(turn2(out1)))


def test_reuse_from_t2_after_local_tiers_emptied(store):
    p1, turn2 = conversation(seed=3)
    with client(store) as c:
        first = make_engine(remote=c)
        out1 = run(first, p1).output
        first.cache.close()
        engine = make_engine(remote=c)  # empty T0 and T1, like another worker
        seq = run(engine, turn2(out1))
        assert seq.usage.cached_tokens[Tier.T2] >= (len(p1) + len(out1)) // BLOCK * BLOCK - BLOCK
        assert seq.usage.cached_tokens[Tier.T0] == seq.usage.cached_tokens[Tier.T1] == 0
        assert_same(seq, reference(turn2(out1)))


def test_reuse_from_t2_written_by_another_process(store):
    p1, turn2 = conversation(seed=4, n1=45)
    r = subprocess.run([sys.executable, str(HERE / "engine_worker.py"), store.address, "4", "45"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out1 = json.loads(r.stdout)
    assert out1 == reference(p1).output  # the other process decoded the same turn 1
    with client(store) as c:
        seq = run(make_engine(remote=c), turn2(out1))
        assert seq.usage.cached_tokens[Tier.T2] > 0
        assert_same(seq, reference(turn2(out1)))


def test_prefix_ending_mid_block():
    base = prompt(5, 30)  # 7.5 blocks
    engine = make_engine()
    run(engine, base)
    other = base[:26] + prompt(6, 9)  # diverges inside block 6 (tokens 24..27)
    seq = run(engine, other)
    assert seq.usage.cached_tokens[Tier.T0] == 24  # the full blocks before the divergence
    assert_same(seq, reference(other))


def test_fully_cached_prompt_recomputes_only_the_last_token():
    p = prompt(7, 4 * BLOCK + 1)
    engine = make_engine()
    first = run(engine, p)
    again = run(engine, p)
    assert again.usage.cached_tokens[Tier.T0] == 4 * BLOCK and again.usage.computed_prompt_tokens == 1
    assert_same(again, first)
    exact = prompt(8, 4 * BLOCK)  # a multiple of the block size: its last block is recomputed
    run(engine, exact)
    seq = run(engine, exact)
    assert seq.usage.computed_prompt_tokens == BLOCK
    assert_same(seq, reference(exact))


def test_batched_decode_of_different_lengths_equals_alone():
    prompts = [prompt(10, 9), prompt(11, 23), prompt(12, 40)]
    engine = make_engine()
    together = engine.generate(prompts, GREEDY)
    for seq, p in zip(together, prompts):
        assert_same(seq, reference(p))


def test_corrupt_t2_block_is_recomputed_with_identical_output(store, redis_server):
    p1, turn2 = conversation(seed=9)
    with client(store) as c:
        first = make_engine(remote=c)
        out1 = run(first, p1).output
        first.cache.close()
        r = redis_server.client()
        history = p1 + out1  # its last token was sampled, never computed: its block is not stored
        hashes = PrefixHasher.for_namespace(first.cache.spec.fingerprint, "default", BLOCK, history[:-1]).hashes
        keys = [RedisBlockStore.key_prefix("default") + h.hex().encode() for h in hashes]
        assert len(keys) >= 9 and r.exists(*keys) == len(keys)  # this conversation's blocks, all in T2
        for key in keys[5], keys[8]:  # damage a payload byte of two of them
            value = bytearray(r.get(key))
            value[-3] ^= 0xFF
            r.set(key, bytes(value))
        engine = make_engine(remote=c)
        seq = run(engine, turn2(out1))
        # The first damaged block ends the reused prefix, so the second is never read.
        assert engine.cache.stats().t2_corrupt == 1
        assert seq.usage.cached_tokens[Tier.T2] == 5 * BLOCK
        assert_same(seq, reference(turn2(out1)))


def test_sampling_with_seed_is_reproducible_and_reuse_keeps_it():
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    p = prompt(13, 21)
    engine = make_engine()
    a = run(engine, p, params)
    b = run(engine, p, params)  # second time from T0
    assert a.output == b.output == reference(p, params).output


def test_stop_tokens_and_max_tokens():
    p = prompt(14, 10)
    ref = reference(p)
    stop_at = ref.output[3]
    seq = run(make_engine(), p, SamplingParams(max_tokens=12, stop_token_ids=(stop_at,), ignore_eos=True))
    assert seq.output == ref.output[: ref.output.index(stop_at) + 1] and seq.finish_reason == "stop"
    seq = run(make_engine(), p, SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(seq.output) == 5 and seq.finish_reason == "length"


def test_preemption_when_t0_is_full_keeps_outputs_exact():
    prompts = [prompt(20 + i, 14) for i in range(4)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    engine = make_engine(t0=20, t1=64)  # 4 sequences of up to 30 tokens need 32 blocks
    seqs = engine.generate(prompts, params)
    assert engine.preempted > 0
    for seq, p in zip(seqs, prompts):
        assert seq.output == reference(p, params).output
    engine.cache.check_invariants()
    assert engine.cache.stats().t0_in_use == 0


def test_steps_that_ran_the_model_count_their_time_batch_and_tokens():
    """Three prompts: one step prefills them together, four decode them; an idle step is not
    counted; a next turn adds only the prompt tokens it computed."""
    prompts = [prompt(90 + i, 10) for i in range(3)]
    engine = make_engine()
    seqs = [engine.add_request(p, SamplingParams(max_tokens=5, ignore_eos=True)) for p in prompts]
    steps, start = 0, time.perf_counter()
    while engine.has_work():
        engine.step()
        steps += 1
    took = time.perf_counter() - start
    assert engine.step() == []
    s = engine.stats()
    assert steps == 5 and s.step_seconds.cumulative()[-1] == 5 and 0 < s.step_seconds.sum <= took
    assert s.batch_size.counts[s.batch_size.bounds.index(4)] == 5 and s.batch_size.sum == 15  # 3 sequences each
    assert s.generated_tokens == sum(len(seq.output) for seq in seqs) == 15 and s.prefill_tokens == 30
    again = run(engine, prompts[0] + seqs[0].output)  # its history from T0: no load
    s = engine.stats()
    assert again.usage.cached_tokens[Tier.T0] == 12 and s.prefill_tokens == 30 + again.usage.computed_prompt_tokens
    assert s.generated_tokens == 15 + GREEDY.max_tokens and s.step_seconds.cumulative()[-1] == 5 + GREEDY.max_tokens
    assert s.t1_load_seconds.cumulative()[-1] == s.t2_load_seconds.cumulative()[-1] == 0


def test_max_num_seqs_bounds_the_running_batch():
    prompts = [prompt(24 + i, 6 + 5 * i) for i in range(3)]
    engine = make_engine()
    engine.config.max_num_seqs = 2
    seqs = [engine.add_request(p, GREEDY) for p in prompts]
    engine.step()
    assert engine.running == seqs[:2] and list(engine.waiting) == seqs[2:]
    while engine.has_work():
        engine.step()
        assert len(engine.running) <= 2
    for seq, p in zip(seqs, prompts):
        assert seq.output == reference(p).output


def test_prompt_that_cannot_fit_fails_alone():
    engine = make_engine(t0=4, t1=8)
    seq = engine.add_request(prompt(30, 40), GREEDY)
    ok = engine.add_request(prompt(31, 5), GREEDY)
    while engine.has_work():
        engine.step()
    assert seq.finish_reason == "error" and "does not fit" in seq.error
    assert ok.finish_reason == "length" and len(ok.output) == GREEDY.max_tokens


def test_stop_strings_end_generation_on_the_decoded_text():
    def decode(ids):  # a toy detokenizer: one letter per token
        return "".join(chr(ord("a") + i % 26) for i in ids)

    p = prompt(15, 12)
    ref = reference(p, SamplingParams(max_tokens=20, ignore_eos=True))
    text = decode(ref.output)
    stop = text[5:7]  # a string the greedy output is known to produce
    first = text.index(stop)
    engine = make_engine()
    engine.detokenize = decode
    seq = run(engine, p, SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True))
    assert seq.finish_reason == "stop" and seq.output == ref.output[: first + 2]
    with pytest.raises(ValueError, match="detokenizer"):
        make_engine().add_request(p, SamplingParams(stop=("x",)))


def test_a_stop_string_split_across_several_tokens_stops_where_the_full_text_would():
    def decode(ids):  # a toy detokenizer: 0 to 3 letters per token (some tokens print nothing)
        return "".join(chr(ord("a") + i % 26) * (i % 4) for i in ids)

    p = prompt(16, 12)
    ref = reference(p, SamplingParams(max_tokens=40, ignore_eos=True))
    text = decode(ref.output)
    stop = text[len(text) // 3:len(text) // 3 + 7]
    # Where decoding the whole output after every token first shows the stop string:
    end = next(k for k in range(1, len(ref.output) + 1) if stop in decode(ref.output[:k]))
    at = text.index(stop)
    start = next(k for k in range(end) if len(decode(ref.output[:k + 1])) > at)  # its first token
    assert end - start >= 3  # it spans several tokens
    engine = make_engine()
    engine.detokenize = decode
    seq = run(engine, p, SamplingParams(max_tokens=40, stop=("not in the text", stop), ignore_eos=True))
    assert seq.finish_reason == "stop" and seq.output == ref.output[:end]


def test_bad_prompts_are_refused_with_a_message_and_skip_cache_recomputes():
    engine = make_engine()
    with pytest.raises(ValueError, match="token id 512 is outside the model's vocabulary"):
        engine.add_request([1, 512, 3], GREEDY)
    with pytest.raises(ValueError, match="token id -1"):
        engine.add_request([-1], GREEDY)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.add_request([1] * 4090, GREEDY)
    assert not engine.has_work()
    p = prompt(77, 30)
    (first,) = engine.generate([p], GREEDY)
    (again,) = engine.generate([p], GREEDY)
    engine_seq = engine.add_request(p, GREEDY, skip_cache=True)
    while engine.has_work():
        engine.step()
    assert again.usage.cached_tokens[0] == 28 and engine_seq.usage.cached_tokens == [0, 0, 0]
    assert first.output == again.output == engine_seq.output


def test_stream_yields_the_generated_tokens_and_closing_it_aborts():
    p = prompt(78, 19)
    params = SamplingParams(max_tokens=12, temperature=0.7, seed=1, ignore_eos=True)  # the README's use
    engine = make_engine()
    assert list(engine.stream(p, params, namespace="tenant-a")) == reference(p, params).output
    tokens = engine.stream(prompt(79, 9), GREEDY)
    first = [next(tokens), next(tokens)]
    tokens.close()  # the caller stopped reading
    assert first == reference(prompt(79, 9)).output[:2]
    assert not engine.has_work()
    engine.cache.flush()  # write-through copies to T1 pin their T0 source until done
    assert engine.cache.stats().t0_in_use == 0
    small = make_engine(t0=4, t1=8)
    with pytest.raises(RequestFailed, match="does not fit in T0"):
        list(small.stream(prompt(80, 40), GREEDY))
