"""Slot bookkeeping of one local tier: which block each slot holds, references, and eviction.

A slot is in exactly one state:
- free: holds nothing;
- private: allocated to a caller, not (yet) shareable; referenced by that caller;
- cached: holds a committed block, findable by its hash; in use while its reference count is
  positive, otherwise evictable, in the order of the tier's eviction policy (blocks of pinned
  sessions, which the cache ``prefer``s, in a separate LRU, evicted only once no other is left).
Slots in use are never handed out again, so a block in use is never evicted or overwritten.
"""
from __future__ import annotations

import heapq
import itertools
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any


class CacheFullError(RuntimeError):
    """Every slot of a tier is in use: nothing can be evicted to make room."""


@dataclass(slots=True, eq=False)
class BlockMeta:
    """Identity of a committed block, shared by its copies in every tier."""

    block_hash: bytes
    parent_hash: bytes
    token_ids: tuple[int, ...]
    namespace: str
    hits: int = 0  # times a lookup reused it; drives the `selective` write policy and eviction
    in_remote: bool = False  # known to be in T2 (written or read there)


class Eviction(str, Enum):
    """Which unreferenced cached block a tier evicts first (docs/architecture.md compares them)."""

    LRU = "lru"  # least recently released
    ARC = "arc"  # scan-resistant: blocks used once leave before blocks used again, adaptively
    PREFIX = "prefix"  # request tails first, then GreedyDual over reuse


class EvictionOrder(ABC):
    """The evictable blocks of one tier (cached, unreferenced) in the order a policy gives them up."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[int]: ...

    @abstractmethod
    def push(self, slot: int, meta: BlockMeta, oldest: bool = False) -> None:
        """The block became evictable (``oldest``: give it up before the others)."""

    @abstractmethod
    def discard(self, slot: int) -> bool:
        """The block is no longer evictable (referenced, or moved elsewhere); was it here?"""

    @abstractmethod
    def pop(self) -> int:
        """Remove and return the slot to evict; the order is not empty."""

    def stored(self, meta: BlockMeta) -> None:
        """A block became findable in the tier (evictable or not)."""

    def dropped(self, meta: BlockMeta) -> None:
        """A block was evicted from the tier (from any order)."""


class LRU(EvictionOrder):
    """Least recently released first."""

    def __init__(self, num_slots: int = 0) -> None:
        super().__init__(num_slots)
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)

    def push(self, slot: int, meta: BlockMeta, oldest: bool = False) -> None:
        self._order[slot] = None
        self._order.move_to_end(slot, last=not oldest)

    def discard(self, slot: int) -> bool:
        if slot not in self._order:
            return False
        del self._order[slot]
        return True

    def pop(self) -> int:
        return self._order.popitem(last=False)[0]


class ARC(EvictionOrder):
    """Adaptive Replacement Cache (Megiddo and Modha, FAST'03): blocks never reused in one LRU,
    reused ones (or ones evicted recently and back) in another; ghost lists of both lists'
    recent victims move the split, so a flood of blocks used once cannot push out those used again."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots)
        self._once, self._again = LRU(), LRU()
        self._ghost_once: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._ghost_again: OrderedDict[bytes, None] = OrderedDict()
        self._target_once = 0.0  # ARC's p: how many evictable blocks ``_once`` may keep
        self._readmitted: set[bytes] = set()  # cached blocks that came back from a ghost list
        self._hash: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._once) + len(self._again)

    def __iter__(self) -> Iterator[int]:
        yield from self._once
        yield from self._again

    def stored(self, meta: BlockMeta) -> None:
        h, once, again = meta.block_hash, self._ghost_once, self._ghost_again
        if h in once:  # evicted too early from ``_once``: give it more room
            self._target_once = min(self.num_slots, self._target_once + max(len(again) / len(once), 1))
            del once[h]
        elif h in again:
            self._target_once = max(0.0, self._target_once - max(len(once) / len(again), 1))
            del again[h]
        else:
            return
        self._readmitted.add(h)

    def dropped(self, meta: BlockMeta) -> None:
        self._readmitted.discard(meta.block_hash)

    def push(self, slot: int, meta: BlockMeta, oldest: bool = False) -> None:
        again = meta.hits or meta.block_hash in self._readmitted
        (self._again if again else self._once).push(slot, meta, oldest)
        self._hash[slot] = meta.block_hash

    def discard(self, slot: int) -> bool:
        self._hash.pop(slot, None)
        return self._once.discard(slot) or self._again.discard(slot)

    def pop(self) -> int:
        if self._once and (len(self._once) > self._target_once or not self._again):
            slot, ghosts = self._once.pop(), self._ghost_once
        else:
            slot, ghosts = self._again.pop(), self._ghost_again
        ghosts[self._hash.pop(slot)] = None
        while len(self._ghost_once) + len(self._ghost_again) > self.num_slots:
            longer = self._ghost_once if len(self._ghost_once) > len(self._ghost_again) else self._ghost_again
            longer.popitem(last=False)
        return slot


class PrefixAware(EvictionOrder):
    """Prefix- and reuse-aware: first the blocks that are nobody's parent (of a block stored
    or released here lately), i.e. the tail of a request, which the next turn of a
    conversation replaces; then the lowest priority = age + reuses/4, where age counts
    turnovers of the tier (releases / slots) less 2 depth / slots, so a chain released
    together goes leaf first (an evicted ancestor strands its descendants) and each reuse
    buys a quarter turnover. Reuses include those a block had before an eviction,
    remembered for 4 tier sizes, plus one for coming back. Every block saves the same
    recompute (equal tokens), so the cost is one per block."""

    HIT_WEIGHT = 0.25
    GHOST_TIERS = 4

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots)
        self._heap: list[tuple[float, int, int]] = []  # (priority, seq, slot)
        self._tails: OrderedDict[int, bytes | None] = OrderedDict()  # nobody's parent when released (None: oldest)
        self._entry: dict[int, tuple[float, int, int]] = {}  # evictable slot -> its live heap entry
        self._parents: OrderedDict[bytes, None] = OrderedDict()  # parents of blocks seen lately, oldest first
        self._past_hits: dict[bytes, int] = {}  # cached blocks that came back: reuses before
        self._ghost: OrderedDict[bytes, int] = OrderedDict()  # evicted hash -> its reuses, oldest first
        self._depth: dict[bytes, int] = {}  # cached blocks: steps from the first ancestor cached here
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entry)

    def __iter__(self) -> Iterator[int]:
        return iter(self._entry)

    def _remember(self, table: OrderedDict, key: bytes, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > self.GHOST_TIERS * self.num_slots:
            table.popitem(last=False)

    def stored(self, meta: BlockMeta) -> None:
        self._remember(self._parents, meta.parent_hash, None)
        self._depth[meta.block_hash] = self._depth.get(meta.parent_hash, -1) + 1
        past = self._ghost.pop(meta.block_hash, None)
        if past is not None:
            self._past_hits[meta.block_hash] = past + 1  # coming back is a reuse too

    def dropped(self, meta: BlockMeta) -> None:
        self._depth.pop(meta.block_hash, None)
        self._remember(self._ghost, meta.block_hash, meta.hits + self._past_hits.pop(meta.block_hash, 0))

    def push(self, slot: int, meta: BlockMeta, oldest: bool = False) -> None:
        self._remember(self._parents, meta.parent_hash, None)
        if oldest or meta.block_hash not in self._parents:
            self._tails[slot] = None if oldest else meta.block_hash
            self._tails.move_to_end(slot, last=not oldest)
        reuses = meta.hits + self._past_hits.get(meta.block_hash, 0)
        seq = next(self._seq)
        age = (seq - 2 * self._depth.get(meta.block_hash, 0)) / self.num_slots
        priority = float("-inf") if oldest else age + self.HIT_WEIGHT * reuses
        entry = (priority, seq, slot)
        self._entry[slot] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._entry) + 64:  # drop stale entries
            self._heap = list(self._entry.values())
            heapq.heapify(self._heap)

    def discard(self, slot: int) -> bool:
        self._tails.pop(slot, None)
        return self._entry.pop(slot, None) is not None

    def pop(self) -> int:
        while self._tails:  # still nobody's parent now (a child may have come since): first to go
            slot, block_hash = self._tails.popitem(last=False)
            if block_hash is None or block_hash not in self._parents:
                del self._entry[slot]
                return slot
        while True:
            entry = heapq.heappop(self._heap)
            if self._entry.get(entry[2]) is entry:
                break
        self.discard(entry[2])
        return entry[2]


POLICIES: dict[Eviction, type[EvictionOrder]] = {Eviction.LRU: LRU, Eviction.ARC: ARC, Eviction.PREFIX: PrefixAware}
DEFAULT_EVICTION = Eviction.PREFIX  # the best on the Mooncake traces (bench/policies.py)


class BlockIndex:
    """Hash -> slot map with reference counts; evicts unreferenced cached slots per ``eviction``."""

    def __init__(self, num_slots: int, name: str, listener: Callable[[bool, BlockMeta], None] | None = None,
                 eviction: Eviction = DEFAULT_EVICTION) -> None:
        self.name = name
        self._listener = listener  # (stored?, meta) whenever a block becomes findable or is evicted
        self.num_slots = num_slots
        self.eviction = Eviction(eviction)
        # FIFO reuse keeps runs of consecutive slots, which copy in one strided pass.
        self._free: deque[int] = deque(range(num_slots))
        self._slot_of: dict[bytes, int] = {}
        self._meta: list[BlockMeta | None] = [None] * num_slots
        self._refs: list[int] = [0] * num_slots
        self._order = POLICIES[self.eviction](num_slots)
        # Blocks of pinned sessions: evicted only when no other block can be (own LRU order).
        self._preferred = LRU()
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

    def cached(self) -> list[BlockMeta]:
        """Every cached (findable) block."""
        return [self._meta[slot] for slot in self._slot_of.values()]

    def meta(self, slot: int) -> BlockMeta | None:
        return self._meta[slot]

    def refs(self, slot: int) -> int:
        return self._refs[slot]

    @property
    def num_evictable(self) -> int:
        return len(self._free) + len(self._order) + len(self._preferred)

    @property
    def num_in_use(self) -> int:
        return self.num_slots - self.num_evictable

    def acquire(self, slot: int) -> None:
        """Take a reference: the slot is neither evicted nor reused until ``release``."""
        self._refs[slot] += 1
        if not self._order.discard(slot):
            self._preferred.discard(slot)

    def prefer(self, block_hashes: list[bytes], until: float) -> None:
        """Evict these blocks (now or when they arrive) after all others, until ``until``
        (``time.monotonic()`` seconds)."""
        self._next_expiry = min(self._next_expiry, until)
        for h in block_hashes:
            self._preferred_until[h] = max(until, self._preferred_until.get(h, 0.0))
            slot = self._slot_of.get(h)
            if slot is not None and self._order.discard(slot):
                self._preferred.push(slot, self._meta[slot])  # type: ignore[arg-type]

    def _is_preferred(self, block_hash: bytes) -> bool:
        until = self._preferred_until.get(block_hash)
        if until is None:
            return False
        if until < time.monotonic():
            del self._preferred_until[block_hash]
            return False
        return True

    def _expire_preferences(self) -> None:
        """Preferences that ran out: their blocks go back to the policy's order, first to go."""
        now = time.monotonic()
        expired = [h for h, until in self._preferred_until.items() if until < now]
        self._next_expiry = min((u for u in self._preferred_until.values() if u >= now), default=float("inf"))
        for h in expired:
            del self._preferred_until[h]
            slot = self._slot_of.get(h)
            if slot is not None and self._preferred.discard(slot):
                self._order.push(slot, self._meta[slot], oldest=True)  # type: ignore[arg-type]

    def release(self, slot: int) -> None:
        assert self._refs[slot] > 0, f"{self.name}: release of slot {slot}, which is not in use"
        self._refs[slot] -= 1
        if self._refs[slot]:
            return
        meta = self._meta[slot]
        if meta is None:
            self._free.append(slot)
        elif self._preferred_until and self._is_preferred(meta.block_hash):
            self._preferred.push(slot, meta)
        else:
            self._order.push(slot, meta)

    def allocate(self, n: int) -> tuple[list[int], list[tuple[int, BlockMeta]]]:
        """Take ``n`` slots, in use and private: free ones first, then evict per policy.

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
                slot = (self._order if len(self._order) else self._preferred).pop()
                meta = self._meta[slot]
                assert meta is not None
                del self._slot_of[meta.block_hash]
                self._meta[slot] = None
                self._order.dropped(meta)
                evicted.append((slot, meta))
                self.evictions += 1
                if self._listener:
                    self._listener(False, meta)
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
        self._order.stored(meta)
        if self._listener:
            self._listener(True, meta)
        return True

    def drop(self, match: Callable[[BlockMeta], bool]) -> int:
        """Make every cached block that ``match``es unfindable (a flush): unreferenced ones free
        their slots now, referenced ones on their last ``release``. Returns how many."""
        dropped = [(slot, meta) for slot, meta in enumerate(self._meta) if meta is not None and match(meta)]
        for slot, meta in dropped:
            if not self._refs[slot]:
                if not self._order.discard(slot):
                    self._preferred.discard(slot)
                self._free.append(slot)
            del self._slot_of[meta.block_hash]
            self._meta[slot] = None
            self._order.dropped(meta)
            if self._listener:
                self._listener(False, meta)
        return len(dropped)

    def check(self) -> None:
        """Verify internal invariants (used by tests)."""
        free, order, preferred = set(self._free), set(self._order), set(self._preferred)
        assert len(free) == len(self._free) and len(order) == len(self._order) and len(preferred) == len(self._preferred)
        assert not free & order and not free & preferred and not order & preferred
        for slot in range(self.num_slots):
            meta, refs = self._meta[slot], self._refs[slot]
            assert refs >= 0
            if slot in free:
                assert meta is None and refs == 0
            elif slot in order or slot in preferred:
                assert meta is not None and refs == 0
            else:
                assert refs > 0, f"{self.name}: slot {slot} leaked"
            if meta is not None:
                assert self._slot_of[meta.block_hash] == slot
        assert len(self._slot_of) == sum(m is not None for m in self._meta)
