"""Memory budgets of the block store: bytes of block data a call, and the whole process, may
hold at once (Get: from the Redis reply until its message has left; Put: while written).

A call takes bytes from its ``CallBudget`` (twice each: see ``COPIES``), which takes them
from the process's ``MemoryBudget``; waiting for the process budget is first come, first served and ends at the
call's deadline with RESOURCE_EXHAUSTED. Everything runs on the server's event loop.
"""
from __future__ import annotations

import asyncio
import collections
import time

import grpc

from services.common.errors import RequestError

_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
COPIES = 2  # copies of a call's block data in memory at once (see CallBudget)


class MemoryBudget:
    """Bytes that all calls of one server may hold together (``memory_budget_bytes``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes if they are free now and nobody waits before us."""
        if self._waiters or self.used + n > self.limit:
            return False
        self.used += n
        return True

    async def take(self, n: int, deadline: float) -> None:
        """Take ``n`` bytes, waiting in line until ``deadline`` (``time.monotonic``) at most."""
        if self.try_take(n):
            return
        waiter = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait((waiter[1],), timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:  # cancelled
            if waiter[1].done():
                self.release(n)  # granted meanwhile
            else:
                self._leave(waiter)
            raise
        if not waiter[1].done():
            self._leave(waiter)
            raise RequestError(_EXHAUSTED, f"the block store is short of memory: {n} bytes were not freed in time "
                                           f"(memory_budget_bytes={self.limit}, {self.used} in use); retry later")

    def release(self, n: int) -> None:
        """Give back ``n`` bytes taken earlier."""
        assert 0 <= n <= self.used, (n, self.used)
        self.used -= n
        self._grant()

    def _leave(self, waiter: tuple[int, asyncio.Future[None]]) -> None:
        waiter[1].cancel()
        self._waiters.remove(waiter)
        self._grant()  # those behind it may fit now

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            n, future = self._waiters.popleft()
            self.used += n
            future.set_result(None)


class CallBudget:
    """What one call may hold (``call_budget_bytes``), drawn from the process's budget.

    Amounts are bytes of block data, each charged ``COPIES`` times: a Get's message exists
    twice while gRPC sends it (ours and gRPC's copy), as does a Put's data while redis-py
    writes it. ``close()`` gives back whatever the call still holds, however it ended.
    """

    def __init__(self, process: MemoryBudget, limit: int, deadline: float) -> None:
        self.limit = limit
        self.used = 0  # charged bytes (COPIES per byte of block data)
        self._process = process
        self._deadline = deadline

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes if both this call and the process have them free now."""
        n *= COPIES
        if self.used + n > self.limit or not self._process.try_take(n):
            return False
        self.used += n
        return True

    async def take(self, n: int) -> None:
        """Take ``n`` bytes, waiting for the process budget until the call's deadline.

        Only what the call gives back itself frees its own budget, and it is waiting here:
        more than its free room raises at once."""
        if self.used + COPIES * n > self.limit:
            raise RequestError(_EXHAUSTED, f"{n} more bytes of blocks would exceed this call's memory budget "
                                           f"(call_budget_bytes={self.limit}, {self.used} held, each byte counted "
                                           f"{COPIES} times)")
        await self._process.take(COPIES * n, self._deadline)
        self.used += COPIES * n

    def release(self, n: int) -> None:
        """Give back ``n`` bytes of block data taken earlier."""
        assert 0 <= COPIES * n <= self.used, (n, self.used)
        self.used -= COPIES * n
        self._process.release(COPIES * n)

    def close(self) -> None:
        self._process.release(self.used)
        self.used = 0
