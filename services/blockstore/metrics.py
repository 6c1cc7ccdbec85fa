"""Counters of one block store server: Prometheus metrics in a private registry (so several
servers can live in one process) and the plain totals the Stats RPC returns."""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class Totals:
    """Since start: calls, blocks and bytes (the fields of StatsResponse)."""

    puts: int = 0
    blocks_stored: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    lookups: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class Metrics:
    """Prometheus metrics (``registry``) plus ``totals``; both are updated together."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.totals = Totals()
        r, p = self.registry, "kvstore_blockstore_"
        self._requests = Counter(p + "requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self._latency = Histogram(p + "request_seconds", "RPC latency by method", ["method"],
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self._bytes_in = Counter(p + "bytes_in", "block bytes received by Put", registry=r)
        self._bytes_out = Counter(p + "bytes_out", "block bytes sent by Get", registry=r)
        self._stored = Counter(p + "blocks_stored", "blocks newly written by Put", registry=r)
        self._hits = Counter(p + "hits", "blocks found by Get", registry=r)
        self._misses = Counter(p + "misses", "blocks not found by Get (corrupt ones included)", registry=r)
        self._corrupt = Counter(p + "corrupt", "corrupt blocks deleted (found by Get or reported by clients)",
                                registry=r)
        self.in_flight = Gauge(p + "in_flight", "RPCs being served, by method", ["method"], registry=r)
        self.redis_up = Gauge(p + "redis_up", "1 while the last Redis health ping succeeded", registry=r)
        self.budget_used = Gauge(p + "budget_bytes_in_use", "block bytes held by calls (memory_budget_bytes caps it)",
                                 registry=r)

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """One finished RPC."""
        self._requests.labels(method, code.name).inc()
        self._latency.labels(method).observe(seconds)

    def put(self, stored: int, nbytes: int) -> None:
        t = self.totals
        t.puts += 1
        t.blocks_stored += stored
        t.bytes_in += nbytes
        self._stored.inc(stored)
        self._bytes_in.inc(nbytes)

    def get(self, hits: int, misses: int, corrupt: int, nbytes: int) -> None:
        t = self.totals
        t.gets += 1
        t.hits += hits
        t.misses += misses
        t.bytes_out += nbytes
        self._hits.inc(hits)
        self._misses.inc(misses)
        self.corrupt(corrupt)

    def lookup(self) -> None:
        self.totals.lookups += 1

    def corrupt(self, n: int) -> None:
        self.totals.corrupt += n
        self._corrupt.inc(n)
