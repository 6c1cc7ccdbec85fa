"""The interface the tiered cache needs from its cold tier (T2).

Blocks travel as the codec's bytes (``kvstore.codec``): encoded on the worker, stored as-is.
The gRPC block-store client implements this; anything else that does is usable as T2.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol


class RemoteTier(Protocol):
    def lookup(self, namespace: str, hashes: Sequence[bytes]) -> int:
        """How many of the leading ``hashes`` are stored (the longest present prefix)."""

    def get_iter(self, namespace: str, hashes: Sequence[bytes]) -> Iterator[tuple[int, bytes | memoryview]]:
        """(index in ``hashes``, stored bytes) of the found blocks, in index order; absent
        indexes are misses. A streaming tier yields blocks as they arrive, so that the cache
        decodes while the rest is on the way; closing the iterator stops the transfer."""

    def put(self, namespace: str, blocks: Sequence[tuple[bytes, bytes]]) -> None:
        """Store (hash, encoded block) pairs; set-if-absent, so retries are harmless. Raises
        if it did not store them (the cache then counts them as dropped, not present)."""

    def delete(self, namespace: str, hashes: Sequence[bytes], corrupt: bool = False) -> int:
        """Remove blocks; ``corrupt`` says the caller found them damaged. Returns how many."""

