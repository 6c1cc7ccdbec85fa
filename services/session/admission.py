"""Fair admission of generations: no more run at once than the workers can batch, the rest
wait in a bounded queue, and namespaces (tenants) share the slots fairly.

A generation admitted beyond what the workers run at once (the sum of their
``max_num_seqs``) would sit in a worker's queue without producing a token, holding the
caller's stream; so the service admits at most that many (``capacity()``, re-read whenever a
slot may be given) and queues the rest here, up to ``max_queued``. When a slot frees, the
waiting namespace with the fewest running generations goes first (FIFO within a namespace),
and a namespace never runs more than ``per_namespace`` at once. When the queue is full, a
newcomer takes the place of the newest waiter of the namespace holding the most (running +
queued) if that namespace holds at least two more than the newcomer's, so one tenant's burst
cannot lock the others out. A waiter either starts or gets ``AdmissionRejected`` within its
timeout; cancelling it frees its place.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

_RECHECK_S = 0.5  # waiters re-read the capacity this often (workers that joined add slots)


class AdmissionRejected(Exception):
    """No slot for a generation now (the queue is full, or none freed in time): retry later."""


@dataclass(slots=True, eq=False)
class _Waiter:
    namespace: str
    order: int  # arrival order across namespaces (ties between namespaces go to the earliest)
    granted: asyncio.Future  # result None: admitted; exception AdmissionRejected: displaced


class Admission:
    """Slots for generations; one event loop (not thread-safe)."""

    def __init__(self, capacity: Callable[[], int], max_queued: int, per_namespace: int = 0) -> None:
        self._capacity = capacity
        self._max_queued = max_queued
        self._per_namespace = per_namespace  # 0: no limit of its own
        self._running: dict[str, int] = {}
        self._queues: dict[str, deque[_Waiter]] = {}
        self._order = itertools.count()
        self.running = 0
        self.queued = 0

    @contextlib.asynccontextmanager
    async def slot(self, namespace: str, timeout_s: float) -> AsyncIterator[None]:
        """Hold one generation slot for ``namespace`` while the block runs; waits at most
        ``timeout_s`` for it (raises ``AdmissionRejected``)."""
        await self._acquire(namespace, timeout_s)
        try:
            yield
        finally:
            self._release(namespace)

    async def _acquire(self, namespace: str, timeout_s: float) -> None:
        if not self.queued and self._room(namespace):
            self._start(namespace)
            return
        if self.queued >= self._max_queued and not self._displace(namespace):
            raise AdmissionRejected(f"{self.running} generations running and {self.queued} queued "
                                    f"(max_queued_generations={self._max_queued}); retry later")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(namespace, next(self._order), loop.create_future())
        self._queues.setdefault(namespace, deque()).append(waiter)
        self.queued += 1
        deadline = loop.time() + timeout_s
        admitted = False
        try:
            while not waiter.granted.done():
                self._dispatch()
                remaining = deadline - loop.time()
                if waiter.granted.done():
                    break
                if remaining <= 0:
                    raise AdmissionRejected(f"no generation slot freed within {timeout_s:.1f} s ({self.running} "
                                            f"running, {self.queued} queued); retry later")
                await asyncio.wait([waiter.granted], timeout=min(remaining, _RECHECK_S))
            waiter.granted.result()  # AdmissionRejected if another namespace took its place
            admitted = True
        finally:
            if not waiter.granted.done():  # timed out or cancelled while queued: leave the queue
                self._queues[namespace].remove(waiter)
                if not self._queues[namespace]:
                    del self._queues[namespace]
                self.queued -= 1
                waiter.granted.cancel()
            elif not admitted and waiter.granted.exception() is None:
                self._release(namespace)  # granted just as this call was cancelled

    def _room(self, namespace: str) -> bool:
        return self.running < self._capacity() and self._under_limit(namespace)

    def _under_limit(self, namespace: str) -> bool:
        return not self._per_namespace or self._running.get(namespace, 0) < self._per_namespace

    def _start(self, namespace: str) -> None:
        self.running += 1
        self._running[namespace] = self._running.get(namespace, 0) + 1

    def _release(self, namespace: str) -> None:
        self.running -= 1
        if (n := self._running[namespace] - 1) > 0:
            self._running[namespace] = n
        else:
            del self._running[namespace]
        self._dispatch()

    def _dispatch(self) -> None:
        """Give free slots to waiters: the namespace running the fewest goes first."""
        while self.queued and self.running < self._capacity():
            eligible = [(self._running.get(ns, 0), q[0].order, ns) for ns, q in self._queues.items()
                        if self._under_limit(ns)]
            if not eligible:
                return  # every waiting namespace is at its own limit
            namespace = min(eligible)[2]
            waiter = self._pop(namespace, newest=False)
            self._start(namespace)
            waiter.granted.set_result(None)

    def _displace(self, namespace: str) -> bool:
        """Make room in a full queue for ``namespace`` by refusing the newest waiter of the
        namespace that holds the most, if it holds at least two more than ``namespace``."""
        def held(ns: str) -> int:
            return self._running.get(ns, 0) + len(self._queues.get(ns, ()))
        victim = max(self._queues, key=held, default=None)
        if victim is None or held(victim) < held(namespace) + 2:
            return False
        self._pop(victim, newest=True).granted.set_exception(AdmissionRejected(
            f"namespace {victim!r} holds {held(victim) + 1} of the {self.running} running and {self.queued + 1} "
            "queued generations; its newest queued one gave its place to another namespace; retry later"))
        return True

    def _pop(self, namespace: str, newest: bool) -> _Waiter:
        queue = self._queues[namespace]
        waiter = queue.pop() if newest else queue.popleft()
        if not queue:
            del self._queues[namespace]
        self.queued -= 1
        return waiter
