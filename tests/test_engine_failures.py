"""One failing request never wedges the engine: a temperature too small to divide by samples
greedily, and a sampling or forward failure ends only the requests it hit (finish reason
"error", blocks released) while the others run to the same output as alone."""
import pytest
from enginehelpers import GREEDY, make_engine, prompt

import workers.engine
from workers.engine import Status
from workers.sampling import SamplingParams


def assert_all_t0_free(engine):
    assert not engine.has_work()
    engine.cache.flush()  # write-through copies to T1 pin their T0 source until done
    engine.cache.check_invariants()
    assert engine.cache.stats().t0_in_use == 0


def alone(tokens, params=GREEDY):
    (seq,) = make_engine().generate([tokens], params)
    return seq.output


@pytest.mark.parametrize("temperature", [1e-40, 1e-6])
def test_a_tiny_temperature_samples_greedily(temperature):
    p = prompt(60, 15)
    params = SamplingParams(max_tokens=12, temperature=temperature, top_k=5, seed=3, ignore_eos=True)
    engine = make_engine()
    (seq,) = engine.generate([p], params)
    assert seq.finish_reason == "length" and seq.error is None
    assert seq.output == alone(p)
    assert_all_t0_free(engine)


def test_a_sampling_failure_ends_only_its_request(monkeypatch):
    bad_params = SamplingParams(max_tokens=12, ignore_eos=True)  # told apart by identity below
    calls = 0
    real_sample = workers.engine.sample

    def sample(row, params, generator):
        nonlocal calls
        if params is bad_params:
            calls += 1
            if calls == 4:  # after 3 tokens, in a decode step batched with the good request
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real_sample(row, params, generator)

    monkeypatch.setattr(workers.engine, "sample", sample)
    engine = make_engine()
    good_prompt = prompt(61, 13)
    good = engine.add_request(good_prompt, GREEDY)
    bad = engine.add_request(prompt(62, 9), bad_params)
    while engine.has_work():
        engine.step()
    assert bad.status is Status.FINISHED and bad.finish_reason == "error"
    assert "sampling failed: RuntimeError: probability tensor" in bad.error and len(bad.output) == 3
    assert good.finish_reason == "length" and good.error is None
    monkeypatch.setattr(workers.engine, "sample", real_sample)
    assert good.output == alone(good_prompt)
    assert_all_t0_free(engine)


def test_a_forward_failure_ends_only_its_batch():
    engine = make_engine()
    good_prompt = prompt(63, 21)
    good = engine.add_request(good_prompt, GREEDY)
    for _ in range(3):
        engine.step()
    bad = engine.add_request(prompt(64, 30), GREEDY)  # in a batch with the good one's decodes: each retried alone
    real_forward = engine._forward

    def forward(batch):
        if bad in batch:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_forward(batch)

    engine._forward = forward
    while engine.has_work():
        engine.step()
    assert bad.finish_reason == "error" and bad.output == [] and bad.block_table == []
    assert "forward pass failed: RuntimeError: CUDA error" in bad.error
    assert good.finish_reason == "length" and good.output == alone(good_prompt)
    assert_all_t0_free(engine)


def test_a_failed_decode_batch_ends_its_requests_and_the_engine_goes_on():
    engine = make_engine()
    a = engine.add_request(prompt(67, 11), GREEDY)
    b = engine.add_request(prompt(68, 14), GREEDY)
    engine.step()  # prefill of both
    real_forward = engine._forward

    def forward(batch):
        raise RuntimeError("injected")

    engine._forward = forward
    engine.step()  # their first decode step fails
    assert [a.finish_reason, b.finish_reason] == ["error", "error"] and len(a.output) == len(b.output) == 1
    assert_all_t0_free(engine)
    engine._forward = real_forward
    p = prompt(69, 12)
    (after,) = engine.generate([p], GREEDY)
    assert after.finish_reason == "length" and after.output == alone(p)


def test_a_failed_copy_of_a_cached_prefix_ends_only_its_request(monkeypatch):
    import kvstore.cache

    engine = make_engine(t0=40, t1=64)
    cached = prompt(65, 30)
    engine.generate([cached], GREEDY)
    engine.cache.flush()
    engine.cache.release(engine.cache.allocate(40))  # its blocks now only in T1
    good_prompt = prompt(66, 11)
    good = engine.add_request(good_prompt, GREEDY)
    engine.step()

    def restore(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(kvstore.cache, "restore", restore)
    bad = engine.add_request(cached + prompt(67, 5), GREEDY)
    while engine.has_work():
        engine.step()
    assert bad.finish_reason == "error" and bad.output == [] and bad.block_table == []
    assert "loading the cached prefix into T0 failed: RuntimeError: CUDA error" in bad.error
    assert good.finish_reason == "length" and good.output == alone(good_prompt)
    assert_all_t0_free(engine)
