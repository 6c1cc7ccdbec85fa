"""The block store service on a real 3-node Redis Cluster (redis_cluster=True): round trips,
set-if-absent, prefix lookup, TTLs, corruption, and keys spread over the nodes."""
from __future__ import annotations

import time

import grpc
import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from test_blockstore_server import (
    ADMIN,
    CORRUPTIONS,
    NOT_SERVING,
    SERVING,
    TOKENS,
    TTL,
    delete,
    get,
    get_messages,
    hash_of,
    hashes_of,
    health_status,
    key,
    lookup,
    make_block,
    put,
    rpc_error,
    stats,
    succeeds,
    wait_until,
)

from kvstore.v1 import blockstore_pb2 as pb
from kvstore.v1 import blockstore_pb2_grpc as pb_grpc
from services.blockstore.server import BlockStoreConfig, BlockStoreThread
from services.common.embedded_redis import EmbeddedRedisCluster


@pytest.fixture(scope="module")
def server(redis_cluster):
    cfg = BlockStoreConfig(port=0, redis_url=redis_cluster.url, redis_cluster=True, tokens=TOKENS,
                           ttl_seconds=TTL, get_chunk_bytes=4000)
    with BlockStoreThread(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.BlockStoreStub(ch)


@pytest.fixture(scope="module")
def rc(redis_cluster):
    c = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes])
    yield c
    c.close()


def keys_per_node(redis_cluster, namespace: str) -> list[int]:
    counts = []
    for host, port in redis_cluster.startup_nodes:
        with redis.Redis(host=host, port=port) as node:
            counts.append(sum(1 for _ in node.scan_iter(match=f"kv:{namespace}:*", count=1000)))
    return counts


def test_round_trip_bit_exact_over_the_cluster(stub):
    hashes = hashes_of("cluster/round-trip", 20) + [hash_of("cluster/32", size=32)]
    blocks = [(h, make_block(h)) for h in hashes]
    assert put(stub, "tenant", blocks) == pb.PutResponse(stored=21, existed=0)
    assert len(get_messages(stub, "tenant", hashes)) > 1
    assert get(stub, "tenant", hashes) == {i: d for i, (_, d) in enumerate(blocks)}
    assert lookup(stub, "tenant", hashes) == 21
    assert lookup(stub, "shared", hashes) == 0
    assert delete(stub, "tenant", hashes[5:7]) == 2
    assert lookup(stub, "tenant", hashes) == 5
    assert set(get(stub, "tenant", hashes)) == set(range(21)) - {5, 6}


def test_set_if_absent_and_ttls_over_the_cluster(stub, rc):
    h = hash_of("cluster/set-if-absent")
    first, second = make_block(h), make_block(h, parent=b"\x01" * 16)
    assert put(stub, "tenant", [(h, first)]).stored == 1
    assert TTL - 60 < rc.ttl(key("tenant", h)) <= TTL
    rc.expire(key("tenant", h), 100)
    assert put(stub, "tenant", [(h, second)]) == pb.PutResponse(stored=0, existed=1)
    assert TTL - 60 < rc.ttl(key("tenant", h)) <= TTL  # refreshed by the existing-block path
    rc.expire(key("tenant", h), 100)
    assert get(stub, "tenant", [h]) == {0: first}
    assert TTL - 60 < rc.ttl(key("tenant", h)) <= TTL  # refreshed by the hit


def test_lookup_gap_ends_the_prefix_over_the_cluster(stub):
    hashes = hashes_of("cluster/prefix", 30)
    put(stub, "tenant", [(h, make_block(h)) for i, h in enumerate(hashes) if i != 17])
    assert lookup(stub, "tenant", hashes) == 17
    assert lookup(stub, "tenant", hashes[18:]) == 12


@pytest.mark.parametrize("kind", ["header-byte-flipped", "truncated", "other-blocks-value"])
def test_corrupt_values_are_misses_deleted_and_counted_over_the_cluster(stub, rc, kind):
    hashes = hashes_of(f"cluster/corrupt/{kind}", 8)
    blocks = [make_block(h) for h in hashes]
    put(stub, "tenant", list(zip(hashes, blocks)))
    for i in (2, 5):
        rc.set(key("tenant", hashes[i]), CORRUPTIONS[kind](blocks[i]))
    before = stats(stub).corrupt
    assert get(stub, "tenant", hashes) == {i: b for i, b in enumerate(blocks) if i not in (2, 5)}
    assert stats(stub).corrupt - before == 2
    assert rc.exists(key("tenant", hashes[2])) == 0 and rc.exists(key("tenant", hashes[5])) == 0
    assert lookup(stub, "tenant", hashes) == 2


def test_a_batch_spreads_over_the_nodes(stub, redis_cluster):
    hashes = hashes_of("cluster/spread", 100)
    assert put(stub, "spread", [(h, make_block(h)) for h in hashes]).stored == 100
    counts = keys_per_node(redis_cluster, "spread")
    assert sum(counts) == 100 and sum(1 for c in counts if c) > 1, counts
    assert lookup(stub, "spread", hashes) == 100
    total_keys = 0
    for host, port in redis_cluster.startup_nodes:
        with redis.Redis(host=host, port=port) as node:
            total_keys += node.dbsize()
    s = stats(stub)
    assert s.redis_keys == total_keys and s.redis_used_memory > 0
    assert delete(stub, "spread", hashes) == 100 and keys_per_node(redis_cluster, "spread") == [0, 0, 0]


def test_validation_and_auth_apply_in_cluster_mode(stub):
    assert rpc_error(lookup, stub, "tenant", [b"short"]).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error(lookup, stub, "tenant", [hash_of("x")], md=()).code() == grpc.StatusCode.UNAUTHENTICATED
    assert lookup(stub, "tenant", [hash_of("x")], md=ADMIN) == 0


def test_a_dead_node_means_unavailable_fast_then_recovery():
    with EmbeddedRedisCluster(nodes=3) as cluster:
        cfg = BlockStoreConfig(port=0, redis_url=cluster.url, redis_cluster=True, redis_timeout_s=1.0)
        with BlockStoreThread(cfg) as server, grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.BlockStoreStub(ch)
            hashes = hashes_of("cluster/fault", 30)  # on every node
            assert put(stub, "tenant", [(h, make_block(h)) for h in hashes], md=()).stored == 30
            cluster.nodes[1].kill()
            for call in (lambda: lookup(stub, "tenant", hashes, md=()), lambda: get(stub, "tenant", hashes, md=()),
                         lambda: put(stub, "tenant", [(h, make_block(h)) for h in hashes], md=())):
                start = time.monotonic()
                err = rpc_error(call)
                assert err.code() == grpc.StatusCode.UNAVAILABLE and "Redis is unavailable" in err.details()
                assert time.monotonic() - start < 2.0
            wait_until(lambda: health_status(ch) == NOT_SERVING, what="NOT_SERVING")
            cluster.nodes[1].restart()  # rejoins with its nodes.conf, without its data
            wait_until(lambda: succeeds(lookup, stub, "tenant", hashes, md=()), timeout=20, what="recovery")
            wait_until(lambda: health_status(ch) == SERVING, timeout=20, what="SERVING again")
            assert put(stub, "tenant", [(h, make_block(h)) for h in hashes], md=()).stored > 0
            assert lookup(stub, "tenant", hashes, md=()) == 30
