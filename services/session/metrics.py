"""Prometheus metrics of one session service (a private registry, so several servers can live
in one process, as in the tests), and of its decode workers, read from them at each scrape."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from kvstore.v1 import session_pb2 as pb
from workers.actor import WorkerStats
from workers.histogram import Histogram as WorkerHistogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class SessionMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        p = "kvstore_session_"
        self._requests = Counter(p + "requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self._latency = Histogram(p + "request_seconds", "RPC latency by method (Generate: whole stream)",
                                  ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self._ttft = Histogram(p + "ttft_seconds", "time to first token of Generate", buckets=_LATENCY_BUCKETS,
                               registry=r)
        self._prompt = Counter(p + "prompt_tokens", "prompt tokens of finished turns", registry=r)
        self._cached = Counter(p + "cached_tokens", "prompt tokens reused from a tier", ["tier"], registry=r)
        self._recomputed = Counter(p + "recomputed_tokens", "cached prompt tokens recomputed by the cost model's "
                                   "choice, by the tier that held them", ["tier"], registry=r)
        self._load = Histogram(p + "load_seconds", "time a turn waited for its cached prefix from T1/T2",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self._completion = Counter(p + "completion_tokens", "tokens generated", registry=r)
        self._failovers = Counter(p + "failovers", "workers lost during a turn (it resumed elsewhere)", registry=r)
        self.active = Gauge(p + "active_generations", "Generate streams holding a generation slot", registry=r)
        self.queued = Gauge(p + "queued_generations", "Generate streams waiting for a generation slot", registry=r)
        self.queue_wait = Histogram(p + "queue_wait_seconds", "time a Generate waited for its slot",
                                    buckets=_LATENCY_BUCKETS, registry=r)

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self._requests.labels(method, code.name).inc()
        self._latency.labels(method).observe(seconds)

    def turn(self, usage: pb.Usage) -> None:
        self._ttft.observe(usage.ttft_seconds)
        self._prompt.inc(usage.prompt_tokens)
        self._completion.inc(usage.completion_tokens)
        for tier, n in (("t0", usage.cached_tokens_t0), ("t1", usage.cached_tokens_t1), ("t2", usage.cached_tokens_t2)):
            self._cached.labels(tier).inc(n)
        for tier, n in (("t0", usage.recomputed_tokens_t0), ("t1", usage.recomputed_tokens_t1),
                        ("t2", usage.recomputed_tokens_t2)):
            self._recomputed.labels(tier).inc(n)
        self._load.observe(usage.load_seconds)
        self._failovers.inc(usage.failovers)

    def fill(self, out: pb.ServiceStats) -> None:
        """``GetStats``' turn counters, TTFT percentiles and generation slots."""
        value = self.registry.get_sample_value
        out.turns = int(value("kvstore_session_ttft_seconds_count") or 0)
        out.prompt_tokens = int(value("kvstore_session_prompt_tokens_total") or 0)
        out.cached_tokens.extend(int(value("kvstore_session_cached_tokens_total", {"tier": t}) or 0)
                                 for t in ("t0", "t1", "t2"))
        out.completion_tokens = int(value("kvstore_session_completion_tokens_total") or 0)
        buckets = [(float(b.labels["le"]), b.value) for metric in self._ttft.collect() for b in metric.samples
                   if b.name.endswith("_bucket")]
        out.ttft_p50_seconds, out.ttft_p90_seconds, out.ttft_p99_seconds = (_quantile(buckets, q)
                                                                            for q in (0.5, 0.9, 0.99))
        out.active_generations = int(value("kvstore_session_active_generations") or 0)
        out.queued_generations = int(value("kvstore_session_queued_generations") or 0)


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile of a histogram's cumulative (upper bound, count) buckets, linear within
    the bucket it falls in (as Prometheus' histogram_quantile); past the last bound: that bound."""
    total = buckets[-1][1] if buckets else 0
    if not total:
        return 0.0
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= q * total:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (q * total - below) / (count - below)
        lower, below = upper, count
    return lower


class WorkerCollector:
    """The decode workers' counters, gauges and histograms, from ``read`` (worker id -> its
    stats, or why it did not answer) at each scrape: the workers are Ray actors with no endpoint
    of their own."""

    def __init__(self, read: Callable[[], dict[str, WorkerStats | Exception]]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        return []  # else registering it would collect, asking every worker from the event loop

    def collect(self) -> Iterator[Metric]:
        p = "kvstore_worker_"
        up = GaugeMetricFamily(p + "up", "1 if the worker answered and its engine runs", labels=["worker"])
        seqs = GaugeMetricFamily(p + "sequences", "sequences by state", labels=["worker", "state"])
        blocks = GaugeMetricFamily(p + "blocks", "blocks of T0/T1: capacity, cached (reusable), in use",
                                   labels=["worker", "tier", "state"])
        loaded = CounterMetricFamily(p + "reused_tokens", "prompt tokens reused, by the tier they came from",
                                     labels=["worker", "tier"])
        lookup = CounterMetricFamily(p + "lookup_tokens", "prompt tokens looked up", labels=["worker"])
        evicted = CounterMetricFamily(p + "evicted_blocks", "blocks evicted from T0/T1", labels=["worker", "tier"])
        t2 = CounterMetricFamily(p + "t2_bytes", "encoded bytes written to / read from T2",
                                 labels=["worker", "direction"])
        preempted = CounterMetricFamily(p + "preemptions", "running sequences sent back to waiting (T0 full)",
                                        labels=["worker"])
        generated = CounterMetricFamily(p + "generated_tokens", "tokens sampled", labels=["worker"])
        prefilled = CounterMetricFamily(p + "prefill_tokens", "prompt tokens computed (not reused from a tier)",
                                        labels=["worker"])
        step = HistogramMetricFamily(p + "step_seconds", "wall time of engine steps that ran the model",
                                     labels=["worker"])
        batch = HistogramMetricFamily(p + "batch_size", "sequences in the batch of each such step", labels=["worker"])
        load = HistogramMetricFamily(p + "load_seconds", "time a request waited for its cached prefix to come into "
                                     "T0, by the coldest tier it came from (t1, t2)", labels=["worker", "tier"])
        for w, s in self._read().items():
            up.add_metric([w], float(isinstance(s, WorkerStats) and s.alive))
            if not isinstance(s, WorkerStats):
                continue
            c = s.cache
            for state, n in (("running", s.running), ("waiting", s.waiting), ("loading", s.loading)):
                seqs.add_metric([w, state], n)
            for tier, size, cached, in_use in (("t0", c.t0_blocks, c.t0_cached, c.t0_in_use),
                                               ("t1", c.t1_blocks, c.t1_cached, c.t1_in_use)):
                for state, n in (("capacity", size), ("cached", cached), ("in_use", in_use)):
                    blocks.add_metric([w, tier, state], n)
            for tier, n in zip(("t0", "t1", "t2"), c.loaded_tokens):
                loaded.add_metric([w, tier], n)
            lookup.add_metric([w], c.lookup_tokens)
            evicted.add_metric([w, "t0"], c.evicted_t0)
            evicted.add_metric([w, "t1"], c.evicted_t1)
            t2.add_metric([w, "put"], c.t2_put_bytes)
            t2.add_metric([w, "get"], c.t2_get_bytes)
            e = s.engine
            preempted.add_metric([w], e.preempted)
            generated.add_metric([w], e.generated_tokens)
            prefilled.add_metric([w], e.prefill_tokens)
            _add_histogram(step, [w], e.step_seconds)
            _add_histogram(batch, [w], e.batch_size)
            _add_histogram(load, [w, "t1"], e.t1_load_seconds)
            _add_histogram(load, [w, "t2"], e.t2_load_seconds)
        yield from (up, seqs, blocks, loaded, lookup, evicted, t2, preempted, generated, prefilled, step, batch, load)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], h: WorkerHistogram) -> None:
    les = [floatToGoString(b) for b in h.bounds] + ["+Inf"]
    family.add_metric(labels, list(zip(les, h.cumulative())), h.sum)
