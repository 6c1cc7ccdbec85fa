"""In-memory stand-ins for unit tests of one class. Never used where an issue asks for
integration with the real component."""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence


class MemoryRemote:
    """A dict-backed T2 (``kvstore.remote.RemoteTier``) for unit tests of the cache manager."""

    def __init__(self) -> None:
        self.blocks: dict[tuple[str, bytes], bytes] = {}
        self.down = False  # simulate an unreachable store
        self.calls = {"lookup": 0, "get": 0, "put": 0, "delete": 0}
        self.corrupt_reports = 0
        self._lock = threading.Lock()

    def _check(self, op: str) -> None:
        self.calls[op] += 1
        if self.down:
            raise ConnectionError("memory remote is down")

    def lookup(self, namespace: str, hashes: Sequence[bytes]) -> int:
        with self._lock:
            self._check("lookup")
            n = 0
            while n < len(hashes) and (namespace, hashes[n]) in self.blocks:
                n += 1
            return n

    def get_iter(self, namespace: str, hashes: Sequence[bytes]) -> Iterator[tuple[int, bytes]]:
        with self._lock:  # (a generator: runs, and may fail, once iterated, as the real one)
            self._check("get")
            found = [(i, self.blocks.get((namespace, h))) for i, h in enumerate(hashes)]
        yield from ((i, b) for i, b in found if b is not None)

    def put(self, namespace: str, blocks: Sequence[tuple[bytes, bytes]]) -> None:
        with self._lock:
            self._check("put")
            for h, blob in blocks:
                self.blocks.setdefault((namespace, h), blob)

    def delete(self, namespace: str, hashes: Sequence[bytes], corrupt: bool = False) -> int:
        with self._lock:
            self._check("delete")
            self.corrupt_reports += len(hashes) if corrupt else 0
            return sum(self.blocks.pop((namespace, h), None) is not None for h in hashes)
