"""LoadRates: the load-or-recompute choice never picks a load estimated slower than
recomputing, and the rates follow what the worker measures."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.cache import Tier
from workers.loadcost import MIN_PREFILL_SAMPLE, LoadCostConfig, LoadRates

BS, BPB = 16, 192 * 1024  # the Qwen2.5-0.5B shape: 12 KiB of KV per token


def rates(t1=4e9, t2=5e8, prefill=1000.0) -> LoadRates:
    return LoadRates.seeded(LoadCostConfig(seed_prefill_tokens_per_s=prefill, seed_t1_bytes_per_s=t1,
                                             seed_t2_bytes_per_s=t2))


def estimate(r: LoadRates, tiers, n, k) -> float:
    return sum(r.block_load_s(t, BPB) for t in tiers[:k]) + r.prefill_s(k * BS, n)


def test_fast_tiers_are_loaded_and_a_slow_t2_is_recomputed():
    tiers = [Tier.T0] * 4 + [Tier.T1] * 4 + [Tier.T2] * 8
    assert rates().best_reuse(tiers, 16 * BS + 5, BS, BPB) == 16
    # T2 at 1 MB/s: a block takes ~0.2 s, recomputing its 16 tokens 16 ms
    assert rates(t2=1e6).best_reuse(tiers, 16 * BS + 5, BS, BPB) == 8
    # T1 that slow too: only the T0 blocks (free) are reused
    assert rates(t1=1e6, t2=1e6).best_reuse(tiers, 16 * BS + 5, BS, BPB) == 4
    assert rates(t2=1e6).best_reuse([Tier.T2] * 8, 8 * BS + 1, BS, BPB) == 0


def test_the_leading_t0_blocks_are_reused_even_where_a_noisy_rate_says_recomputing_is_faster():
    r = rates()
    r.observe_prefill(120, 250, 0.06)  # 2000 tokens/s around position 250
    r.observe_prefill(24, 300, 0.08)  # a short step that mostly measured per-step overhead: 300 tokens/s
    tiers = [Tier.T0] * 18
    assert r.prefill_s(12 * BS, 312) < r.prefill_s(18 * BS, 312)  # by the estimate, recomputing 6 blocks is faster
    assert r.best_reuse(tiers, 312, BS, BPB) == 18
    assert r.best_reuse(tiers[:12] + [Tier.T2] * 6, 312, BS, BPB) >= 12


@given(
    tiers=st.lists(st.sampled_from(list(Tier)), max_size=40),
    extra=st.integers(1, 300),
    t1=st.floats(1e5, 1e11), t2=st.floats(1e4, 1e10), prefill=st.floats(10, 1e6),
)
def test_the_choice_is_the_fastest_estimate_and_never_slower_than_recomputing(tiers, extra, t1, t2, prefill):
    r = rates(t1, t2, prefill)
    n = len(tiers) * BS + extra
    k = r.best_reuse(tiers, n, BS, BPB)
    best = estimate(r, tiers, n, k)
    assert best <= estimate(r, tiers, n, 0)  # never slower than recomputing everything
    assert all(best <= estimate(r, tiers, n, j) * (1 + 1e-9) for j in range(len(tiers) + 1))


def test_rates_follow_measurements():
    r = rates(prefill=1000.0)
    assert r.prefill_s(0, 1000) == pytest.approx(1.0)  # the seed until measured
    r.observe_prefill(MIN_PREFILL_SAMPLE - 1, 500, 1.0)  # too short to say anything: ignored
    assert not r.prefill_tokens_per_s
    r.observe_prefill(512, 256, 0.1)  # 5120 tokens/s around position 256
    assert r.prefill_s(0, 512) == pytest.approx(0.1)
    assert r.prefill_s(3000, 5000) == pytest.approx(2000 / 5120)  # nearest measured length
    r.observe_prefill(512, 4000, 1.0)
    assert r.prefill_s(3000, 5000) == pytest.approx(2000 / 512)
    r.observe_restore(Tier.T2, 10_000_000, 1.0)  # the first measurement replaces the seed
    assert r.t2_bytes_per_s == pytest.approx(1e7) and Tier.T2 in r.measured
    r.observe_restore(Tier.T2, 20_000_000, 1.0)  # then a moving average
    assert r.t2_bytes_per_s == pytest.approx(0.7 * 1e7 + 0.3 * 2e7)
    snap = r.snapshot()
    r.observe_restore(Tier.T1, 1, 1.0)
    assert snap.t1_bytes_per_s == 4e9 and snap.prefill_tokens_per_s == r.prefill_tokens_per_s


def test_bad_seeds_are_refused():
    with pytest.raises(ValueError, match="seed_t2_bytes_per_s must be positive"):
        LoadCostConfig(seed_t2_bytes_per_s=0)
    with pytest.raises(ValueError, match="rate_smoothing"):
        LoadCostConfig(rate_smoothing=0)
