"""TieredKVCache: tiers, policies, failure handling. T2 is the in-memory fake here; the real
block store is exercised by the integration tests of the cold tier."""
import threading

import pytest
import torch
from fakes import MemoryRemote
from kvhelpers import SPEC, evict_all_t0, make, prefill, prefix, seed_remote, t0_holds, t1_holds, write_block

from kvstore.cache import CacheConfig, CacheFullError, Tier, TieredKVCache, WritePolicy

BS = SPEC.block_size


def test_lookup_finds_committed_prefix_capped_at_last_token():
    with make() as cache:
        p = prefix(range(3 * BS))  # exactly 3 full blocks
        assert cache.lookup(p).num_blocks == 0
        cache.release(prefill(cache, p))
        hit = cache.lookup(p)
        assert hit.tiers == [Tier.T0, Tier.T0]  # the 3rd block holds the last token: computed
        longer = prefix(range(3 * BS + 1))
        assert cache.lookup(longer).num_blocks == 3
        assert cache.lookup(longer, num_tokens=2 * BS).num_blocks == 1


def test_spill_then_promote_is_bit_identical():
    with make(t0=5, t1=16) as cache:
        p = prefix(range(4 * BS + 1))
        cache.release(prefill(cache, p))
        evict_all_t0(cache)  # write-back spills all four to T1
        assert cache.lookup(p).tiers == [Tier.T1] * 4
        assert cache.stats().spilled_blocks == 4
        for h, slot in cache.cached_slots(Tier.T1).items():
            assert t1_holds(cache, slot, h)
        cache.t0.kv.zero_()
        loaded = cache.load(p, cache.lookup(p))
        assert loaded.from_tier == [0, 4, 0]
        for i, slot in enumerate(loaded.block_table):
            assert t0_holds(cache, slot, p.hashes[i])
        cache.release(loaded.block_table)
        cache.check_invariants()


def test_gap_in_prefix_ends_the_hit():
    with make() as cache:
        p = prefix(range(5 * BS))
        slots = cache.allocate(5)
        for i in (0, 1, 3, 4):  # block 2 never committed
            write_block(cache, slots[i], p.hashes[i])
            cache.commit(p, i, slots[i])
        cache.release(slots)
        assert cache.lookup(p).num_blocks == 2


def test_shared_prefix_is_reused_not_duplicated():
    with make(t0=8) as cache:
        a = prefix(list(range(2 * BS)) + [7] * BS + [1])
        b = prefix(list(range(2 * BS)) + [9] * BS + [1])
        table_a = prefill(cache, a)
        table_b = prefill(cache, b)
        assert table_a[:2] == table_b[:2]  # same slots: one copy, two pins
        assert table_a[2] != table_b[2]
        cache.release(table_a)
        cache.release(table_b)
        assert cache.stats().t0_cached == 4


def test_remote_round_trip_to_another_worker():
    remote = MemoryRemote()
    p = prefix(range(3 * BS + 2))
    seed_remote(remote, p)
    with make(t0=4, t1=4, remote=remote) as b:  # a second worker, empty local tiers
        hit = b.lookup(p)
        assert hit.tiers == [Tier.T2] * 3
        loaded = b.load(p, hit)
        assert loaded.from_tier == [0, 0, 3]
        for i, slot in enumerate(loaded.block_table):
            assert t0_holds(b, slot, p.hashes[i])
        b.release(loaded.block_table)
        assert b.lookup(p).tiers == [Tier.T0] * 3  # promoted: T2 -> T1 -> T0
        assert len(b.cached_slots(Tier.T1)) == 3
        b.flush()
        assert b.stats().t2_put_blocks == 0  # blocks read from T2 are not written back


def test_namespaces_do_not_share_blocks():
    remote = MemoryRemote()
    with make(remote=remote) as cache:
        cache.release(prefill(cache, prefix(range(2 * BS + 1), namespace="alice")))
        assert cache.lookup(prefix(range(2 * BS + 1), namespace="bob")).num_blocks == 0


def test_corrupt_remote_block_is_a_miss_and_later_blocks_are_recomputed():
    remote = MemoryRemote()
    p = prefix(range(3 * BS + 1))
    seed_remote(remote, p)
    key = ("tenant", p.hashes[1])
    blob = bytearray(remote.blocks[key])
    blob[-5] ^= 0x40
    remote.blocks[key] = bytes(blob)
    with make(t0=4, t1=3, remote=remote) as b:
        assert b.lookup(p).num_blocks == 3  # existence looks fine
        loaded = b.load(p, b.lookup(p))
        assert loaded.num_blocks == 1 and t0_holds(b, loaded.block_table[0], p.hashes[0])
        assert b.stats().t2_corrupt == 1
        assert remote.corrupt_reports == 1 and key not in remote.blocks  # deleted for everyone
        b.release(loaded.block_table)
        b.check_invariants()  # the slots reserved for the cut blocks went back


def test_remote_down_means_misses_not_errors():
    remote = MemoryRemote()
    p = prefix(range(2 * BS + 1))
    seed_remote(remote, p)
    remote.down = True
    with make(t0=3, t1=2, remote=remote) as b:
        assert b.lookup(p).num_blocks == 0
        b.release(prefill(b, p))  # computes, commits; the write-through fails quietly
        evict_all_t0(b)
        b.flush()
        s = b.stats()
        assert s.t2_errors >= 2 and s.dropped_writes >= 1
        assert b.lookup(p).tiers == [Tier.T1, Tier.T1]


def test_write_through_t0_t1_copies_on_commit():
    with make(t0_t1_policy="write_through") as cache:
        p = prefix(range(2 * BS + 1))
        table = prefill(cache, p)
        cache.flush()
        t1 = cache.cached_slots(Tier.T1)
        assert set(t1) == set(p.hashes) and all(t1_holds(cache, s, h) for h, s in t1.items())
        assert cache.lookup(p).tiers == [Tier.T0, Tier.T0]  # still hot
        cache.release(table)


def test_write_back_t0_t1_copies_only_on_eviction():
    with make(t0=3, t0_t1_policy="write_back") as cache:
        p = prefix(range(2 * BS + 1))
        cache.release(prefill(cache, p))
        cache.flush()
        assert cache.cached_slots(Tier.T1) == {}
        evict_all_t0(cache)
        assert set(cache.cached_slots(Tier.T1)) == set(p.hashes)


def test_selective_copies_on_second_hit():
    with make(t0_t1_policy="selective", selective_hits=2) as cache:
        p = prefix(range(2 * BS + 1))
        cache.release(prefill(cache, p))
        for expected in (set(), set(p.hashes)):
            cache.release(cache.load(p, cache.lookup(p)).block_table)
            cache.flush()
            assert set(cache.cached_slots(Tier.T1)) == expected
        evict_all_t0(cache)  # selective does not also write back
        assert set(cache.cached_slots(Tier.T1)) == set(p.hashes)
    with make(t0=3, t0_t1_policy="selective") as cache:
        cache.release(prefill(cache, p))
        evict_all_t0(cache)  # never hit twice: dropped, not spilled
        assert cache.cached_slots(Tier.T1) == {}


def test_off_copies_nothing_down():
    remote = MemoryRemote()
    with make(t0=3, remote=remote, t0_t1_policy=WritePolicy.OFF) as cache:
        p = prefix(range(2 * BS + 1))
        cache.release(prefill(cache, p))
        cache.release(cache.load(p, cache.lookup(p)).block_table)  # a hit: not copied down either
        evict_all_t0(cache)
        cache.flush()
        assert cache.cached_slots(Tier.T1) == {} and remote.blocks == {}
        assert cache.lookup(p).num_blocks == 0


def test_t1_t2_write_back_writes_on_t1_eviction():
    remote = MemoryRemote()
    with make(t0=3, t1=2, remote=remote, t1_t2_policy=WritePolicy.WRITE_BACK) as cache:
        p = prefix(range(2 * BS + 1))
        cache.release(prefill(cache, p))
        evict_all_t0(cache)
        cache.flush()
        assert remote.blocks == {}
        q = prefix(range(100, 100 + 2 * BS + 1))
        cache.release(prefill(cache, q))
        evict_all_t0(cache)  # q's blocks push p's out of T1 into T2
        cache.flush()
        assert {h for _, h in remote.blocks} == set(p.hashes)


def test_bad_calls_raise_clear_errors():
    with make(t0=2) as cache:
        p = prefix(range(BS + 1))
        with pytest.raises(ValueError, match="not in use"):
            cache.release([0])
        with pytest.raises(ValueError, match="out of range"):
            cache.release([99])
        slots = cache.allocate(2)
        with pytest.raises(CacheFullError, match="in use"):
            cache.allocate(1)
        with pytest.raises(ValueError, match="not full"):
            cache.commit(p, 1, slots[1])
        write_block(cache, slots[0], p.hashes[0])
        assert cache.commit(p, 0, slots[0])
        other = prefix(range(50, 50 + BS + 1))
        with pytest.raises(ValueError, match="different committed block"):
            cache.commit(other, 0, slots[0])
        cache.release(slots)
        with pytest.raises(ValueError, match="not in use"):
            cache.release(slots)
        cache.check_invariants()


def test_concurrent_sequences_with_background_writers():
    remote = MemoryRemote()
    cfg = dict(t0=48, t1=24, remote=remote, t0_t1_policy="write_through")
    errors: list[BaseException] = []
    with make(**cfg) as cache:
        def run(worker: int) -> None:
            try:
                for turn in range(25):
                    # 4 shared system prompts, private continuations
                    toks = [turn % 4] * (2 * BS) + [worker, turn] * BS + [1]
                    p = prefix(toks)
                    table = prefill(cache, p)
                    for i, slot in enumerate(table[: p.num_full_blocks]):
                        assert t0_holds(cache, slot, p.hashes[i]), (worker, turn, i)
                    cache.release(table)
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        cache.flush()
        cache.check_invariants()
        s = cache.stats()
        assert s.t0_in_use == 0 and s.t1_in_use == 0
        for tier, holds in ((Tier.T0, t0_holds), (Tier.T1, t1_holds)):
            for h, slot in cache.cached_slots(tier).items():
                assert holds(cache, slot, h)
        assert s.loaded_blocks[0] > 0 and s.t2_put_blocks > 0


def test_stats_count_bytes_and_hits_per_tier():
    remote = MemoryRemote()
    p = prefix(range(2 * BS + 1))
    seed_remote(remote, p)
    with make(t0=3, t1=2, remote=remote) as b:
        b.release(b.load(p, b.lookup(p)).block_table)
        s = b.stats()
        assert s.loaded_blocks == [0, 0, 2] and s.loaded_tokens == [0, 0, 2 * BS]
        assert s.t2_get_blocks == 2 and s.t2_get_bytes == sum(len(v) for v in remote.blocks.values())
        assert s.promoted_blocks == 2 and s.promoted_bytes == 2 * SPEC.bytes_per_block
        assert s.lookups == 1 and s.lookup_tokens == p.num_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_round_trip_through_every_tier(dtype):
    from kvstore.spec import KVSpec
    spec = KVSpec(2, 1, 8, dtype, BS, "other")
    remote = MemoryRemote()
    p = prefix(range(2 * BS + 1), spec=spec)
    kv = torch.randn(2, *spec.block_shape).to(dtype)
    kv[0, 0, 0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    with TieredKVCache(spec, CacheConfig(t0_blocks=2, t1_blocks=2), remote=remote) as a:
        slots = a.allocate(2)
        for i, s in enumerate(slots):
            a.t0.kv[:, :, s] = kv[i]
            a.commit(p, i, s)
        a.release(slots)
        evict_all_t0(a)
        a.flush()
    with TieredKVCache(spec, CacheConfig(t0_blocks=2, t1_blocks=2), remote=remote) as b:
        loaded = b.load(p, b.lookup(p))
        assert loaded.from_tier == [0, 0, 2]
        for i, s in enumerate(loaded.block_table):
            got = b.t0.kv[:, :, s].contiguous().view(torch.uint8)
            assert torch.equal(got, kv[i].contiguous().view(torch.uint8))


def test_failed_remote_get_does_not_evict_t1():
    remote = MemoryRemote()
    p = prefix(range(3 * BS + 1))
    seed_remote(remote, p)
    with make(t0=8, t1=2, remote=remote) as cache:
        q = prefix(range(500, 500 + 2 * BS + 1))
        cache.release(prefill(cache, q))
        cache.release(cache.allocate(8))  # q's blocks now only in T1 (full: 2 slots)
        cache.flush()  # their T2 writes done: T1 slots unpinned, so evictable
        hit = cache.lookup(p)
        assert hit.tiers == [Tier.T2] * 3
        remote.down = True  # gone between lookup and get
        loaded = cache.load(p, hit)
        assert loaded.num_blocks == 0 and cache.stats().t2_errors == 1
        assert set(cache.cached_slots(Tier.T1)) == set(q.hashes)  # nothing evicted for nothing
        cache.check_invariants()


def test_block_events_track_what_each_tier_holds():
    """Replaying the events gives exactly the blocks each local tier holds (a router's view)."""
    from kvstore.cache import BlockEvent

    events: list[BlockEvent] = []
    cfg = CacheConfig(t0_blocks=6, t1_blocks=4, t0_t1_policy="write_through")
    with TieredKVCache(SPEC, cfg, on_block_event=events.append) as cache:
        for seed in range(5):
            cache.release(prefill(cache, prefix([seed] * (3 * BS) + [1])))
            cache.flush()
        view = {Tier.T0: set(), Tier.T1: set()}
        for e in events:
            (view[e.tier].add if e.stored else view[e.tier].discard)(e.block_hash)
        assert view[Tier.T0] == set(cache.cached_slots(Tier.T0))
        assert view[Tier.T1] == set(cache.cached_slots(Tier.T1))
        assert any(not e.stored for e in events)  # evictions were reported too
        # A router that missed events starts again from a snapshot: the same view, with what it needs to chain them.
        held = cache.held_blocks()
        assert {t: {e.block_hash for e in held if e.tier is t} for t in view} == view
        latest = {(e.tier, e.block_hash): e for e in events if e.stored}
        assert all(e.stored and e == latest[e.tier, e.block_hash] for e in held)


def test_dropping_a_namespace_forgets_its_blocks_in_t0_and_t1_and_frees_held_slots_on_release():
    """An admin flush: the namespace's blocks are found nowhere afterwards, another namespace's
    stay, and a running sequence's blocks keep serving it until it lets them go."""
    with make(t0=12, t1=16, t0_t1_policy="write_through") as cache:
        a = prefix([1] * (3 * BS) + [2], namespace="a")
        b = prefix([1] * (3 * BS) + [2], namespace="b")
        cache.release(prefill(cache, a))
        held = prefill(cache, prefix([5] * (2 * BS) + [2], namespace="a"))  # still running
        cache.release(prefill(cache, b))
        cache.flush()
        assert cache.drop_namespace("a") == (5, 5)  # 3 + 2 full blocks in T0, written through to T1
        assert cache.lookup(a).num_blocks == 0 and cache.lookup(b).num_blocks == 3
        cache.check_invariants()
        in_use = cache.stats().t0_in_use
        cache.release(held)
        assert cache.stats().t0_in_use == in_use - len(held) and cache.stats().t0_cached == 3
        cache.check_invariants()
