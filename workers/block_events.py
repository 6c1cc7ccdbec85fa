"""``BlockEventLog``: a worker's block events, numbered, for any number of readers.

Every session-service replica (and nothing else) reads the same log with its own cursor, so
none takes events from another. The log keeps the newest ``capacity`` events; a reader whose
cursor fell out of it, a new reader, or one that saw another incarnation of the worker gets
a snapshot instead (every block its T0/T1 hold, ``TieredKVCache.held_blocks``), then the
changes. Taking the cursor before the snapshot makes that safe: replaying a stored or removed
event over a state that already has it changes nothing.
"""
from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass

from kvstore.cache import BlockEvent

DEFAULT_CAPACITY = 1 << 16  # events: ~30 MB with their token ids; a replica polls every 100 ms


@dataclass(frozen=True, slots=True)
class EventCursor:
    """Where a reader's next read starts, in one incarnation of the worker."""

    incarnation: str
    position: int


class BlockEventLog:
    """Thread-safe: the cache appends from the engine and copy threads, readers call ``read``."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._lock = threading.Lock()
        self._events: deque[BlockEvent] = deque(maxlen=capacity)
        self._end = 0  # events ever appended: the cursor just past the newest

    def append(self, event: BlockEvent) -> None:
        with self._lock:
            self._events.append(event)
            self._end += 1

    def read(self, cursor: int | None) -> tuple[list[BlockEvent] | None, int]:
        """The events from ``cursor`` on (None when the log no longer has them all, or for
        ``cursor=None``: then the reader needs a snapshot), and the cursor for the next read."""
        with self._lock:
            start = self._end - len(self._events)
            if cursor is None or not start <= cursor <= self._end:
                return None, self._end
            # From the newest end: a reader that keeps up wants a few of many.
            newest = list(itertools.islice(reversed(self._events), self._end - cursor))
            return newest[::-1], self._end
