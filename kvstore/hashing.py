"""Block identity: chained prefix hashes over full blocks of token ids.

hash(block i) = blake2b(hash(block i-1) || little-endian uint32 token ids of block i), and
the chain's root is blake2b(scheme version, model fingerprint, namespace). Equal hashes mean
equal model, equal tenant and equal token prefix, on any process or machine (Python's
``hash()`` is never used: it is salted per process).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

HASH_SCHEME_VERSION = 1
HASH_SIZE = 16  # bytes; 128 bits keeps accidental collisions out of reach and keys short
MAX_TOKEN_ID = 2**32 - 1


def root_hash(fingerprint: bytes, namespace: str) -> bytes:
    """Root of every chain for one (model, tenant) pair."""
    if not namespace:
        raise ValueError("namespace must be a non-empty string")
    h = hashlib.blake2b(digest_size=HASH_SIZE, person=b"kvstore-root")
    h.update(HASH_SCHEME_VERSION.to_bytes(2, "little"))
    h.update(len(fingerprint).to_bytes(2, "little") + fingerprint)
    h.update(namespace.encode("utf-8"))
    return h.digest()


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Canonical bytes of token ids: little-endian uint32, range-checked."""
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be a flat sequence, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
        # Floats, bools and strings are rejected rather than coerced: 1.5 must not hash as 1.
        raise ValueError("token ids must be integers in [0, 2**32)")
    return arr.astype("<u4", copy=False).tobytes()


def block_hash(parent: bytes, token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Hash of one full block given its parent's hash (or the root)."""
    return _block_hash(parent, token_bytes(token_ids))


def _block_hash(parent: bytes, data: bytes | memoryview) -> bytes:
    """``block_hash`` of a block's canonical token bytes."""
    h = hashlib.blake2b(parent, digest_size=HASH_SIZE, person=b"kvstore-block")
    h.update(data)
    return h.digest()


class PrefixHasher:
    """Token history of one sequence with the hashes of its full blocks.

    Incremental: ``extend`` hashes only the blocks that become full, so a growing sequence
    (decode, a new turn) never rehashes its history. ``fork`` gives a branch that shares
    the history so far.
    """

    __slots__ = ("root", "block_size", "namespace", "tokens", "hashes", "_tail")

    def __init__(self, root: bytes, block_size: int, namespace: str = "") -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.root = root
        self.block_size = block_size
        self.namespace = namespace
        self.tokens: list[int] = []
        self.hashes: list[bytes] = []
        self._tail = b""  # canonical bytes of the tokens after the last full block

    @classmethod
    def for_namespace(cls, fingerprint: bytes, namespace: str, block_size: int,
                      tokens: Iterable[int] = ()) -> PrefixHasher:
        """``tokens`` with their block hashes, as every worker and the router name them."""
        prefix = cls(root_hash(fingerprint, namespace), block_size, namespace)
        prefix.extend(tokens)
        return prefix

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_full_blocks(self) -> int:
        return len(self.hashes)

    def extend(self, token_ids: Iterable[int]) -> list[bytes]:
        """Append tokens; return the hashes of the blocks that became full."""
        ids = token_ids if isinstance(token_ids, (list, tuple, np.ndarray)) else list(token_ids)
        data = self._tail + token_bytes(ids)  # validates (integers, flat, in range) before mutating
        self.tokens.extend(ids.tolist() if isinstance(ids, np.ndarray) else map(int, ids))
        added: list[bytes] = []
        step = 4 * self.block_size
        full = len(data) // step * step
        for start in range(0, full, step):
            added.append(_block_hash(self.parent_of(len(self.hashes)), data[start:start + step]))
            self.hashes.append(added[-1])
        self._tail = data[full:]
        return added

    def parent_of(self, block_index: int) -> bytes:
        return self.hashes[block_index - 1] if block_index else self.root

    def block_tokens(self, block_index: int) -> list[int]:
        bs = self.block_size
        return self.tokens[block_index * bs:(block_index + 1) * bs]

    def fork(self) -> PrefixHasher:
        child = PrefixHasher(self.root, self.block_size, self.namespace)
        child.tokens = list(self.tokens)
        child.hashes = list(self.hashes)
        child._tail = self._tail
        return child
