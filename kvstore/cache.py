"""The tiered KV cache of one worker: T0 device pool, T1 host pool, T2 remote store.

Life of a block: a sequence ``allocate``s private T0 slots, its model writes KV into them,
and each slot that fills up is ``commit``ted under its prefix hash, which makes it shareable.
``release`` drops the reference; an unreferenced cached block stays findable until LRU eviction. Copies flow
down per write policy (T0->T1 and T1->T2) and up on ``load`` or, on a loader thread, on
``start_load`` (T2->T1->T0), into T0 slots reserved up front.

Visibility: a block becomes findable in a tier only after its copy there completed, so a
reader never sees half-written KV. A T2 block that fails any check is a miss (recomputed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

from kvstore.block_index import DEFAULT_EVICTION, BlockIndex, BlockMeta, CacheFullError, Eviction
from kvstore.codec import BlockCodecError, decode_block, encode_block, parse_codec
from kvstore.hashing import PrefixHasher
from kvstore.pools import DevicePool, HostPool, restore, spill
from kvstore.remote import RemoteTier
from kvstore.spec import KVSpec

log = logging.getLogger(__name__)

_RESTORE_BATCH = 16  # T2 blocks copied into T0 at once while the rest of a load streams in

__all__ = ["BlockEvent", "CacheConfig", "CacheFullError", "CacheStats", "LoadResult", "PrefixHit", "PrefixLoad", "Tier",
           "TieredKVCache", "WritePolicy"]


class WritePolicy(str, Enum):
    """When a block is copied from an upper tier to the one below it."""

    WRITE_THROUGH = "write_through"  # on commit, asynchronously
    WRITE_BACK = "write_back"  # on eviction from the upper tier
    SELECTIVE = "selective"  # once the block has been reused `selective_hits` times
    OFF = "off"  # never: the tier below stays empty (T0 only is an engine without offload)


@dataclass(slots=True)
class CacheConfig:
    """Capacities and policies of a worker's ``TieredKVCache``."""

    t0_blocks: int = 1024
    t1_blocks: int = 4096
    # Write-through on both boundaries: every committed block reaches T2 in the background,
    # so another worker (or this session's next worker after a failure) can reuse it while
    # it is still hot here. Write-back at T0->T1 would hide hot blocks from T2 until evicted.
    t0_t1_policy: WritePolicy = WritePolicy.WRITE_THROUGH
    t1_t2_policy: WritePolicy = WritePolicy.WRITE_THROUGH
    selective_hits: int = 2
    codec: str = "lz4"  # lossy ones (int8, fp8) also need the workers' KVSpec.kv_codec: docs/codecs.md
    codec_min_saving: float = 0.03
    # Background T2 writes waiting at most; past this, new writes are dropped and counted
    # rather than stalling decode or growing memory.
    t2_write_queue: int = 1024
    t2_write_batch: int = 32
    t2_writer_threads: int = 2  # encode + put in parallel (lz4 and gRPC release the GIL)
    loader_threads: int = 1  # prefix loads (``start_load``) in flight at once
    # Niceness of the loader threads (Linux): while sequences decode, a prefix streaming in
    # gets the CPU they leave (its TTFT grows under contention only); 0 for a fast load first.
    loader_niceness: int = 10
    eviction: Eviction = DEFAULT_EVICTION  # order in which T0 and T1 evict unreferenced blocks
    device: str = "auto"

    def __post_init__(self) -> None:
        self.t0_t1_policy = WritePolicy(self.t0_t1_policy)
        self.t1_t2_policy = WritePolicy(self.t1_t2_policy)
        for name in ("t0_blocks", "t1_blocks", "selective_hits", "t2_write_queue", "t2_write_batch", "t2_writer_threads",
                     "loader_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CacheConfig.{name} must be positive, got {getattr(self, name)}")
        self.eviction = Eviction(self.eviction)
        try:
            self.codec = parse_codec(self.codec).name.lower()
        except ValueError as e:
            raise ValueError(f"CacheConfig.codec: {e}") from None


class Tier(IntEnum):
    T0 = 0
    T1 = 1
    T2 = 2


@dataclass(frozen=True, slots=True)
class BlockEvent:
    """A block became findable in (``stored``) or was evicted from T0 or T1, or was written
    to T2: what a router needs to know which worker holds which prefix."""

    tier: Tier
    stored: bool
    block_hash: bytes
    namespace: str = ""
    parent_hash: bytes = b""  # stored events: what an index outside needs to chain the blocks
    token_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, tier: Tier, stored: bool, meta: BlockMeta) -> BlockEvent:
        if not stored:
            return cls(tier, False, meta.block_hash, meta.namespace)
        return cls(tier, True, meta.block_hash, meta.namespace, meta.parent_hash, meta.token_ids)


@dataclass(slots=True)
class PrefixHit:
    """Longest contiguous cached prefix of a sequence: one source tier per block."""

    hashes: list[bytes]
    tiers: list[Tier]
    block_size: int

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)

    @property
    def num_tokens(self) -> int:
        return len(self.hashes) * self.block_size

    def truncated(self, num_blocks: int) -> PrefixHit:
        """The hit's first ``num_blocks`` blocks."""
        return PrefixHit(self.hashes[:num_blocks], self.tiers[:num_blocks], self.block_size)


@dataclass(slots=True)
class LoadResult:
    """Referenced T0 slots holding the loaded prefix, in order; release them when done."""

    block_table: list[int]
    block_size: int
    from_tier: list[int] = field(default_factory=lambda: [0, 0, 0])  # blocks by source tier

    @property
    def num_blocks(self) -> int:
        return len(self.block_table)

    @property
    def num_tokens(self) -> int:
        return len(self.block_table) * self.block_size


@dataclass(slots=True, eq=False)
class PrefixLoad:
    """A prefix load started by ``TieredKVCache.start_load``: T0 slots for a whole sequence,
    referenced for the caller, whose leading ``num_blocks`` hold the cached prefix once
    ``done()``. The rest are private: the caller computes them (also those of blocks the load
    could not bring, ``failed``). Release ``block_table`` when done, or ``cancel_load``."""

    block_table: list[int]
    block_size: int
    num_blocks: int = 0  # loaded leading blocks; final once done()
    from_tier: list[int] = field(default_factory=lambda: [0, 0, 0])  # loaded blocks by source tier
    failed: bool = False  # a T2 block was missing, unreachable or corrupt: the prefix ends there
    error: str = ""  # copying into T0 failed (a device error): nothing loaded, the request fails
    # What the copies cost (raw KV bytes; the T2 phase includes the network and the decode):
    fetch_bytes: int = 0
    fetch_s: float = 0.0
    restore_bytes: int = 0
    restore_s: float = 0.0
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancelled: bool = False
    _on_done: Callable[[], None] | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


@dataclass(slots=True)
class _LoadJob:
    """A ``PrefixLoad``'s work for a loader thread: where each hit block comes from."""

    load: PrefixLoad
    prefix: PrefixHasher
    sources: list[tuple[Tier, int | None]]  # per hit block: (tier holding it, slot referenced there)
    origin: list[Tier]
    spares: list[int]  # private T0 slots for the T0 blocks after a T2 one, should the transfer stop before them


@dataclass(slots=True)
class CacheStats:
    """Counters since start (and gauges filled in by ``stats()``)."""

    lookups: int = 0
    lookup_tokens: int = 0
    loaded_blocks: list[int] = field(default_factory=lambda: [0, 0, 0])  # by source tier
    loaded_tokens: list[int] = field(default_factory=lambda: [0, 0, 0])
    committed_blocks: int = 0
    evicted_t0: int = 0
    evicted_t1: int = 0
    spilled_blocks: int = 0  # T0 -> T1
    spilled_bytes: int = 0
    promoted_blocks: int = 0  # T1 -> T0
    promoted_bytes: int = 0
    t2_put_blocks: int = 0
    t2_put_bytes: int = 0  # encoded
    t2_get_blocks: int = 0
    t2_get_bytes: int = 0  # encoded
    t2_corrupt: int = 0
    t2_errors: int = 0
    dropped_writes: int = 0  # copies skipped: queue full or lower tier entirely in use
    t0_cached: int = 0
    t0_in_use: int = 0
    t1_cached: int = 0
    t1_in_use: int = 0
    t0_blocks: int = 0  # capacities
    t1_blocks: int = 0
    bytes_per_block: int = 0


class _Writer:
    """A daemon thread draining a bounded queue in batches; ``submit`` never blocks."""

    def __init__(self, name: str, maxsize: int, batch: int, handle: Callable[[list[Any]], None], threads: int = 1,
                 niceness: int = 10):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._niceness = niceness
        self._batch = batch
        self._handle = handle
        self._name = name
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, item: Any) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            return False

    def join(self) -> None:
        self._queue.join()

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        # Background copies yield the cores to decoding (Linux: niceness is per thread).
        if self._niceness:
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._niceness)
        while True:
            items = [self._queue.get()]
            while len(items) < self._batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            work = [i for i in items if i is not None]
            try:
                if work:
                    self._handle(work)
            except Exception:  # a failed copy must not kill the writer
                log.exception("%s: background batch failed", self._name)
            finally:
                for _ in items:
                    self._queue.task_done()
            if len(work) < len(items):
                for _ in range(len(items) - len(work) - 1):
                    self._queue.put(None)  # sentinels meant for the other threads
                return


class TieredKVCache:
    """Prefix-hash-addressed KV blocks over T0 (device), T1 (host) and an optional T2."""

    def __init__(self, spec: KVSpec, config: CacheConfig | None = None, remote: RemoteTier | None = None,
                 on_block_event: Callable[[BlockEvent], None] | None = None):
        """``on_block_event`` is called (under the cache's lock: keep it cheap, e.g. append
        to a queue) for every block stored in or evicted from T0 and T1, and written to T2."""
        self.spec = spec
        self.config = config = config or CacheConfig()
        self.remote = remote
        self.t0 = DevicePool(spec, config.t0_blocks, config.device)
        self.t1 = HostPool(spec, config.t1_blocks)
        emit = on_block_event
        self._emit = emit
        self._t0 = BlockIndex(config.t0_blocks, "T0", (lambda s, m: emit(BlockEvent.of(Tier.T0, s, m))) if emit else None,
                              config.eviction)
        self._t1 = BlockIndex(config.t1_blocks, "T1", (lambda s, m: emit(BlockEvent.of(Tier.T1, s, m))) if emit else None,
                              config.eviction)
        self._lock = threading.RLock()
        self._stats = CacheStats()
        self._pending_t1: set[bytes] = set()  # T0 -> T1 copies in flight
        self._pending_t2: set[bytes] = set()  # queued or in-flight T2 writes
        self._t1_writer = _Writer("kv-t1-writer", config.t1_blocks, 64, self._write_t1_batch)
        self._t2_writer = (
            _Writer("kv-t2-writer", config.t2_write_queue, config.t2_write_batch, self._write_t2_batch,
                    threads=config.t2_writer_threads)
            if remote is not None else None
        )
        self._loader = _Writer("kv-loader", 0, 1, self._run_loads, threads=config.loader_threads,
                               niceness=config.loader_niceness)
        self._closed = False

    # ---- public API -------------------------------------------------------------------

    def lookup(self, prefix: PrefixHasher, num_tokens: int | None = None) -> PrefixHit:
        """Longest contiguous prefix of ``prefix``'s full blocks present in any tier.

        Capped at ``num_tokens - 1`` tokens (default: all of the prefix's tokens) so the
        last prompt token is always computed and yields logits. Takes no references.
        """
        n = prefix.num_tokens if num_tokens is None else min(num_tokens, prefix.num_tokens)
        cap = min(prefix.num_full_blocks, max(n - 1, 0) // self.spec.block_size)
        hashes = prefix.hashes[:cap]
        tiers: list[Tier] = []
        while len(tiers) < cap:
            with self._lock:
                for h in hashes[len(tiers):]:
                    if h in self._t0:
                        tiers.append(Tier.T0)
                    elif h in self._t1:
                        tiers.append(Tier.T1)
                    else:
                        break
            if len(tiers) == cap or self.remote is None:
                break
            found = self._remote_lookup(prefix.namespace, hashes[len(tiers):])
            if not found:
                break
            tiers.extend([Tier.T2] * found)
        with self._lock:
            self._stats.lookups += 1
            self._stats.lookup_tokens += n
        return PrefixHit(hashes[:len(tiers)], tiers, self.spec.block_size)

    def load(self, prefix: PrefixHasher, hit: PrefixHit) -> LoadResult:
        """Bring a hit's blocks into T0 (promoting from T1 and T2), referenced for the caller;
        on the calling thread (``start_load`` loads in the background).

        Blocks that vanished since the lookup, fail verification or find no room in T0 end
        the prefix there; the caller recomputes from ``result.num_tokens``.
        """
        job = self._reserve(prefix, hit, None, fit=True)
        self._run_load(job)
        load = job.load
        self.release(load.block_table[load.num_blocks:])
        if load.error:
            raise RuntimeError(f"copying the prefix into T0 failed: {load.error}")
        return LoadResult(load.block_table[:load.num_blocks], self.spec.block_size, load.from_tier)

    def start_load(self, prefix: PrefixHasher, hit: PrefixHit, num_blocks: int,
                   on_done: Callable[[], None] | None = None) -> PrefixLoad:
        """Reserve ``num_blocks`` T0 slots for a sequence (at least the hit's) and load the
        hit's blocks into the leading ones on a loader thread; ``on_done`` is called there
        once the load is ``done()`` (at once if the hit is all in T0).

        The slots are taken now, so the load never waits for T0 room and cannot deadlock
        against running sequences. Raises ``CacheFullError`` (nothing reserved) when T0 has
        not that many free or evictable slots.
        """
        if num_blocks < hit.num_blocks:
            raise ValueError(f"{num_blocks} blocks cannot hold a hit of {hit.num_blocks}")
        job = self._reserve(prefix, hit, num_blocks, fit=False)
        job.load._on_done = on_done
        if all(tier is Tier.T0 for tier in job.origin):
            self._run_load(job)  # all in T0: nothing to copy
        else:
            self._loader.submit(job)
        return job.load

    def cancel_load(self, load: PrefixLoad) -> None:
        """Give up a ``start_load``: its slots are released once it is done (now if it is)."""
        with self._lock:
            if load._cancelled:
                return
            load._cancelled = True
            if load.done():
                self._release_owned(load.block_table)

    def allocate(self, n: int) -> list[int]:
        """``n`` private, referenced T0 slots for new KV; evicts (and spills) LRU blocks if needed.

        Raises ``CacheFullError`` when fewer than ``n`` slots are free or evictable.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        with self._lock:
            short = n > self._t0.num_evictable and bool(self._pending_t1)
        if short:
            # Write-through copies reference their T0 source until done; they are memcpy-fast, so
            # wait for them rather than fail.
            self._t1_writer.join()
        with self._lock:
            slots, evicted = self._t0.allocate(n)
            self._on_t0_evicted(evicted)
            return slots

    def commit(self, prefix: PrefixHasher, block_index: int, slot: int) -> bool:
        """Declare T0 ``slot`` to hold full block ``block_index`` of ``prefix``: shareable now.

        Returns False when another slot already holds that block (the caller's copy stays
        private and is freed on release). Copies down start per write policy.
        """
        if not 0 <= block_index < prefix.num_full_blocks:
            raise ValueError(
                f"block {block_index} is not full: the sequence has {prefix.num_full_blocks} full blocks"
            )
        meta = BlockMeta(
            prefix.hashes[block_index], prefix.parent_of(block_index),
            tuple(prefix.block_tokens(block_index)), prefix.namespace,
        )
        with self._lock:
            self._check_owned(slot)
            current = self._t0.meta(slot)
            if current is not None:
                if current.block_hash == meta.block_hash:
                    return True
                raise ValueError(f"T0 slot {slot} already holds a different committed block")
            self._stats.committed_blocks += 1
            if not self._t0.publish(slot, meta):
                return False
            if self.config.t0_t1_policy is WritePolicy.WRITE_THROUGH:
                self._queue_t1(slot, meta)
            return True

    def release(self, slots: Sequence[int]) -> None:
        """Drop the references ``allocate`` or ``load`` took; cached blocks become evictable."""
        with self._lock:
            self._release_owned(slots)

    def prefer(self, block_hashes: Sequence[bytes], ttl_s: float) -> None:
        """Evict these blocks from T0 and T1 only after all others, for ``ttl_s`` seconds
        (the blocks of pinned sessions; they need not be cached yet)."""
        until = time.monotonic() + ttl_s
        with self._lock:
            self._t0.prefer(list(block_hashes), until)
            self._t1.prefer(list(block_hashes), until)

    def held_blocks(self) -> list[BlockEvent]:
        """A stored event for every block findable in T0 and T1 now: what a router that
        missed events starts again from."""
        with self._lock:
            return [BlockEvent.of(tier, True, meta) for tier, index in ((Tier.T0, self._t0), (Tier.T1, self._t1))
                    for meta in index.cached()]

    def drop_namespace(self, namespace: str) -> tuple[int, int]:
        """Forget ``namespace``'s blocks in T0 and T1 (an admin flush; call ``flush`` first, so
        no copy in flight brings one back): none is reused again; slots that running sequences
        hold are freed when they let go. Returns the (T0, T1) blocks dropped."""
        match = lambda meta: meta.namespace == namespace  # noqa: E731
        with self._lock:
            return self._t0.drop(match), self._t1.drop(match)

    def flush(self) -> None:
        """Wait until every prefix load and background copy queued so far has completed."""
        self._loader.join()
        self._t1_writer.join()
        if self._t2_writer is not None:
            self._t2_writer.join()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._loader.close()
        self._t1_writer.close()
        if self._t2_writer is not None:
            self._t2_writer.close()

    def __enter__(self) -> TieredKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> CacheStats:
        with self._lock:
            s = dataclasses.replace(
                self._stats,
                loaded_blocks=list(self._stats.loaded_blocks),
                loaded_tokens=list(self._stats.loaded_tokens),
            )
            s.t0_cached, s.t0_in_use = len(self._t0), self._t0.num_in_use
            s.t1_cached, s.t1_in_use = len(self._t1), self._t1.num_in_use
            s.evicted_t0, s.evicted_t1 = self._t0.evictions, self._t1.evictions
            s.t0_blocks, s.t1_blocks = self.config.t0_blocks, self.config.t1_blocks
            s.bytes_per_block = self.spec.bytes_per_block
            return s

    def cached_slots(self, tier: Tier) -> dict[bytes, int]:
        """Hash -> slot of every visible block in a local tier (a snapshot)."""
        index = {Tier.T0: self._t0, Tier.T1: self._t1}[tier]
        with self._lock:
            return dict(index._slot_of)

    def check_invariants(self) -> None:
        """Verify slot bookkeeping of both local tiers (tests)."""
        with self._lock:
            self._t0.check()
            self._t1.check()

    # ---- internals (callers hold the lock unless noted) -----------------------------

    def _check_owned(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self._t0.num_slots:
            raise ValueError(f"T0 slot {slot!r} out of range [0, {self._t0.num_slots})")
        if self._t0.refs(slot) == 0:
            raise ValueError(f"T0 slot {slot} is not in use: it was never allocated or loaded, or already released")

    def _release_owned(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self._check_owned(slot)
        for slot in slots:
            self._t0.release(slot)

    def _reserve(self, prefix: PrefixHasher, hit: PrefixHit, num_blocks: int | None, fit: bool) -> _LoadJob:
        """Reference the hit's sources and take T0 slots for ``num_blocks`` (None: the hit's).

        Blocks in T0 are shared in place; every other block gets a private T0 slot, filled
        from T1 or T2. A T0 block after a T2 block also gets a spare private slot: if the T2
        transfer fails before it, the spare takes its place, so recomputing never writes into
        a shared block (spares not needed are freed when the load ends). ``fit``: take fewer
        blocks if T0 lacks room, instead of raising ``CacheFullError``.
        """
        sources: list[tuple[Tier, int | None]] = []

        def first_t2() -> int:
            return next((i for i, (t, _) in enumerate(sources) if t is Tier.T2), len(sources))

        def slots_needed(total: int) -> int:  # private slots and spares
            spares = sum(t is Tier.T0 for t, _ in sources[first_t2():])
            return total - sum(t is Tier.T0 for t, _ in sources) + spares

        with self._lock:
            for h, tier in zip(hit.hashes, hit.tiers):
                if (slot := self._t0.find(h)) is not None:
                    self._t0.acquire(slot)
                    sources.append((Tier.T0, slot))
                elif (slot := self._t1.find(h)) is not None:
                    self._t1.acquire(slot)
                    sources.append((Tier.T1, slot))
                elif tier is Tier.T2 and self.remote is not None:
                    sources.append((Tier.T2, None))
                else:
                    break
            if fit:
                while slots_needed(len(sources)) > self._t0.num_evictable:
                    self._release_sources([sources.pop()])
                slots, evicted = self._t0.allocate(slots_needed(len(sources)))
                self._on_t0_evicted(evicted)
        total = len(sources) if num_blocks is None else num_blocks
        while not fit:
            try:
                slots = self.allocate(slots_needed(total))
                break
            except CacheFullError:
                cut = first_t2()
                with self._lock:
                    if not any(t is Tier.T0 for t, _ in sources[cut:]):
                        self._release_sources(sources)
                        raise
                    # No room for the spares: recompute from that T2 block instead (as many
                    # slots as the sequence needs without any cache).
                    self._release_sources(sources[cut:])
                    del sources[cut:]
        private = iter(slots)
        table = [slot if t is Tier.T0 else next(private) for t, slot in sources]
        table += [next(private) for _ in range(total - len(sources))]
        load = PrefixLoad(table, self.spec.block_size)  # type: ignore[arg-type]
        return _LoadJob(load, prefix, sources, [t for t, _ in sources], list(private))

    def _run_loads(self, jobs: list[_LoadJob]) -> None:
        for job in jobs:
            self._run_load(job)

    def _run_load(self, job: _LoadJob) -> None:
        """Fetch T2 blocks into T1, copy the T1 blocks into their reserved T0 slots, publish
        them. Never raises: a failed transfer ends the prefix there (the caller recomputes), a
        failed copy sets ``error`` (the request cannot be served)."""
        load, bpb = job.load, self.spec.bytes_per_block
        sources = job.sources
        table = load.block_table
        # Blocks in T1 to copy into their T0 slots: the T1 ones, then each T2 one once decoded,
        # copied in batches while the rest of the transfer streams in.
        pending = [(slot, table[i]) for i, (tier, slot) in enumerate(sources) if tier is Tier.T1]
        failure: list[Exception] = []  # a copy failed: stop the transfer

        def copy() -> None:
            if not pending:
                return
            t = time.perf_counter()
            restore(self.t1, self.t0, [s1 for s1, _ in pending], [s0 for _, s0 in pending], background=True)
            load.restore_s += time.perf_counter() - t
            load.restore_bytes += len(pending) * bpb
            pending.clear()

        def decoded(i: int, t1_slot: int) -> None:
            pending.append((t1_slot, table[i]))
            if len(pending) >= _RESTORE_BATCH and not failure:
                try:
                    copy()
                except Exception as e:  # raised below, outside the transfer
                    failure.append(e)

        try:
            t = time.perf_counter()
            sources = self._fetch_remote(job.prefix, sources, lambda: load._cancelled or bool(failure), decoded)
            if failure:
                raise failure[0]
            copy()
            if Tier.T2 in job.origin:
                load.fetch_s = time.perf_counter() - t - load.restore_s
                load.fetch_bytes = sum(tier is Tier.T2 for tier in job.origin[:len(sources)]) * bpb
        except Exception as e:  # a device error: this request cannot be served, the others go on
            log.exception("copying a prefix into T0 failed")
            load.error = f"{type(e).__name__}: {e}"
        load.failed = len(sources) < len(job.sources)
        with self._lock:
            for i in range(len(sources)):
                tier, s0 = job.origin[i], table[i]
                if tier is not Tier.T0:
                    s1 = sources[i][1]
                    meta = self._t1.meta(s1)  # type: ignore[arg-type]
                    if not load.error and meta is not None:
                        self._t0.publish(s0, meta)  # type: ignore[arg-type]  # False: a copy is cached already; ours stays private
                    self._t1.release(s1)  # type: ignore[arg-type]
                else:
                    meta = self._t0.meta(s0)
                if not load.error:
                    load.from_tier[tier] += 1
                    self._stats.loaded_blocks[tier] += 1
                    self._stats.loaded_tokens[tier] += self.spec.block_size
                    if meta is not None:  # None: dropped by a flush meanwhile (its KV is still good)
                        self._on_hit(s0, meta)
            for i in range(len(sources), len(job.sources)):  # the transfer failed before it: its pin went too
                if job.origin[i] is Tier.T0:
                    table[i] = job.spares.pop()
            for slot in job.spares:
                self._t0.release(slot)
            promoted = 0 if load.error else len(sources) - load.from_tier[Tier.T0]
            self._stats.promoted_blocks += promoted
            self._stats.promoted_bytes += promoted * bpb
            load.num_blocks = 0 if load.error else len(sources)
            load._done.set()
            if load._cancelled:
                self._release_owned(load.block_table)
        if load._on_done is not None:
            load._on_done()

    def _remote_lookup(self, namespace: str, hashes: list[bytes]) -> int:
        assert self.remote is not None
        try:
            found = int(self.remote.lookup(namespace, hashes))
        except Exception as e:  # the cold tier being down must never fail a request
            log.warning("T2 lookup failed, treating as miss: %s", e)
            with self._lock:
                self._stats.t2_errors += 1
            return 0
        return max(0, min(found, len(hashes)))

    def _fetch_remote(self, prefix: PrefixHasher, sources: list[tuple[Tier, int | None]],
                      cancelled: Callable[[], bool], decoded: Callable[[int, int], None]):
        """Get T2 blocks into fresh T1 slots; cut the prefix at the first one that fails (or
        once ``cancelled()``). ``decoded(source index, T1 slot)`` follows each good block."""
        wanted = [i for i, (t, _) in enumerate(sources) if t is Tier.T2]
        if not wanted:
            return sources
        assert self.remote is not None
        hashes = [prefix.hashes[i] for i in wanted]
        # Blocks are decoded as they arrive, while the rest are still on the way. A T1 slot
        # is reserved per block that came back, so a miss, an error or a full T1 ends the
        # prefix without evicting T1 blocks for nothing.
        done: list[tuple[int, int, BlockMeta, int]] = []  # (source index, slot, meta, size)
        unused: list[int] = []  # reserved, but the block turned out unusable
        corrupt: list[bytes] = []  # deleted once the transfer is over (not inside its deadline)
        found = None
        try:
            found = self.remote.get_iter(prefix.namespace, hashes)
            for k, blob in found:
                if k != len(done) or cancelled():  # a miss ends the prefix
                    break
                with self._lock:
                    if not self._t1.num_evictable:
                        break
                    slots, evicted = self._t1.allocate(1)
                    self._on_t1_evicted(evicted)
                unused.append(slots[0])  # until its block decodes
                meta = self._verify_remote_block(prefix, wanted[k], blob, slots[0])
                if meta is None:
                    corrupt.append(prefix.hashes[wanted[k]])
                    break
                done.append((wanted[k], unused.pop(), meta, len(blob)))
                decoded(wanted[k], slots[0])
        except Exception as e:  # the cold tier failing must never fail a request
            log.warning("T2 get failed, treating as miss: %s", e)
            with self._lock:
                self._stats.t2_errors += 1
        finally:
            if found is not None:
                found.close()  # stops the transfer of blocks past the cut
        if corrupt:  # remove it for every worker, not just this one
            try:
                self.remote.delete(prefix.namespace, corrupt, corrupt=True)
                if self._emit:
                    with self._lock:
                        self._emit(BlockEvent(Tier.T2, False, corrupt[0], prefix.namespace))
            except Exception as e:
                log.warning("could not delete corrupt T2 block %s: %s", corrupt[0].hex(), e)
        cut = len(sources) if len(done) == len(wanted) else wanted[len(done)]
        with self._lock:
            for i, slot, meta, size in done:
                self._stats.t2_get_blocks += 1
                self._stats.t2_get_bytes += size
                if not self._t1.publish(slot, meta):  # someone else brought it in meanwhile
                    self._t1.release(slot)
                    slot = self._t1.find(meta.block_hash)
                    self._t1.acquire(slot)
                sources[i] = (Tier.T1, slot)
            for slot in unused:
                self._t1.release(slot)
            self._release_sources(sources[cut:])
        return sources[:cut]

    def _verify_remote_block(self, prefix: PrefixHasher, i: int, blob: bytes | memoryview, slot: int) -> BlockMeta | None:
        """Decode a T2 block straight into a T1 slot; None (logged, counted) if unusable. No lock."""
        h = prefix.hashes[i]
        try:
            hdr, _ = decode_block(
                blob, out=self.t1.block_bytes(slot), expect_fingerprint=self.spec.fingerprint,
                expect_hash=h, expect_dtype=self.spec.dtype, expect_shape=self.spec.block_shape,
            )
            if hdr.parent_hash != prefix.parent_of(i) or list(hdr.token_ids) != prefix.block_tokens(i):
                raise BlockCodecError("parent hash or token ids differ from the sequence's")
        except BlockCodecError as e:
            log.warning("T2 block %s unusable, recomputing: %s", h.hex(), e)
            with self._lock:
                self._stats.t2_corrupt += 1
            return None
        return BlockMeta(h, hdr.parent_hash, hdr.token_ids, prefix.namespace, in_remote=True)

    def _on_hit(self, t0_slot: int, meta: BlockMeta) -> None:
        meta.hits += 1
        if meta.hits < self.config.selective_hits:
            return
        if self.config.t0_t1_policy is WritePolicy.SELECTIVE:
            self._queue_t1(t0_slot, meta)
        if self.config.t1_t2_policy is WritePolicy.SELECTIVE and (s1 := self._t1.find(meta.block_hash)) is not None:
            self._queue_t2(s1, meta)

    def _release_sources(self, sources: Sequence[tuple[Tier, int | None]]) -> None:
        for tier, slot in sources:
            if tier is Tier.T0:
                self._t0.release(slot)  # type: ignore[arg-type]
            elif tier is Tier.T1:
                self._t1.release(slot)  # type: ignore[arg-type]

    def _on_t0_evicted(self, evicted: list[tuple[int, BlockMeta]]) -> None:
        """Spill evicted T0 blocks to T1 (write-back) before their slots are reused."""
        if not evicted or self.config.t0_t1_policy is not WritePolicy.WRITE_BACK:
            return
        todo = [(s, m) for s, m in evicted if m.block_hash not in self._t1 and m.block_hash not in self._pending_t1]
        room = min(len(todo), self._t1.num_evictable)
        self._stats.dropped_writes += len(todo) - room
        todo = todo[:room]
        t1_slots, evicted_t1 = self._t1.allocate(room)
        self._on_t1_evicted(evicted_t1)
        spill(self.t0, self.t1, [s for s, _ in todo], t1_slots)
        self._stats.spilled_blocks += room
        self._stats.spilled_bytes += room * self.spec.bytes_per_block
        for s1, (_, meta) in zip(t1_slots, todo):
            self._publish_t1(s1, meta)

    def _on_t1_evicted(self, evicted: list[tuple[int, BlockMeta]]) -> None:
        """Write evicted T1 blocks to T2 (write-back): encode now, before the slot is reused."""
        if not evicted or self.remote is None or self.config.t1_t2_policy is not WritePolicy.WRITE_BACK:
            return
        for slot, meta in evicted:
            if meta.in_remote or meta.block_hash in self._pending_t2:
                continue
            if self._t2_writer.submit((meta, None, self._encode(slot, meta))):  # type: ignore[union-attr]
                self._pending_t2.add(meta.block_hash)
            else:
                self._stats.dropped_writes += 1

    def _publish_t1(self, slot: int, meta: BlockMeta) -> None:
        """Make a freshly copied T1 block visible, start its T2 write per policy, release it."""
        if self._t1.publish(slot, meta) and self.remote is not None and not meta.in_remote:
            policy = self.config.t1_t2_policy
            if policy is WritePolicy.WRITE_THROUGH or (
                policy is WritePolicy.SELECTIVE and meta.hits >= self.config.selective_hits
            ):
                self._queue_t2(slot, meta)
        self._t1.release(slot)

    def _queue_t1(self, t0_slot: int, meta: BlockMeta) -> None:
        h = meta.block_hash
        if h in self._t1 or h in self._pending_t1:
            return
        self._t0.acquire(t0_slot)  # the copy reads it outside the lock
        if self._t1_writer.submit((t0_slot, meta)):
            self._pending_t1.add(h)
        else:
            self._t0.release(t0_slot)
            self._stats.dropped_writes += 1

    def _queue_t2(self, t1_slot: int, meta: BlockMeta) -> None:
        if self.remote is None or meta.in_remote or meta.block_hash in self._pending_t2:
            return
        self._t1.acquire(t1_slot)  # encoded outside the lock
        if self._t2_writer.submit((meta, t1_slot, None)):  # type: ignore[union-attr]
            self._pending_t2.add(meta.block_hash)
        else:
            self._t1.release(t1_slot)
            self._stats.dropped_writes += 1

    def _encode(self, t1_slot: int, meta: BlockMeta) -> bytes:
        return encode_block(
            self.t1.block_bytes(t1_slot), dtype=self.spec.dtype, shape=self.spec.block_shape,
            fingerprint=self.spec.fingerprint, block_hash=meta.block_hash,
            parent_hash=meta.parent_hash, token_ids=meta.token_ids, codec=self.config.codec,
            min_saving=self.config.codec_min_saving,
        )

    def _write_t1_batch(self, items: list[tuple[int, BlockMeta]]) -> None:
        """Background: T0 -> T1 write-through copies (T0 slots referenced by _queue_t1)."""
        with self._lock:
            room = min(len(items), self._t1.num_evictable)
            t1_slots, evicted = self._t1.allocate(room)
            self._on_t1_evicted(evicted)
        copied = False
        try:
            spill(self.t0, self.t1, [s for s, _ in items[:room]], t1_slots, background=True)
            copied = True
        finally:
            with self._lock:
                for s1, (_, meta) in zip(t1_slots, items):
                    if copied:
                        self._publish_t1(s1, meta)
                    else:
                        self._t1.release(s1)
                for s0, meta in items:
                    self._t0.release(s0)
                    self._pending_t1.discard(meta.block_hash)
                done = room if copied else 0
                self._stats.spilled_blocks += done
                self._stats.spilled_bytes += done * self.spec.bytes_per_block
                self._stats.dropped_writes += len(items) - done

    def _write_t2_batch(self, items: list[tuple[BlockMeta, int | None, bytes | None]]) -> None:
        """Background: encode (T1 slots referenced by _queue_t2) and put to T2, grouped by namespace."""
        by_ns: dict[str, list[tuple[BlockMeta, bytes]]] = {}
        failed: list[BlockMeta] = []
        for meta, slot, blob in items:
            try:
                if blob is None:
                    blob = self._encode(slot, meta)  # type: ignore[arg-type]
                by_ns.setdefault(meta.namespace, []).append((meta, blob))
            except Exception:
                log.exception("encoding block %s for T2 failed", meta.block_hash.hex())
                failed.append(meta)
            finally:
                if slot is not None:
                    with self._lock:
                        self._t1.release(slot)
        if failed:
            with self._lock:
                self._stats.dropped_writes += len(failed)
        assert self.remote is not None
        for ns, blocks in by_ns.items():
            ok = True
            try:
                self.remote.put(ns, [(m.block_hash, b) for m, b in blocks])
            except Exception as e:
                ok = False
                log.warning("T2 put of %d blocks failed (dropped): %s", len(blocks), e)
            with self._lock:
                if ok:
                    self._stats.t2_put_blocks += len(blocks)
                    self._stats.t2_put_bytes += sum(len(b) for _, b in blocks)
                else:
                    self._stats.t2_errors += 1
                    self._stats.dropped_writes += len(blocks)
                for m, _ in blocks:
                    m.in_remote = m.in_remote or ok
                    if ok and self._emit:
                        self._emit(BlockEvent.of(Tier.T2, True, m))
        with self._lock:
            for meta, _, _ in items:
                self._pending_t2.discard(meta.block_hash)
