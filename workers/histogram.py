"""``Histogram``: fixed buckets the engine observes into on its hot path, with no metrics
library: it crosses the Ray boundary inside ``EngineStats`` as a plain dataclass, and the
session service exports it as a Prometheus histogram (``services.session.metrics``)."""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field


@dataclass(slots=True)
class Histogram:
    """Observations counted per bucket: bucket ``i`` holds values in (bounds[i-1], bounds[i]]
    (Prometheus' ``le``), the last one those above every bound."""

    bounds: list[float]  # ascending upper bounds
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative): len(bounds) + 1
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.bounds or any(a >= b for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"histogram bounds must be ascending and not empty, got {self.bounds}")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        elif len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.bounds)} bounds need {len(self.bounds) + 1} counts, got {len(self.counts)}")

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[int]:
        """Observations at or below each bound, then the total (the ``+Inf`` bucket)."""
        out, total = [], 0
        for n in self.counts:
            total += n
            out.append(total)
        return out

    def copy(self) -> Histogram:
        """A snapshot another thread may take while the owner observes: each read is atomic under
        the GIL, so the buckets are consistent and the sum is at most one observation off."""
        return Histogram(self.bounds, list(self.counts), self.sum)
