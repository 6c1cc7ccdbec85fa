"""WatchRemovals on a real block store and Redis: blocks Redis evicts (maxmemory), expires
(TTL) or deletes reach a watcher of their namespace, and no other tenant's; keyspace
notifications are turned on by the block store itself."""
from __future__ import annotations

import time

import pytest
import redis
from streams import Collected
from test_blockstore_server import hash_of, hashes_of, make_block

from kvstore.blockstore_client import BlockStoreClient, BlockStoreClientConfig, BlockStoreError
from kvstore.v1 import blockstore_pb2 as pb
from services.blockstore.removals import Reason, Removal, parse_removal
from services.blockstore.server import BlockStoreConfig, BlockStoreThread
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig

TOKENS = "admin=*;tenant-token=tenant"


@pytest.fixture(scope="module")
def small_redis():
    """2 MB, allkeys-lru: a few thousand small blocks evict others."""
    with EmbeddedRedis(EmbeddedRedisConfig(maxmemory="2mb")) as server:
        yield server


def _store(redis_url: str, ttl_seconds: int = 3600) -> BlockStoreThread:
    store = BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_url, tokens=TOKENS, ttl_seconds=ttl_seconds,
                                              max_batch_blocks=4096))
    store.start()
    return store


class Watcher(Collected):
    """One WatchRemovals call, collected on a thread."""

    def __init__(self, address: str, token: str, namespace: str = "") -> None:
        client = BlockStoreClient(BlockStoreClientConfig(address=address, token=token))
        super().__init__(client.watch_removals(namespace), client.close)

    @property
    def removals(self) -> list[pb.Removal]:
        return [r for batch in list(self.messages) for r in batch.removals]

    def seen(self, reason) -> set[tuple[str, bytes]]:
        return {(r.namespace, r.hash) for r in self.removals if r.reason == reason}


def wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def test_keys_that_are_not_blocks_are_not_removals():
    h = hash_of("a")
    assert parse_removal(b"kv:ns:with:colons:" + h.hex().encode(), b"evicted") == Removal("ns:with:colons", h, Reason.EVICTED)
    assert parse_removal(b"kv:ns:" + h.hex().encode(), b"del") == Removal("ns", h, Reason.DELETED)
    for key, event in ((b"sess:{a:b}:meta", b"del"), (b"kv:ns:xyz", b"del"), (b"kv:" + h.hex().encode(), b"del"),
                       (b"kv:ns:" + h.hex().encode(), b"set"), (b"kv:ns:" + b"zz" * 16, b"expired")):
        assert parse_removal(key, event) is None, (key, event)


def test_deleted_evicted_and_expired_blocks_reach_the_watchers_of_their_namespace(small_redis):
    store = _store(small_redis.url)
    expiring = _store(small_redis.url, ttl_seconds=1)
    watchers = {}
    try:
        watchers = {"admin": Watcher(store.address, "admin"), "tenant": Watcher(store.address, "tenant-token", "tenant")}
        with BlockStoreClient(BlockStoreClientConfig(address=store.address, token="admin")) as admin:
            time.sleep(0.5)  # the watches are subscribed
            kept = [(h, make_block(h)) for h in hashes_of("kept", 3)]
            admin.put("tenant", kept)
            admin.put("other", kept)
            assert admin.delete("tenant", [kept[0][0]]) == 1 and admin.delete("other", [kept[1][0]]) == 1
            assert wait_for(lambda: watchers["admin"].seen(pb.Removal.DELETED) >= {("tenant", kept[0][0]),
                                                                                  ("other", kept[1][0])})
            assert wait_for(lambda: ("tenant", kept[0][0]) in watchers["tenant"].seen(pb.Removal.DELETED))
            # Fill the 2 MB Redis several times over: it evicts, least recently used first.
            for i in range(8):
                admin.put("tenant", [(h, make_block(h)) for h in hashes_of(f"fill-{i}", 1000)])
            assert wait_for(lambda: len(watchers["tenant"].seen(pb.Removal.EVICTED)) >= 100)
            still = redis.Redis.from_url(small_redis.url)
            evicted = watchers["tenant"].seen(pb.Removal.EVICTED)
            assert not any(still.exists(f"kv:{ns}:{h.hex()}") for ns, h in list(evicted)[:200])  # really gone
        with BlockStoreClient(BlockStoreClientConfig(address=expiring.address, token="admin")) as short:
            soon = [(h, make_block(h)) for h in hashes_of("soon", 4)]
            short.put("tenant", soon)
            assert wait_for(lambda: watchers["tenant"].seen(pb.Removal.EXPIRED) >= {("tenant", h) for h, _ in soon})
        # A tenant's watch shows its namespace only; watching all of them needs an all-namespace token.
        assert {r.namespace for r in watchers["tenant"].removals} == {"tenant"}
        assert "other" in {r.namespace for r in watchers["admin"].removals}
        with BlockStoreClient(BlockStoreClientConfig(address=store.address, token="tenant-token")) as tenant:
            with pytest.raises(BlockStoreError, match="PERMISSION_DENIED"):
                list(tenant.watch_removals())
            with pytest.raises(BlockStoreError, match="PERMISSION_DENIED"):
                list(tenant.watch_removals("other"))
        assert all(w.error is None for w in watchers.values()), [w.error for w in watchers.values()]
        flags = redis.Redis.from_url(small_redis.url).config_get("notify-keyspace-events")["notify-keyspace-events"]
        assert set("Egex") <= set(flags)  # turned on by the block store
    finally:
        for w in watchers.values():
            w.close()
        store.stop()
        expiring.stop()


def test_removals_on_every_node_of_a_redis_cluster_are_watched(redis_cluster):
    store = BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_cluster.url, redis_cluster=True, tokens=TOKENS))
    store.start()
    watcher = None
    try:
        watcher = Watcher(store.address, "admin")
        with BlockStoreClient(BlockStoreClientConfig(address=store.address, token="admin")) as admin:
            time.sleep(0.5)  # the watch is subscribed on every primary
            blocks = [(h, make_block(h)) for h in hashes_of("spread", 30)]  # hex keys: spread over all slots
            admin.put("tenant", blocks)
            assert admin.delete_namespace("tenant") == 30
        assert wait_for(lambda: watcher.seen(pb.Removal.DELETED) >= {("tenant", h) for h, _ in blocks})
        nodes = {redis_cluster_node_of(redis_cluster.url, f"kv:tenant:{h.hex()}") for h, _ in blocks}
        assert len(nodes) == 3  # the removals came from every primary
    finally:
        if watcher is not None:
            watcher.close()
        store.stop()


def redis_cluster_node_of(url: str, key: str) -> str:
    from redis.cluster import RedisCluster

    client = RedisCluster.from_url(url)
    try:
        node = client.get_node_from_key(key)
        return f"{node.host}:{node.port}"
    finally:
        client.close()
