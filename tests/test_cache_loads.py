"""TieredKVCache.start_load: T0 slots for the whole sequence are taken up front, the prefix
comes in on a loader thread, a load cut short leaves only private slots after the cut, a
cancelled load frees its slots when it ends. T2 is the in-memory fake (unit tests of the
cache); the engine's tests use the real block store."""
import threading

import numpy as np
import pytest
import torch
from fakes import MemoryRemote
from kvhelpers import SPEC, evict_all_t0, make, prefill, prefix, seed_remote, t0_holds, write_block

from kvstore.cache import CacheFullError, Tier
from kvstore.pools import DevicePool, HostPool, restore

BS = SPEC.block_size


class GatedRemote(MemoryRemote):
    """Gets wait until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def get_iter(self, namespace, hashes):
        assert self.gate.wait(timeout=20), "the test never opened the gate"
        yield from super().get_iter(namespace, hashes)


def t0_commit_only(cache, p, i):
    """Block ``i`` of ``p`` (not the ones before it) computed here: in T0 only."""
    (slot,) = cache.allocate(1)
    write_block(cache, slot, p.hashes[i])
    cache.commit(p, i, slot)
    cache.release([slot])
    return slot


def test_the_whole_sequence_is_reserved_and_the_prefix_loads_in_the_background():
    remote = GatedRemote()
    p = prefix(range(4 * BS + 1))
    seed_remote(remote, p)
    with make(t0=8, t1=8, remote=remote) as cache:
        shared = t0_commit_only(cache, p, 0)
        hit = cache.lookup(p)
        assert hit.tiers == [Tier.T0, Tier.T2, Tier.T2, Tier.T2]
        load = cache.start_load(p, hit, num_blocks=6)
        assert len(load.block_table) == 6 and load.block_table[0] == shared and not load.done()
        assert cache.stats().t0_in_use == 6  # reserved while the Get waits
        with pytest.raises(CacheFullError):
            cache.allocate(3)
        remote.gate.set()
        assert load.wait(timeout=20)
        assert (load.num_blocks, load.from_tier, load.failed) == (4, [1, 0, 3], False)
        assert load.fetch_bytes == load.restore_bytes == 3 * SPEC.bytes_per_block
        for i in range(4):
            assert t0_holds(cache, load.block_table[i], p.hashes[i])
        assert not set(load.block_table[4:]) & set(cache.cached_slots(Tier.T0).values())  # private: to compute
        cache.release(load.block_table)
        cache.check_invariants()
        assert cache.stats().t0_in_use == 0


def test_a_sequence_that_does_not_fit_reserves_nothing():
    remote = MemoryRemote()
    p = prefix(range(3 * BS + 1))
    seed_remote(remote, p)
    with make(t0=4, t1=8, remote=remote) as cache:
        with pytest.raises(CacheFullError):
            cache.start_load(p, cache.lookup(p), num_blocks=5)
        with pytest.raises(ValueError, match="cannot hold"):
            cache.start_load(p, cache.lookup(p), num_blocks=2)
        s = cache.stats()
        assert s.t0_in_use == s.t1_in_use == 0 and remote.calls["get"] == 0


def test_a_load_cut_before_a_t0_block_puts_a_private_spare_in_its_place():
    remote = MemoryRemote()
    p = prefix(range(4 * BS + 1))
    seed_remote(remote, p)
    key = ("tenant", p.hashes[0])
    remote.blocks[key] = remote.blocks[key][:-1] + bytes([remote.blocks[key][-1] ^ 1])  # corrupt block 0
    with make(t0=8, t1=8, remote=remote) as cache:
        shared = t0_commit_only(cache, p, 1)  # block 1 is here, but after a block that is not
        hit = cache.lookup(p)
        assert hit.tiers == [Tier.T2] * 4
        load = cache.start_load(p, hit, num_blocks=5)
        assert load.wait(timeout=20)
        assert cache.stats().t0_in_use == 5  # its pin on block 1 was dropped
        assert (load.num_blocks, load.failed) == (0, True) and shared not in load.block_table
        assert not set(load.block_table) & set(cache.cached_slots(Tier.T0).values())
        assert t0_holds(cache, shared, p.hashes[1])  # the cached copy is untouched
        cache.release(load.block_table)
        cache.check_invariants()


def test_a_t0_block_after_a_gap_is_shared_and_its_spare_freed():
    with make(t0=8, t1=8) as cache:
        p = prefix(range(3 * BS + 1))
        cache.release(prefill(cache, p))
        evict_all_t0(cache)  # write-back: all three in T1
        shared = t0_commit_only(cache, p, 1)
        hit = cache.lookup(p)
        assert hit.tiers == [Tier.T1, Tier.T0, Tier.T1]
        load = cache.start_load(p, hit, num_blocks=4)
        assert load.wait(timeout=20) and load.from_tier == [1, 2, 0] and load.block_table[1] == shared
        for i in range(3):
            assert t0_holds(cache, load.block_table[i], p.hashes[i])
        assert cache.stats().t0_in_use == 4  # the spare for block 1 went back
        cache.release(load.block_table)
        cache.check_invariants()


def test_a_cancelled_load_frees_its_slots_when_it_ends():
    remote = GatedRemote()
    p = prefix(range(3 * BS + 1))
    seed_remote(remote, p)
    with make(t0=8, t1=8, remote=remote) as cache:
        load = cache.start_load(p, cache.lookup(p), num_blocks=4)
        cache.cancel_load(load)
        assert cache.stats().t0_in_use == 4  # the loader thread still owns them
        remote.gate.set()
        cache.flush()
        assert load.done() and cache.stats().t0_in_use == 0 and cache.stats().t1_in_use == 0
        done = cache.start_load(p, cache.lookup(p), num_blocks=4)
        assert done.wait(timeout=20)
        cache.cancel_load(done)  # already done: released at once
        cache.cancel_load(done)  # and only once
        assert cache.stats().t0_in_use == 0
        cache.check_invariants()


def test_load_fits_what_t0_can_hold():
    with make(t0=8, t1=8) as cache:
        p = prefix(range(4 * BS + 1))
        cache.release(prefill(cache, p))
        evict_all_t0(cache)
        others = cache.allocate(6)  # 2 slots left
        loaded = cache.load(p, cache.lookup(p))
        assert loaded.num_blocks == 2 and loaded.from_tier == [0, 2, 0]
        cache.release(loaded.block_table + others)
        cache.check_invariants()


def test_background_restore_copies_the_same_bytes():
    t1 = HostPool(SPEC, 8)
    t1.kv.copy_(torch.randn(t1.kv.shape).to(SPEC.dtype))
    src, dst = [0, 1, 2, 5, 7, 6], [3, 4, 5, 0, 1, 7]  # runs and single blocks
    pools = [DevicePool(SPEC, 8, "cpu") for _ in range(2)]
    restore(t1, pools[0], src, dst)
    restore(t1, pools[1], src, dst, background=True)
    assert np.array_equal(pools[0].bytes, pools[1].bytes)
    for s, d in zip(src, dst):
        assert torch.equal(pools[1].block(d).view(torch.int16), t1.block(s).view(torch.int16))


@pytest.mark.parametrize("failing_call", [1, 2])  # during the transfer (16 blocks in), the last copy
def test_a_failed_copy_into_t0_is_an_error_that_publishes_nothing_and_leaks_nothing(monkeypatch, failing_call):
    import kvstore.cache

    remote = MemoryRemote()
    p = prefix(range(20 * BS + 1))
    seed_remote(remote, p)
    calls, failing = 0, {failing_call}

    def restore(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls in failing:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        kvstore.cache.restore.__wrapped__(*args, **kwargs)

    restore.__wrapped__ = kvstore.cache.restore
    monkeypatch.setattr(kvstore.cache, "restore", restore)
    with make(t0=24, t1=24, remote=remote) as cache:
        shared = t0_commit_only(cache, p, 0)
        load = cache.start_load(p, cache.lookup(p), num_blocks=21)
        assert load.wait(timeout=20) and calls == failing_call
        assert load.num_blocks == 0 and "CUDA error" in load.error and load.block_table[0] == shared
        assert set(cache.cached_slots(Tier.T0).values()) == {shared}  # no half-copied block is findable
        cache.release(load.block_table)
        cache.flush()
        cache.check_invariants()
        assert cache.stats().t0_in_use == cache.stats().t1_in_use == 0
        failing.add(calls + 1)
        with pytest.raises(RuntimeError, match="copying the prefix into T0 failed: RuntimeError: CUDA error"):
            cache.load(p, cache.lookup(p))
        assert cache.stats().t0_in_use == 0


def test_without_room_for_spares_the_load_stops_at_the_t2_block():
    remote = MemoryRemote()
    p = prefix(range(4 * BS + 1))
    seed_remote(remote, p)
    with make(t0=7, t1=8, remote=remote) as cache:
        for i in (1, 2, 3):  # here, after block 0, which is only in T2
            t0_commit_only(cache, p, i)
        hit = cache.lookup(p)
        assert hit.tiers == [Tier.T2] * 4
        # Sharing blocks 1-3 would take 3 pinned + 2 private + 3 spares: 8 > 7 slots.
        load = cache.start_load(p, hit, num_blocks=5)
        assert load.done() and load.num_blocks == 0 and remote.calls["get"] == 0
        assert cache.stats().t0_in_use == 5
        cache.release(load.block_table)
        cache.check_invariants()
