"""Prefix-aware routing of requests to decode workers, by estimated time to first token.

Per worker, the router estimates a request's TTFT the way the worker's engine chooses what
to load (``LoadRates.reuse_plan``, from the rates each worker measures and reports with its
block events): loading the leading blocks it holds in T0/T1, and those another worker holds
(so they are in T2, written through) at its T2 rate, or recomputing them at its prefill
rate, whichever is faster; plus a queue: the estimated prefill work of the requests sent
there that have not streamed their first token yet, and ``decode_cost_tokens`` of prefill per
sequence it is decoding. The request goes to the worker with room
(fewer sequences than it batches, ``max_seqs``) with the smallest estimate; ties go to the
less loaded, then the less used worker.

A session sticks to the worker that served its last turn (its KV is hottest there), named by
its ``Affinity`` (kept in the session's record, so every session-service replica routes it
alike), while that worker has room and its estimate is not clearly worse than the best
(``affinity_tolerance``, ``affinity_slack_s``); a worker with room and nothing queued keeps it
without hashing its history. When a worker dies or restarts (a new incarnation), its index
is dropped and affinities naming it no longer count: the next turn goes where the estimate
says and resumes from T2.

A worker's load is the larger of the requests this router sent it and what it reports (every
replica's): several replicas share workers without overfilling them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kvstore.cache import BlockEvent, Tier
from workers.loadcost import LoadCostConfig, LoadRates


class NoWorkerError(RuntimeError):
    """No live worker to route to."""


@dataclass(frozen=True, slots=True)
class Affinity:
    """The worker that ran a session's last turn, from the session's record."""

    worker_id: str
    incarnation: str  # the worker's then: a restarted worker (empty caches) has another
    num_tokens: int  # the session's length after that turn: the tokens since are the next turn's work

    def encode(self) -> str:
        return f"{self.worker_id}/{self.incarnation}/{self.num_tokens}"

    @classmethod
    def decode(cls, text: str) -> Affinity | None:
        """None for an empty or malformed field (then the router decides by prefix alone)."""
        worker_id, _, rest = text.partition("/")
        incarnation, _, n = rest.partition("/")
        return cls(worker_id, incarnation, int(n)) if worker_id and incarnation and n.isdigit() else None


@dataclass(slots=True)
class WorkerState:
    worker_id: str
    max_seqs: int  # sequences it runs at once (its engine's max_num_seqs)
    rates: LoadRates  # its latest measured rates (seeds until its first poll)
    incarnation: str = ""
    t0: set[bytes] = field(default_factory=set)
    t1: set[bytes] = field(default_factory=set)
    load: int = 0  # requests in flight from this router
    reported_load: int = 0  # sequences in its engine at its last poll (from every replica)
    prefilling: int = 0  # requests sent here still before their first token
    queued_s: float = 0.0  # their estimated prefill seconds
    routed: int = 0  # requests sent here so far (spreads ties: sequential requests have no load)


@dataclass(slots=True)
class RouterConfig:
    # A session leaves its worker only when that one's estimated TTFT exceeds the best
    # worker's by this factor plus this many seconds.
    affinity_tolerance: float = 1.5
    affinity_slack_s: float = 0.02
    # A running sequence delays a new request's first token like prefilling this many tokens
    # (its token in each step the new request waits for or shares).
    decode_cost_tokens: float = 8.0
    load_cost: LoadCostConfig = field(default_factory=LoadCostConfig)  # rates until a worker reports its own


@dataclass(slots=True)
class Route:
    """Where a request goes, and its estimated prefill work there (seconds of loads and
    recompute, queue excluded), which counts as that worker's queue until its first token."""

    worker_id: str
    work_s: float
    prefilled: bool = False  # its first token came (set by ``Router.prefilled``)


class Router:
    """Not thread-safe: owned by one event loop (the session service's)."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self.block_size = 16  # the model's (``WorkerInfo``), set by the pool once it knows it
        self.bytes_per_block = 0
        self._workers: dict[str, WorkerState] = {}

    @property
    def workers(self) -> list[str]:
        return sorted(self._workers)

    def add_worker(self, worker_id: str, max_seqs: int, incarnation: str = "") -> None:
        """A worker joined, or came back with a new ``incarnation`` (its caches are empty)."""
        state = self._workers.get(worker_id)
        if state is None or state.incarnation != incarnation:
            self._workers[worker_id] = WorkerState(worker_id, max_seqs, LoadRates.seeded(self.config.load_cost),
                                                   incarnation)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a dead or removed worker (affinities naming it no longer count)."""
        self._workers.pop(worker_id, None)

    def apply_events(self, worker_id: str, events: Iterable[BlockEvent], rates: LoadRates | None = None,
                     snapshot: bool = False, load: int | None = None) -> None:
        """A worker's cache events, in order (``snapshot``: every block it holds, replacing
        what was known), its current rates and the sequences in its engine."""
        state = self._workers.get(worker_id)
        if state is None:
            return
        if snapshot:
            state.t0.clear()
            state.t1.clear()
        if load is not None:
            state.reported_load = load
        if rates is not None:
            # Not measured yet (a new or restarted worker): as fast as a measured peer, not the seeds.
            peers = [s.rates for s in self._workers.values() if s.rates.prefill_tokens_per_s]
            state.rates = rates if rates.prefill_tokens_per_s or not peers else peers[0]
        for e in events:
            if e.tier is Tier.T2:  # shared by every worker: it does not tell them apart
                continue
            tier_set = state.t0 if e.tier is Tier.T0 else state.t1
            (tier_set.add if e.stored else tier_set.discard)(e.block_hash)

    def estimate(self, worker_id: str, block_hashes: Sequence[bytes], num_tokens: int) -> Route:
        """The prefill work of a request of ``num_tokens`` (full blocks ``block_hashes``) on this worker."""
        return Route(worker_id, self._work_s(self._workers[worker_id], block_hashes, num_tokens,
                                             self._global_prefix(block_hashes)))

    def _work_s(self, state: WorkerState, block_hashes: Sequence[bytes], num_tokens: int, reachable: int) -> float:
        tiers = [Tier.T0 if h in state.t0 else Tier.T1 if h in state.t1 else Tier.T2 for h in block_hashes[:reachable]]
        return state.rates.reuse_plan(tiers, num_tokens, self.block_size, self.bytes_per_block)[1]

    def _queue_s(self, state: WorkerState, num_tokens: int) -> float:
        """What delays a new request's first token there: the prefill work queued before it,
        and its share of the steps that decode the worker's running sequences."""
        decoding = _load(state) - state.prefilling
        per_token = state.rates.prefill_s(0, num_tokens) / max(1, num_tokens)
        return state.queued_s + decoding * self.config.decode_cost_tokens * per_token

    def _global_prefix(self, block_hashes: Sequence[bytes]) -> int:
        """Leading blocks held by at least one worker (T0 or T1)."""
        n = 0
        for h in block_hashes:
            if not any(h in s.t0 or h in s.t1 for s in self._workers.values()):
                break
            n += 1
        return n

    def _affine(self, affinity: Affinity | None) -> WorkerState | None:
        """The live worker an affinity names, if it is the same incarnation."""
        state = self._workers.get(affinity.worker_id) if affinity is not None else None
        return state if state is not None and state.incarnation == affinity.incarnation else None

    def sticky(self, affinity: Affinity | None, num_tokens: int) -> Route | None:
        """The session's worker when it has room and no request before its first token (counted as routed there;
        the session's new tokens are its work), or None: then ``choose`` decides."""
        state = self._affine(affinity)
        if state is None or not _room(state) or state.prefilling:
            return None
        state.routed += 1
        return Route(state.worker_id, state.rates.prefill_s(min(affinity.num_tokens, num_tokens), num_tokens))

    def choose(self, block_hashes: Sequence[bytes], num_tokens: int, affinity: Affinity | None = None) -> Route:
        """The worker for a request: the one with room and the smallest estimated TTFT, or the
        session's (``affinity``) if that is not clearly worse."""
        if not self._workers:
            raise NoWorkerError("no decode worker is available")
        reachable = self._global_prefix(block_hashes)
        # A reported load is up to a poll old: when it shows every worker full, this router's own
        # counts (exact for what it sent; admission keeps those within capacity) decide.
        candidates = [s for s in self._workers.values() if _room(s)] or \
            [s for s in self._workers.values() if s.load < s.max_seqs] or list(self._workers.values())
        routes = {s.worker_id: Route(s.worker_id, self._work_s(s, block_hashes, num_tokens, reachable))
                  for s in candidates}
        ttft = {w: self._queue_s(self._workers[w], num_tokens) + r.work_s for w, r in routes.items()}
        best = min(candidates, key=lambda s: (ttft[s.worker_id], _load(s), s.routed, s.worker_id))
        cfg = self.config
        if (a := self._affine(affinity)) is not None and a.worker_id in routes \
                and ttft[a.worker_id] <= cfg.affinity_tolerance * ttft[best.worker_id] + cfg.affinity_slack_s:
            best = a
        best.routed += 1
        return routes[best.worker_id]

    def route(self, num_tokens: int, block_hashes: Callable[[], Sequence[bytes]],
              affinity: Affinity | None = None) -> Route:
        """``sticky`` if it decides, else ``choose`` (``block_hashes`` is only called then)."""
        return self.sticky(affinity, num_tokens) or self.choose(block_hashes(), num_tokens, affinity)

    def started(self, route: Route) -> None:
        if (s := self._workers.get(route.worker_id)) is not None:
            s.load += 1
            s.prefilling += 1
            s.queued_s += route.work_s

    def prefilled(self, route: Route) -> None:
        """Its first token came: its prefill no longer delays the worker's next requests."""
        if not route.prefilled and (s := self._workers.get(route.worker_id)) is not None and s.prefilling:
            s.prefilling -= 1
            s.queued_s = max(0.0, s.queued_s - route.work_s) if s.prefilling else 0.0
        route.prefilled = True

    def finished(self, route: Route) -> None:
        self.prefilled(route)
        if (s := self._workers.get(route.worker_id)) is not None and s.load:
            s.load -= 1


def _load(state: WorkerState) -> int:
    return max(state.load, state.reported_load)


def _room(state: WorkerState) -> bool:
    return _load(state) < state.max_seqs
