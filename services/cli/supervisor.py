"""Supervision for ``kvstore serve``: restart the processes it started (embedded Redis, the
block store) when they die, with bounded exponential backoff."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

CHECK_S = 0.2
FIRST_DELAY_S = 0.2
MAX_DELAY_S = 30.0
STABLE_S = 60.0  # up this long: the next restart waits FIRST_DELAY_S again


@dataclass(slots=True)
class Child:
    """A supervised process, as two callables (is it running? bring it back)."""
    name: str
    alive: Callable[[], bool]
    restart: Callable[[], None]  # blocking: the process back on the same address
    delay: float = FIRST_DELAY_S  # before the next restart
    up_since: float = field(default_factory=time.monotonic)
    retry_at: float | None = None  # set while it is down
    restarts: int = 0


class Supervisor:
    """Restarts dead children, each after a delay that doubles per restart up to MAX_DELAY_S;
    logs each death and restart and counts restarts (``kvstore_serve_restarts_total``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.children: list[Child] = []
        self.restarts = Counter("kvstore_serve_restarts", "Embedded processes restarted after they died",
                                ["process"], registry=registry)
        self._task: asyncio.Task | None = None
        self._stopping = False

    def watch(self, name: str, alive: Callable[[], bool], restart: Callable[[], None]) -> None:
        self.children.append(Child(name, alive, restart))
        self.restarts.labels(name)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="serve-supervisor")

    async def stop(self) -> None:
        """Stop watching; returns within CHECK_S, or once a restart under way is done (so
        nothing starts after the caller stops the children)."""
        self._stopping = True
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(CHECK_S)  # a period, not synchronisation
            for child in self.children:
                if not self._stopping and not child.alive():
                    await self._revive(child)

    async def _revive(self, child: Child) -> None:
        now = time.monotonic()
        if child.retry_at is None:
            if now - child.up_since > STABLE_S:
                child.delay = FIRST_DELAY_S
            child.retry_at = now + child.delay
            log.error("%s died; restarting it in %.1f s", child.name, child.delay)
        if now < child.retry_at:
            return
        child.delay = min(2 * child.delay, MAX_DELAY_S)
        try:
            await asyncio.to_thread(child.restart)
        except Exception as e:  # noqa: BLE001 - keep trying, with backoff
            child.retry_at = time.monotonic() + child.delay
            log.error("restarting %s failed (next try in %.1f s): %s", child.name, child.delay, e)
            return
        child.up_since, child.retry_at = time.monotonic(), None
        child.restarts += 1
        self.restarts.labels(child.name).inc()
        log.warning("%s restarted (%d restarts so far)", child.name, child.restarts)
