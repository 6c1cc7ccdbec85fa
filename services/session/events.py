"""``KVEventHub``: the workers' block events, fanned out to subscribers (SubscribeKVEvents).

The pool publishes each worker's events as it polls them. The hub keeps what every worker
holds in T0 and T1, so that a new subscriber first gets a snapshot, then the changes. Runs on
the session service's event loop (no locks): a snapshot and the queueing of later events
cannot interleave.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum

from kvstore.cache import BlockEvent, Tier

MAX_BEHIND = 65536  # events a subscriber may have waiting before it is ended


class EventKind(Enum):
    STORED = "stored"
    REMOVED = "removed"
    CLEARED = "cleared"  # every T0/T1 block of the worker is gone


@dataclass(slots=True)
class KVEvent:
    kind: EventKind
    worker_id: str
    block: BlockEvent | None = None  # None for CLEARED


@dataclass(slots=True)
class KVEventBatch:
    events: list[KVEvent]
    snapshot: bool = False
    timestamp: float = field(default_factory=time.time)


class SubscriberBehind(Exception):
    """A subscriber fell more than ``MAX_BEHIND`` events behind."""


class Subscription:
    """One subscriber's queue of batches; iterate with ``await next_batch()``."""

    def __init__(self, hub: KVEventHub, namespace: str | None) -> None:
        self.namespace = namespace  # None: every namespace
        self._hub = hub
        self._queue: asyncio.Queue[KVEventBatch | None] = asyncio.Queue()
        self._pending = 0  # events queued
        self.behind = False

    def _offer(self, batch: KVEventBatch) -> None:
        events = [e for e in batch.events if e.block is None or self.namespace in (None, e.block.namespace)]
        if not events or self.behind:
            return
        if not batch.snapshot:  # the snapshot is as big as the workers' tiers: not a sign of falling behind
            if self._pending + len(events) > MAX_BEHIND:
                self.behind = True
                self._queue.put_nowait(None)
                return
            self._pending += len(events)
        self._queue.put_nowait(KVEventBatch(events, batch.snapshot, batch.timestamp))

    async def next_batch(self) -> KVEventBatch:
        batch = await self._queue.get()
        if batch is None:
            raise SubscriberBehind(f"this subscriber fell more than {MAX_BEHIND} events behind; subscribe again "
                                   "(a snapshot comes first)")
        if not batch.snapshot:
            self._pending -= len(batch.events)
        return batch

    def close(self) -> None:
        self._hub.unsubscribe(self)


class KVEventHub:
    def __init__(self) -> None:
        self._held: dict[str, dict[Tier, dict[bytes, BlockEvent]]] = {}  # worker -> tier -> hash -> its store
        self._subscribers: set[Subscription] = set()

    def publish(self, worker_id: str, events: list[BlockEvent]) -> None:
        """A worker's events, in order."""
        if not events:
            return
        held = self._held.setdefault(worker_id, {Tier.T0: {}, Tier.T1: {}})
        for e in events:
            if e.tier is not Tier.T2:
                if e.stored:
                    held[e.tier][e.block_hash] = e
                else:
                    held[e.tier].pop(e.block_hash, None)
        self._fan_out(KVEventBatch([KVEvent(EventKind.STORED if e.stored else EventKind.REMOVED, worker_id, e)
                                    for e in events]))

    def removed_from_t2(self, events: list[BlockEvent]) -> None:
        """Blocks gone from T2 (the block store's Redis evicted, expired or deleted them): no
        worker's doing, so no worker id."""
        if events:
            self._fan_out(KVEventBatch([KVEvent(EventKind.REMOVED, "", e) for e in events]))

    def cleared(self, worker_id: str) -> None:
        """The worker's T0 and T1 are empty (restarted, lost or drained)."""
        if self._held.pop(worker_id, None) is not None:
            self._fan_out(KVEventBatch([KVEvent(EventKind.CLEARED, worker_id)]))

    def subscribe(self, namespace: str | None) -> Subscription:
        """A subscription whose first batches are the snapshot (one per worker holding blocks)."""
        sub = Subscription(self, namespace)
        for worker_id, tiers in self._held.items():
            sub._offer(KVEventBatch([KVEvent(EventKind.STORED, worker_id, e) for held in tiers.values()
                                     for e in held.values()], snapshot=True))
        self._subscribers.add(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def _fan_out(self, batch: KVEventBatch) -> None:
        for sub in list(self._subscribers):
            sub._offer(batch)
