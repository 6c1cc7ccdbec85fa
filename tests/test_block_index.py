import pytest

from kvstore.block_index import BlockIndex, BlockMeta, CacheFullError


def meta(i: int) -> BlockMeta:
    return BlockMeta(bytes([i]) * 16, b"\0" * 16, (i,), "ns")


def cached(index: BlockIndex, n: int) -> list[int]:
    slots, evicted = index.allocate(n)
    assert evicted == []
    for i, s in enumerate(slots):
        assert index.publish(s, meta(i))
    return slots


def test_eviction_order_is_least_recently_used():
    index = BlockIndex(4, "T")
    slots = cached(index, 4)
    for s in (slots[2], slots[0], slots[3], slots[1]):  # release order = use order
        index.release(s)
    index.acquire(slots[2])  # used again: now the most recent
    index.release(slots[2])
    _, evicted = index.allocate(3)
    assert [m.block_hash for _, m in evicted] == [meta(0).block_hash, meta(3).block_hash, meta(1).block_hash]
    assert meta(2).block_hash in index and len(index) == 1
    index.check()


def test_blocks_in_use_survive_any_pressure():
    index = BlockIndex(8, "T")
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


def test_capacity_is_never_exceeded():
    index = BlockIndex(3, "T")
    slots, _ = index.allocate(3)
    with pytest.raises(CacheFullError):
        index.allocate(1)
    assert index.num_in_use == 3 and index.num_evictable == 0
    index.release(slots[0])  # private slot: back to free
    assert index.num_evictable == 1 and len(index) == 0


def test_publish_never_overwrites_an_existing_block():
    index = BlockIndex(2, "T")
    a, b = index.allocate(2)[0]
    assert index.publish(a, meta(1))
    assert not index.publish(b, meta(1))  # same hash elsewhere: stays private
    assert index.find(meta(1).block_hash) == a and index.meta(b) is None
    index.release(b)
    assert index.num_evictable == 1  # b went back to the free list, a is pinned
    index.check()


def test_preferred_blocks_are_evicted_last_until_their_preference_ends(monkeypatch):
    import kvstore.block_index as bi

    now = [100.0]
    monkeypatch.setattr(bi.time, "monotonic", lambda: now[0])
    index = BlockIndex(4, "T")
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

    index = BlockIndex(3, "T")
    slots = cached(index, 3)
    index.prefer([meta(0).block_hash], until=150.0)
    for s in slots:
        index.release(s)
    now[0] = 200.0  # the preference ran out: block 0 is the LRU's oldest again
    _, evicted = index.allocate(3)
    assert [m.block_hash for _, m in evicted][0] == meta(0).block_hash
    index.check()
