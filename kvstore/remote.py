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

    def get(self, namespace: str, hashes: Sequence[bytes]) -> list[bytes | None]:
        """The stored bytes of each block, None for a miss."""

    def put(self, namespace: str, blocks: Sequence[tuple[bytes, bytes]]) -> None:
        """Store (hash, encoded block) pairs; set-if-absent, so retries are harmless."""

    def delete(self, namespace: str, hashes: Sequence[bytes], corrupt: bool = False) -> int:
        """Remove blocks; ``corrupt`` says the caller found them damaged. Returns how many."""


def iter_found(remote: RemoteTier, namespace: str, hashes: Sequence[bytes]) -> Iterator[tuple[int, bytes | memoryview]]:
    """(index, bytes) of the found blocks in index order, as they arrive if ``remote`` can
    stream them (``get_iter``, as ``BlockStoreClient`` does: decoding then overlaps with the
    transfer), else from ``get``."""
    stream = getattr(remote, "get_iter", None)
    if stream is not None:
        yield from stream(namespace, hashes)
        return
    blobs = list(remote.get(namespace, hashes))
    if len(blobs) != len(hashes):
        raise ValueError(f"T2 returned {len(blobs)} blocks for {len(hashes)} hashes")
    yield from ((i, b) for i, b in enumerate(blobs) if b is not None)
