"""Slot bookkeeping of one local tier: which block each slot holds, references, and LRU eviction.

A slot is in exactly one state:
- free: holds nothing;
- private: allocated to a caller, not (yet) shareable; referenced by that caller;
- cached: holds a committed block, findable by its hash; in use while its reference count is
  positive, otherwise on the LRU list and evictable (blocks of pinned sessions, which the
  cache ``prefer``s, on a second LRU list, evicted only once the first is empty).
Slots in use are never handed out again, so a block in use is never evicted or overwritten.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass


class CacheFullError(RuntimeError):
    """Every slot of a tier is in use: nothing can be evicted to make room."""


@dataclass(slots=True, eq=False)
class BlockMeta:
    """Identity of a committed block, shared by its copies in every tier."""

    block_hash: bytes
    parent_hash: bytes
    token_ids: tuple[int, ...]
    namespace: str
    hits: int = 0  # times a lookup reused it; drives the `selective` write policy
    in_remote: bool = False  # known to be in T2 (written or read there)


class BlockIndex:
    """Hash -> slot map with reference counts and LRU order over the unreferenced cached slots."""

    def __init__(self, num_slots: int, name: str, listener: Callable[[bool, bytes], None] | None = None) -> None:
        self.name = name
        self._listener = listener  # (stored?, hash) whenever a block becomes findable or is evicted
        self.num_slots = num_slots
        # FIFO reuse keeps runs of consecutive slots, which copy in one strided pass.
        self._free: deque[int] = deque(range(num_slots))
        self._slot_of: dict[bytes, int] = {}
        self._meta: list[BlockMeta | None] = [None] * num_slots
        self._refs: list[int] = [0] * num_slots
        self._lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        # Blocks of pinned sessions: evicted only when no other block can be (own LRU order).
        self._preferred_lru: OrderedDict[int, None] = OrderedDict()
        self._preferred_until: dict[bytes, float] = {}
        self._next_expiry = float("inf")  # earliest preference end: sweep once it passes
        self.evictions = 0

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._slot_of

    def __len__(self) -> int:
        """Number of cached (committed, findable) blocks."""
        return len(self._slot_of)

    def find(self, block_hash: bytes) -> int | None:
        return self._slot_of.get(block_hash)

    def meta(self, slot: int) -> BlockMeta | None:
        return self._meta[slot]

    def refs(self, slot: int) -> int:
        return self._refs[slot]

    @property
    def num_evictable(self) -> int:
        return len(self._free) + len(self._lru) + len(self._preferred_lru)

    @property
    def num_in_use(self) -> int:
        return self.num_slots - self.num_evictable

    def acquire(self, slot: int) -> None:
        """Take a reference: the slot is neither evicted nor reused until ``release``."""
        self._refs[slot] += 1
        self._lru.pop(slot, None)
        self._preferred_lru.pop(slot, None)

    def prefer(self, block_hashes: list[bytes], until: float) -> None:
        """Evict these blocks (now or when they arrive) after all others, until ``until``
        (``time.monotonic()`` seconds)."""
        self._next_expiry = min(self._next_expiry, until)
        for h in block_hashes:
            self._preferred_until[h] = max(until, self._preferred_until.get(h, 0.0))
            slot = self._slot_of.get(h)
            if slot is not None and slot in self._lru:
                del self._lru[slot]
                self._preferred_lru[slot] = None

    def _is_preferred(self, block_hash: bytes) -> bool:
        until = self._preferred_until.get(block_hash)
        if until is None:
            return False
        if until < time.monotonic():
            del self._preferred_until[block_hash]
            return False
        return True

    def _expire_preferences(self) -> None:
        """Preferences that ran out: their blocks go back to the LRU, as its oldest."""
        now = time.monotonic()
        expired = [h for h, until in self._preferred_until.items() if until < now]
        self._next_expiry = min((u for u in self._preferred_until.values() if u >= now), default=float("inf"))
        for h in expired:
            del self._preferred_until[h]
            slot = self._slot_of.get(h)
            if slot is not None and slot in self._preferred_lru:
                del self._preferred_lru[slot]
                self._lru[slot] = None
                self._lru.move_to_end(slot, last=False)

    def release(self, slot: int) -> None:
        assert self._refs[slot] > 0, f"{self.name}: release of slot {slot}, which is not in use"
        self._refs[slot] -= 1
        if self._refs[slot]:
            return
        meta = self._meta[slot]
        if meta is None:
            self._free.append(slot)
        elif self._preferred_until and self._is_preferred(meta.block_hash):
            self._preferred_lru[slot] = None
        else:
            self._lru[slot] = None  # most recently used end

    def allocate(self, n: int) -> tuple[list[int], list[tuple[int, BlockMeta]]]:
        """Take ``n`` slots, in use and private: free ones first, then evict LRU blocks.

        Returns the slots and the (slot, meta) of every evicted block; the caller must copy
        an evicted block's data out (spill) before writing to its slot.
        """
        if n > self.num_evictable:
            raise CacheFullError(
                f"{self.name}: need {n} slots, only {self.num_evictable} of {self.num_slots} "
                "are free or evictable (the rest are in use by running sequences)"
            )
        slots: list[int] = []
        evicted: list[tuple[int, BlockMeta]] = []
        if self._preferred_until and time.monotonic() >= self._next_expiry:
            self._expire_preferences()
        for _ in range(n):
            if self._free:
                slot = self._free.popleft()
            else:
                slot, _ = (self._lru or self._preferred_lru).popitem(last=False)
                meta = self._meta[slot]
                assert meta is not None
                del self._slot_of[meta.block_hash]
                self._meta[slot] = None
                evicted.append((slot, meta))
                self.evictions += 1
                if self._listener:
                    self._listener(False, meta.block_hash)
            self._refs[slot] = 1
            slots.append(slot)
        return slots, evicted

    def publish(self, slot: int, meta: BlockMeta) -> bool:
        """Make a private slot's block findable under its hash.

        Returns False (and changes nothing) when another slot already holds that hash: the
        caller's slot then stays private and is freed on its last unpin.
        """
        assert self._meta[slot] is None and self._refs[slot] > 0, f"{self.name}: bad publish"
        if meta.block_hash in self._slot_of:
            return False
        self._meta[slot] = meta
        self._slot_of[meta.block_hash] = slot
        if self._listener:
            self._listener(True, meta.block_hash)
        return True

    def check(self) -> None:
        """Verify internal invariants (used by tests)."""
        free, lru = set(self._free), set(self._lru) | set(self._preferred_lru)
        assert len(free) == len(self._free) and not free & lru and not set(self._lru) & set(self._preferred_lru)
        for slot in range(self.num_slots):
            meta, refs = self._meta[slot], self._refs[slot]
            assert refs >= 0
            if slot in free:
                assert meta is None and refs == 0
            elif slot in lru:
                assert meta is not None and refs == 0
            else:
                assert refs > 0, f"{self.name}: slot {slot} leaked"
            if meta is not None:
                assert self._slot_of[meta.block_hash] == slot
        assert len(self._slot_of) == sum(m is not None for m in self._meta)
