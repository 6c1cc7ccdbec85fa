import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.block_index import BlockIndex, BlockMeta, CacheFullError, Eviction

ALL = pytest.mark.parametrize("eviction", list(Eviction))


def meta(i: int) -> BlockMeta:
    return BlockMeta(bytes([i]) * 16, b"\0" * 16, (i,), "ns")


def cached(index: BlockIndex, n: int) -> list[int]:
    slots, evicted = index.allocate(n)
    assert evicted == []
    for i, s in enumerate(slots):
        assert index.publish(s, meta(i))
    return slots


def test_eviction_order_is_least_recently_used():
    index = BlockIndex(4, "T", eviction=Eviction.LRU)
    slots = cached(index, 4)
    for s in (slots[2], slots[0], slots[3], slots[1]):  # release order = use order
        index.release(s)
    index.acquire(slots[2])  # used again: now the most recent
    index.release(slots[2])
    _, evicted = index.allocate(3)
    assert [m.block_hash for _, m in evicted] == [meta(0).block_hash, meta(3).block_hash, meta(1).block_hash]
    assert meta(2).block_hash in index and len(index) == 1
    index.check()


@ALL
def test_blocks_in_use_survive_any_pressure(eviction):
    index = BlockIndex(8, "T", eviction=eviction)
    slots = cached(index, 8)
    pinned = set(slots[::2])
    for s in slots:
        if s not in pinned:
            index.release(s)
    for _ in range(50):  # churn everything that is evictable
        new, _ = index.allocate(4)
        assert not pinned & set(new)
        for s in new:
            index.release(s)
    with pytest.raises(CacheFullError, match="in use"):
        index.allocate(5)
    for i, s in enumerate(slots):
        if s in pinned:
            assert index.find(meta(i).block_hash) == s
            assert index.meta(s).block_hash == meta(i).block_hash
    index.check()


@ALL
def test_drop_forgets_matching_blocks_and_frees_their_slots_once_released(eviction):
    """An admin flush: unreferenced blocks free their slots at once, referenced ones on release."""
    events = []
    index = BlockIndex(6, "T", lambda stored, m: events.append((stored, m)), eviction=eviction)
    slots, _ = index.allocate(6)
    for i, s in enumerate(slots):
        index.publish(s, BlockMeta(bytes([i]) * 16, b"\0" * 16, (i,), "a" if i < 4 else "b"))
    index.prefer([bytes([1]) * 16], time.monotonic() + 60)
    for s in slots[:2] + slots[4:]:  # slots[2:4] stay in use
        index.release(s)
    assert index.drop(lambda m: m.namespace == "a") == 4
    assert len(index) == 2 and all(bytes([i]) * 16 not in index for i in range(4))
    assert sorted(m.block_hash[0] for stored, m in events if not stored) == [0, 1, 2, 3]
    assert index.num_evictable == 4  # the two dropped unreferenced + the two of "b"
    index.check()
    for s in slots[2:4]:
        index.release(s)
    assert index.num_evictable == 6
    new, evicted = index.allocate(4)  # the freed slots first: nothing of "b" is evicted
    assert evicted == [] and set(new) == set(slots[:4])
    index.check()


@ALL
def test_capacity_is_never_exceeded(eviction):
    index = BlockIndex(3, "T", eviction=eviction)
    slots, _ = index.allocate(3)
    with pytest.raises(CacheFullError):
        index.allocate(1)
    assert index.num_in_use == 3 and index.num_evictable == 0
    index.release(slots[0])  # private slot: back to free
    assert index.num_evictable == 1 and len(index) == 0


@ALL
def test_publish_never_overwrites_an_existing_block(eviction):
    index = BlockIndex(2, "T", eviction=eviction)
    a, b = index.allocate(2)[0]
    assert index.publish(a, meta(1))
    assert not index.publish(b, meta(1))  # same hash elsewhere: stays private
    assert index.find(meta(1).block_hash) == a and index.meta(b) is None
    index.release(b)
    assert index.num_evictable == 1  # b went back to the free list, a is pinned
    index.check()


@ALL
def test_preferred_blocks_are_evicted_last_until_their_preference_ends(monkeypatch, eviction):
    import kvstore.block_index as bi

    now = [100.0]
    monkeypatch.setattr(bi.time, "monotonic", lambda: now[0])
    index = BlockIndex(4, "T", eviction=eviction)
    slots = cached(index, 4)
    index.prefer([meta(0).block_hash], until=150.0)  # before release: applies on release
    for s in slots:  # LRU order 0, 1, 2, 3
        index.release(s)
    index.prefer([meta(1).block_hash], until=150.0)  # after release: moves now
    _, evicted = index.allocate(2)
    assert [m.block_hash for _, m in evicted] == [meta(2).block_hash, meta(3).block_hash]
    index.check()
    _, evicted = index.allocate(1)  # nothing else left: the older preferred block goes
    assert [m.block_hash for _, m in evicted] == [meta(0).block_hash]
    index.check()

    index = BlockIndex(3, "T", eviction=eviction)
    slots = cached(index, 3)
    index.prefer([meta(0).block_hash], until=150.0)
    for s in slots:
        index.release(s)
    now[0] = 200.0  # the preference ran out: block 0 is the first to go again
    _, evicted = index.allocate(3)
    assert evicted[0][1].block_hash == meta(0).block_hash
    index.check()


def chain(index: BlockIndex, ids: list[int], parent: bytes = b"\0" * 16) -> list[int]:
    """Commit a chain of blocks (each the parent of the next) and release it root first, as
    a request does; returns their slots."""
    slots, _ = index.allocate(len(ids))
    for i, s in zip(ids, slots):
        assert index.publish(s, BlockMeta(meta(i).block_hash, parent, (i,), "ns"))
        parent = meta(i).block_hash
    for s in slots:
        index.release(s)
    return slots


def reuse(index: BlockIndex, ids: list[int], times: int = 1) -> None:
    """Lookup hits on cached blocks, as the cache counts them (``hits``), then release."""
    for _ in range(times):
        for i in ids:
            slot = index.find(meta(i).block_hash)
            index.acquire(slot)
            index.meta(slot).hits += 1
            index.release(slot)


def evicted_ids(index: BlockIndex, n: int) -> list[int]:
    _, evicted = index.allocate(n)
    index.check()
    return [m.token_ids[0] for _, m in evicted]


@pytest.mark.parametrize("eviction, survivors", [(Eviction.ARC, True), (Eviction.LRU, False)])
def test_arc_lets_no_flood_of_blocks_used_once_push_out_blocks_used_again(eviction, survivors):
    index = BlockIndex(8, "T", eviction=eviction)
    chain(index, [0, 1])
    reuse(index, [0, 1])
    for k in range(10):  # 60 new blocks, each used once
        new, _ = index.allocate(6)
        for j, s in enumerate(new):
            index.publish(s, meta(10 + 6 * k + j))
            index.release(s)
    assert (meta(0).block_hash in index and meta(1).block_hash in index) is survivors
    index.check()


def test_arc_evicts_blocks_used_once_before_blocks_used_again():
    index = BlockIndex(4, "T", eviction=Eviction.ARC)
    chain(index, [0, 1])
    reuse(index, [0, 1])  # now older than 2 and 3, but used again
    chain(index, [2, 3])
    assert evicted_ids(index, 2) == [2, 3]


def test_prefix_evicts_a_chains_leaf_before_its_ancestors():
    for eviction, order in ((Eviction.PREFIX, [3, 2, 1, 0]), (Eviction.LRU, [0, 1, 2, 3])):
        index = BlockIndex(4, "T", eviction=eviction)
        chain(index, [0, 1, 2, 3])
        assert evicted_ids(index, 4) == order, eviction


def test_prefix_evicts_request_tails_first_then_keeps_reused_blocks_longer():
    index = BlockIndex(6, "T", eviction=Eviction.PREFIX)
    chain(index, [0, 1, 2])  # 2: the tail, which nothing extends
    reuse(index, [0, 1], times=8)
    chain(index, [3, 4, 5])  # newer, never reused
    assert evicted_ids(index, 2) == [2, 5]  # tails, oldest first
    assert evicted_ids(index, 2) == [4, 3]  # 8 reuses outweigh being older
    index = BlockIndex(6, "T", eviction=Eviction.LRU)
    chain(index, [0, 1, 2])
    reuse(index, [0, 1], times=8)
    chain(index, [3, 4, 5])
    assert evicted_ids(index, 2) == [2, 0]


def test_prefix_remembers_the_reuses_of_a_block_that_comes_back():
    index = BlockIndex(4, "T", eviction=Eviction.PREFIX)
    chain(index, [0, 1, 2])
    reuse(index, [0, 1], times=8)
    for s in index.allocate(4)[0]:  # all of them go
        index.release(s)
    chain(index, [0, 1])  # back, with their 8 reuses remembered
    chain(index, [3, 4])  # newer, never reused
    assert evicted_ids(index, 2) == [4, 3]


@ALL
@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["allocate", "hit", "release", "prefer"]), st.integers(0, 63)),
                    max_size=60))
def test_no_block_in_use_is_evicted_and_capacity_holds(eviction, ops):
    index = BlockIndex(6, "T", eviction=eviction)
    held: list[int] = []  # our references, one entry per acquire or allocate
    next_id = 1
    for op, x in ops:
        if op == "allocate":
            n = x % 4
            if n > index.num_evictable:
                with pytest.raises(CacheFullError):
                    index.allocate(n)
                continue
            slots, evicted = index.allocate(n)
            assert not set(slots) & set(held) and not {s for s, _ in evicted} & set(held)
            for s in slots:  # a tree: block i's parent is block i // 2
                index.publish(s, BlockMeta(meta(next_id).block_hash, meta(next_id // 2).block_hash, (next_id,), "ns"))
                next_id += 1
            held += slots
        elif op == "hit" and (slot := index.find(meta(x % next_id).block_hash)) is not None:
            index.acquire(slot)
            index.meta(slot).hits += 1
            held.append(slot)
        elif op == "release" and held:
            index.release(held.pop(x % len(held)))
        elif op == "prefer":  # half of them already over
            index.prefer([meta(x % next_id).block_hash], until=time.monotonic() + (x % 2) * 100 - 1)
        index.check()
        assert index.num_in_use == len(set(held)) <= index.num_slots and len(index) <= index.num_slots
        for s in held:
            if (m := index.meta(s)) is not None:
                assert index.find(m.block_hash) == s
