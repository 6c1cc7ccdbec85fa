"""Load or recompute: how much of a cached prefix is worth bringing in, from measured rates.

A worker keeps moving averages of what its prefix loads and prefills cost (``LoadRates``):
bytes/s of restores T1 -> T0 and of fetches T2 -> T1 (network, decode), and prefill tokens/s
by context length. For a request whose leading blocks are cached in some tiers, it picks
how many of them to load so that load + prefill of the rest is estimated fastest; so a load
estimated slower than recomputing is never chosen. The rates are a plain dataclass: a router
holding a worker's snapshot (``EngineStats.rates``) can make the same estimate.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstore.cache import Tier

MIN_PREFILL_SAMPLE = 16  # tokens: shorter prefill steps measure per-step overhead, not throughput


@dataclass(slots=True)
class LoadCostConfig:
    """Seeds of the rates (replaced by the worker's first measurements) and their smoothing."""

    cost_aware: bool = True  # False: always load every cached block
    seed_prefill_tokens_per_s: float = 2000.0
    seed_t1_bytes_per_s: float = 4e9  # T1 -> T0 restore (host memory copy or DMA)
    seed_t2_bytes_per_s: float = 5e8  # T2 -> T1: network, verification and decode (raw KV bytes)
    rate_smoothing: float = 0.3  # weight of a new measurement in the moving averages

    def __post_init__(self) -> None:
        for name in ("seed_prefill_tokens_per_s", "seed_t1_bytes_per_s", "seed_t2_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LoadCostConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.rate_smoothing <= 1:
            raise ValueError(f"LoadCostConfig.rate_smoothing must be in (0, 1], got {self.rate_smoothing}")


def _bucket(position: float) -> int:
    """Context-length bucket: powers of two (1-2, 2-4, ... tokens)."""
    return max(int(position), 1).bit_length()


@dataclass(slots=True)
class LoadRates:
    """Measured rates of one worker (moving averages; seeds until measured)."""

    t1_bytes_per_s: float
    t2_bytes_per_s: float
    prefill_seed: float  # tokens/s where no prefill of a similar length was measured yet
    prefill_tokens_per_s: dict[int, float] = field(default_factory=dict)  # by _bucket(mean position)
    measured: set[Tier] = field(default_factory=set)  # tiers whose rate was measured at least once
    smoothing: float = 0.3

    @classmethod
    def seeded(cls, config: LoadCostConfig) -> LoadRates:
        return cls(config.seed_t1_bytes_per_s, config.seed_t2_bytes_per_s, config.seed_prefill_tokens_per_s,
                   smoothing=config.rate_smoothing)

    # ---- estimates --------------------------------------------------------------------

    def prefill_s(self, start: int, end: int) -> float:
        """Seconds to prefill tokens ``start .. end - 1`` of a sequence."""
        if end <= start:
            return 0.0
        rates = self.prefill_tokens_per_s
        b = _bucket((start + end) / 2)
        rate = rates.get(b) or (rates[min(rates, key=lambda k: abs(k - b))] if rates else self.prefill_seed)
        return (end - start) / rate

    def block_load_s(self, tier: Tier, bytes_per_block: int) -> float:
        """Seconds to bring one block from ``tier`` into T0 (T2 blocks go through T1)."""
        if tier is Tier.T0:
            return 0.0
        s = bytes_per_block / self.t1_bytes_per_s
        return s + bytes_per_block / self.t2_bytes_per_s if tier is Tier.T2 else s

    def best_reuse(self, tiers: Sequence[Tier], num_tokens: int, block_size: int, bytes_per_block: int) -> int:
        """How many of the leading cached blocks (their source ``tiers``) to load, the rest
        of the ``num_tokens`` being prefilled: the fastest estimate, ties to loading."""
        return self.reuse_plan(tiers, num_tokens, block_size, bytes_per_block)[0]

    def reuse_plan(self, tiers: Sequence[Tier], num_tokens: int, block_size: int,
                   bytes_per_block: int) -> tuple[int, float]:
        """``best_reuse``'s block count and its estimated seconds (loads + prefill of the rest).
        The leading T0 blocks are always reused: they cost nothing, and per-length prefill rates
        measured on short steps could otherwise make recomputing them look faster."""
        first = next((i for i, tier in enumerate(tiers) if tier is not Tier.T0), len(tiers))
        best_k, best = first, self.prefill_s(first * block_size, num_tokens)
        load = 0.0
        for i, tier in enumerate(tiers[first:], first):
            load += self.block_load_s(tier, bytes_per_block)
            estimate = load + self.prefill_s((i + 1) * block_size, num_tokens)
            if estimate <= best:
                best_k, best = i + 1, estimate
        return best_k, best

    # ---- measurements -----------------------------------------------------------------

    def _average(self, old: float, new: float, first: bool) -> float:
        return new if first else (1 - self.smoothing) * old + self.smoothing * new

    def observe_prefill(self, tokens: int, mean_position: float, seconds: float) -> None:
        """A step prefilled ``tokens`` prompt tokens (around ``mean_position``) in ``seconds``."""
        if tokens < MIN_PREFILL_SAMPLE or seconds <= 0:
            return
        b = _bucket(mean_position)
        old = self.prefill_tokens_per_s.get(b)
        self.prefill_tokens_per_s[b] = self._average(old or 0.0, tokens / seconds, old is None)

    def observe_restore(self, tier: Tier, nbytes: int, seconds: float) -> None:
        """``nbytes`` of KV came from ``tier`` (T1: into T0; T2: into T1) in ``seconds``."""
        if nbytes <= 0 or seconds <= 0 or tier is Tier.T0:
            return
        first, rate = tier not in self.measured, nbytes / seconds
        if tier is Tier.T1:
            self.t1_bytes_per_s = self._average(self.t1_bytes_per_s, rate, first)
        else:
            self.t2_bytes_per_s = self._average(self.t2_bytes_per_s, rate, first)
        self.measured.add(tier)

    def snapshot(self) -> LoadRates:
        return LoadRates(self.t1_bytes_per_s, self.t2_bytes_per_s, self.prefill_seed,
                         dict(self.prefill_tokens_per_s), set(self.measured), self.smoothing)
