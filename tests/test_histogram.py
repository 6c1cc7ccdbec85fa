"""The engine's fixed-bucket histograms: Prometheus' bucket edges (a value on a bound counts in
that bound's bucket), sum and count, snapshots, and their export by the session service's
worker collector as cumulative Prometheus histograms."""
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kvstore.cache import CacheStats
from services.session.metrics import WorkerCollector
from workers.actor import WorkerStats
from workers.engine import EngineStats
from workers.histogram import Histogram


def test_bucket_edges_sum_and_cumulative_counts():
    h = Histogram([1.0, 2.0, 5.0])
    for v in (0.0, 1.0, 1.0000001, 2.0, 4.9, 5.0, 5.1, 100.0):
        h.observe(v)
    assert h.counts == [2, 2, 2, 2]  # (-inf, 1], (1, 2], (2, 5], (5, inf)
    assert h.cumulative() == [2, 4, 6, 8]
    assert h.sum == pytest.approx(119.0000001)


def test_a_copy_is_a_snapshot():
    h = Histogram([1.0])
    h.observe(0.5)
    snapshot = h.copy()
    h.observe(3.0)
    assert (snapshot.counts, snapshot.sum) == ([1, 0], 0.5) and (h.counts, h.sum) == ([1, 1], 3.5)


@pytest.mark.parametrize("bounds, counts", [([], []), ([2.0, 1.0], []), ([1.0, 1.0], []), ([1.0], [0, 0, 0])])
def test_bad_bounds_or_counts_are_refused(bounds, counts):
    with pytest.raises(ValueError):
        Histogram(bounds, counts)


def test_the_worker_collector_exports_cumulative_buckets_sum_and_count():
    engine = EngineStats(generated_tokens=7, prefill_tokens=30)
    for seconds in (0.002, 0.002, 0.3):
        engine.step_seconds.observe(seconds)
    engine.batch_size.observe(3)
    engine.t2_load_seconds.observe(1.5)
    stats = WorkerStats("w0", True, 1, 0, 0, 0, engine, CacheStats())
    registry = CollectorRegistry()
    registry.register(WorkerCollector(lambda: {"w0": stats, "w1": ConnectionError("gone")}))
    value = registry.get_sample_value
    w0 = {"worker": "w0"}
    assert [value("kvstore_worker_step_seconds_bucket", {**w0, "le": le}) for le in ("0.001", "0.0025", "0.25", "0.5",
                                                                                       "+Inf")] == [0, 2, 2, 3, 3]
    assert value("kvstore_worker_step_seconds_count", w0) == 3
    assert value("kvstore_worker_step_seconds_sum", w0) == pytest.approx(0.304)
    assert value("kvstore_worker_batch_size_bucket", {**w0, "le": "2.0"}) == 0
    assert value("kvstore_worker_batch_size_bucket", {**w0, "le": "4.0"}) == 1
    assert value("kvstore_worker_load_seconds_count", {**w0, "tier": "t2"}) == 1
    assert value("kvstore_worker_load_seconds_count", {**w0, "tier": "t1"}) == 0
    assert value("kvstore_worker_generated_tokens_total", w0) == 7
    assert value("kvstore_worker_prefill_tokens_total", w0) == 30
    assert value("kvstore_worker_up", {"worker": "w1"}) == 0
    assert value("kvstore_worker_step_seconds_count", {"worker": "w1"}) is None  # no stats, no samples
    text = generate_latest(registry).decode()
    assert "# TYPE kvstore_worker_load_seconds histogram" in text
    assert 'kvstore_worker_load_seconds_bucket{le="2.5",tier="t2",worker="w0"} 1.0' in text
