"""Prefix-aware routing of requests to decode workers.

A session sticks to the worker that served it (its KV is hottest there), unless that worker
already runs as many sequences as it batches (``max_seqs``) while another has room: then the
request goes elsewhere and reuses the prefix from T2. A request without affinity goes to the
worker with room that can reuse the most of its prefix, weighting blocks by where they would
come from (its T0, its T1, or T2 for blocks other workers hold), less a penalty for the
worker's queue; ties rotate. The router learns what each
worker holds from the workers' block events (``DecodeWorker.block_events``). When a worker
dies or restarts, its index is dropped and its sessions lose their affinity: their next turn
goes elsewhere and resumes from T2.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvstore.cache import BlockEvent, Tier


class NoWorkerError(RuntimeError):
    """No live worker to route to."""


@dataclass(slots=True)
class WorkerState:
    worker_id: str
    max_seqs: int  # sequences it runs at once (its engine's max_num_seqs)
    t0: set[bytes] = field(default_factory=set)
    t1: set[bytes] = field(default_factory=set)
    load: int = 0  # requests in flight
    routed: int = 0  # requests sent here so far (spreads ties: sequential requests have no load)


@dataclass(slots=True)
class RouterConfig:
    """What a block of prompt already cached is worth, by where it would come from, in units
    of a block held in T0 (from bench/ttft.py; see docs/architecture.md). Blocks another
    worker holds are (write-through) in T2, so every worker can get them at the T2 price."""

    t0_weight: float = 1.0
    t1_weight: float = 0.9
    t2_weight: float = 0.8  # blocks of the prefix held by some other worker (so in T2)
    load_weight: float = 4.0  # blocks of cached prefix one queued request is worth


class Router:
    """Not thread-safe: owned by one event loop (the session service's)."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self._workers: dict[str, WorkerState] = {}
        self._affinity: dict[str, str] = {}  # session id -> worker id

    @property
    def workers(self) -> list[str]:
        return sorted(self._workers)

    def add_worker(self, worker_id: str, max_seqs: int) -> None:
        self._workers.setdefault(worker_id, WorkerState(worker_id, max_seqs))

    def remove_worker(self, worker_id: str) -> list[str]:
        """Forget a dead or removed worker; returns the sessions that lost their affinity."""
        self._workers.pop(worker_id, None)
        moved = [s for s, w in self._affinity.items() if w == worker_id]
        for s in moved:
            del self._affinity[s]
        return moved

    def forget(self, session_id: str) -> None:
        """Drop a session's affinity (it was closed); unknown ids are ignored."""
        self._affinity.pop(session_id, None)

    def reset_worker(self, worker_id: str) -> None:
        """A worker restarted: its caches are empty, so its index entries are stale."""
        if (state := self._workers.get(worker_id)) is not None:
            self.remove_worker(worker_id)
            self.add_worker(worker_id, state.max_seqs)

    def apply_events(self, worker_id: str, events: Iterable[BlockEvent]) -> None:
        """A worker's cache events, in order."""
        state = self._workers.get(worker_id)
        if state is None:
            return
        for e in events:
            tier_set = state.t0 if e.tier is Tier.T0 else state.t1
            (tier_set.add if e.stored else tier_set.discard)(e.block_hash)

    def prefix_score(self, worker_id: str, block_hashes: Sequence[bytes]) -> float:
        """Weighted length of the prefix this worker can reuse: its contiguous run in T0/T1,
        then the blocks that continue the prefix in some other worker's tiers (fetched from T2)."""
        return self._score(self._workers[worker_id], block_hashes, self._global_prefix(block_hashes))

    def _score(self, state: WorkerState, block_hashes: Sequence[bytes], global_prefix: int) -> float:
        cfg = self.config
        score, local = 0.0, 0
        for h in block_hashes[:global_prefix]:
            if h in state.t0:
                score += cfg.t0_weight
            elif h in state.t1:
                score += cfg.t1_weight
            else:
                break
            local += 1
        return score + (global_prefix - local) * cfg.t2_weight

    def _global_prefix(self, block_hashes: Sequence[bytes]) -> int:
        """Leading blocks held by at least one worker (T0 or T1)."""
        n = 0
        for h in block_hashes:
            if not any(h in s.t0 or h in s.t1 for s in self._workers.values()):
                break
            n += 1
        return n

    def sticky(self, session_id: str | None) -> str | None:
        """The live worker a session sticks to (counted as routed there), or None: then
        ``choose`` decides from the prefix. A full worker yields to one with room."""
        if session_id and (w := self._affinity.get(session_id)) in self._workers:
            state = self._workers[w]
            if not _room(state) and any(_room(s) for s in self._workers.values()):
                return None
            state.routed += 1
            return w
        return None

    def choose(self, block_hashes: Sequence[bytes], session_id: str | None = None) -> str:
        """The worker for a request (and, for a session, its new affinity)."""
        if not self._workers:
            raise NoWorkerError("no decode worker is available")
        if (w := self.sticky(session_id)) is not None:
            return w
        reachable = self._global_prefix(block_hashes)
        best = max(
            [s for s in self._workers.values() if _room(s)] or self._workers.values(),
            key=lambda s: (self._score(s, block_hashes, reachable) - self.config.load_weight * s.load,
                           -s.load, -s.routed, s.worker_id),
        )
        best.routed += 1
        if session_id:
            self._affinity[session_id] = best.worker_id
        return best.worker_id

    def started(self, worker_id: str) -> None:
        if (s := self._workers.get(worker_id)) is not None:
            s.load += 1

    def finished(self, worker_id: str) -> None:
        if (s := self._workers.get(worker_id)) is not None and s.load:
            s.load -= 1


def _room(state: WorkerState) -> bool:
    return state.load < state.max_seqs
