"""The T2 client against the real block store service over a real Redis (single and cluster):
round trips, the cache manager across processes, faults, corruption, auth."""
import contextlib
import json
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from kvhelpers import SPEC, content, prefill, prefix, t0_holds

from kvstore import blockstore_client
from kvstore.blockstore_client import (
    BlockStoreClient,
    BlockStoreClientConfig,
    BlockStoreError,
    BlockStoreUnavailable,
    BreakerState,
    CircuitBreaker,
)
from kvstore.cache import CacheConfig, Tier, TieredKVCache
from kvstore.codec import encode_block, tensor_bytes
from kvstore.v1 import blockstore_pb2 as pb
from services.blockstore.server import BlockStoreConfig, BlockStoreThread
from services.common.embedded_redis import EmbeddedRedis

BS = SPEC.block_size
TOKENS = "secret=tenant,other;admin=*"
HERE = Path(__file__).parent


def encoded(p, i: int) -> bytes:
    return encode_block(
        tensor_bytes(content(p.hashes[i]).contiguous()), dtype=SPEC.dtype, shape=SPEC.block_shape,
        fingerprint=SPEC.fingerprint, block_hash=p.hashes[i], parent_hash=p.parent_of(i),
        token_ids=p.block_tokens(i),
    )


@pytest.fixture(scope="module", params=["single", "cluster"])
def store(request):
    """A block store service on a real Redis (or a 3-node Redis Cluster)."""
    backend = request.getfixturevalue("redis_server" if request.param == "single" else "redis_cluster")
    cfg = BlockStoreConfig(port=0, redis_url=backend.url, redis_cluster=request.param == "cluster", tokens=TOKENS)
    with BlockStoreThread(cfg) as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_for(address: str, **kw) -> BlockStoreClient:
    kw.setdefault("token", "secret")
    return BlockStoreClient(BlockStoreClientConfig(address=address, **kw))


def test_put_get_lookup_round_trip_bit_exact(store):
    p = prefix(range(6 * BS), namespace="tenant")
    blobs = [encoded(p, i) for i in range(6)]
    with client_for(store.address, max_request_bytes=3 * len(blobs[0])) as c:  # forces 2+ Puts
        c.put("tenant", [(p.hashes[i], blobs[i]) for i in (0, 1, 2, 4, 5)])  # block 3 missing
        assert c.lookup("tenant", p.hashes) == 3
        got = c.get("tenant", p.hashes)
        assert got[3] is None and [got[i] for i in (0, 1, 2, 4, 5)] == [blobs[i] for i in (0, 1, 2, 4, 5)]
        c.put("tenant", [(p.hashes[3], blobs[3])])
        assert c.lookup("tenant", p.hashes) == 6
        assert c.lookup("other", p.hashes) == 0  # namespaces are separate key spaces
        assert c.delete("tenant", p.hashes[:2]) == 2 and c.lookup("tenant", p.hashes) == 0


def test_cache_manager_commit_in_one_process_load_in_another(store):
    n_tokens = str(5 * BS + 3)
    args = [sys.executable, str(HERE / "t2_worker.py")]
    w = subprocess.run(args + ["write", store.address, "secret", "tenant", n_tokens], capture_output=True, text=True, timeout=120)
    assert w.returncode == 0, w.stderr
    assert json.loads(w.stdout)["t2_put_blocks"] == 5
    r = subprocess.run(args + ["read", store.address, "secret", "tenant", n_tokens], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["from_tier"] == [0, 0, 5] and out["verified"] == 5 and out["t2_corrupt"] == 0


def test_payload_corruption_is_a_miss_recomputed_and_deleted(store):
    p = prefix(range(1000, 1000 + 3 * BS + 1), namespace="tenant")
    blobs = [encoded(p, i) for i in range(3)]
    bad = bytearray(blobs[1])
    bad[-7] ^= 0x10  # payload byte: the header still verifies, the plane checksum does not
    with client_for(store.address) as c:
        corrupt_before = c.stats().corrupt
        c.put("tenant", [(p.hashes[0], blobs[0]), (p.hashes[1], bytes(bad)), (p.hashes[2], blobs[2])])
        with TieredKVCache(SPEC, CacheConfig(t0_blocks=8, t1_blocks=8), remote=c) as cache:
            hit = cache.lookup(p)
            assert hit.tiers == [Tier.T2] * 3
            loaded = cache.load(p, hit)
            assert loaded.num_blocks == 1 and t0_holds(cache, loaded.block_table[0], p.hashes[0])
            assert cache.stats().t2_corrupt == 1
            cache.release(loaded.block_table)
        assert c.lookup("tenant", p.hashes) == 1  # the corrupt block is gone for everyone
        assert c.stats().corrupt == corrupt_before + 1


def test_wrong_token_or_namespace_raises_and_the_cache_carries_on(store):
    p = prefix(range(2 * BS + 1), namespace="tenant")
    with client_for(store.address, token="nope") as c:
        with pytest.raises(BlockStoreError) as e:
            c.stats()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with TieredKVCache(SPEC, CacheConfig(t0_blocks=4, t1_blocks=4), remote=c) as cache:
            cache.release(prefill(cache, p))
            assert cache.lookup(p).num_blocks == 2  # T0 still serves
            assert cache.stats().t2_errors >= 1
        assert c.breaker.state is BreakerState.CLOSED  # a rejection is not an outage
    with client_for(store.address) as c:
        with pytest.raises(BlockStoreError) as e:
            c.lookup("forbidden", p.hashes)
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_store_down_means_misses_within_the_deadline(redis_server):
    """With the block store process gone, a cache workload completes with only misses."""
    server = BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_server.url))
    address = server.start()
    server.stop()
    cfg = dict(timeout_s=0.5, retries=1, breaker_failures=2, breaker_reset_s=60)
    with client_for(address, **cfg) as c, TieredKVCache(SPEC, CacheConfig(t0_blocks=6, t1_blocks=4), remote=c) as cache:
        start = time.monotonic()
        for turn in range(10):
            p = prefix([turn] * (3 * BS) + [1], namespace="tenant")
            hit = cache.lookup(p)
            assert Tier.T2 not in hit.tiers
            cache.release(prefill(cache, p))
        cache.flush()
        elapsed = time.monotonic() - start
        # Two calls fail (each within its 0.5 s deadline), then the circuit is open.
        assert elapsed < 2 * 0.5 + 2.0, elapsed
        assert c.breaker.state is BreakerState.OPEN
        assert c.counters.short_circuited > 0 and c.counters.dropped_puts > 0


def test_redis_killed_mid_run_then_restarted():
    with EmbeddedRedis() as redis_:
        cfg = BlockStoreConfig(port=0, redis_url=redis_.url, redis_timeout_s=0.5)
        with BlockStoreThread(cfg) as server:
            ccfg = dict(token="", timeout_s=1.0, retries=1, breaker_failures=2, breaker_reset_s=0.2)
            with client_for(server.address, **ccfg) as c:
                p = prefix(range(2 * BS), namespace="tenant")
                c.put("tenant", [(p.hashes[0], encoded(p, 0))])
                assert c.lookup("tenant", p.hashes) == 1
                redis_.kill()
                start = time.monotonic()
                assert c.lookup("tenant", p.hashes) == 0  # a miss, not an exception
                assert c.get("tenant", p.hashes) == [None, None]
                with pytest.raises(BlockStoreUnavailable):
                    c.put("tenant", [(p.hashes[1], encoded(p, 1))])  # dropped
                assert time.monotonic() - start < 3 * 1.0 + 0.5
                assert c.counters.dropped_puts >= 1
                redis_.restart()
                q = prefix(range(500, 500 + 2 * BS), namespace="tenant")
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # the breaker lets a probe through every 0.2 s
                    with contextlib.suppress(BlockStoreUnavailable):
                        c.put("tenant", [(q.hashes[0], encoded(q, 0))])
                    if c.lookup("tenant", q.hashes) == 1:
                        break
                assert c.lookup("tenant", q.hashes) == 1, "hits did not resume after Redis came back"
                assert c.breaker.state is BreakerState.CLOSED


def test_puts_dropped_while_the_store_is_down_are_not_taken_as_stored(redis_server):
    """A T2 write dropped because the block store is down raises, so the cache counts it as
    dropped and does not mark the blocks present in T2: a later hit writes them for real."""
    cfg = BlockStoreConfig(port=free_port(), redis_url=redis_server.url)
    address = f"127.0.0.1:{cfg.port}"
    ccfg = dict(token="", timeout_s=0.5, retries=0, breaker_failures=1, breaker_reset_s=0.1)
    policy = CacheConfig(t0_blocks=8, t1_blocks=8, t1_t2_policy="selective", selective_hits=1)
    p = prefix(range(2 * BS + 1), namespace="tenant")
    with client_for(address, **ccfg) as c, TieredKVCache(SPEC, policy, remote=c) as cache:
        cache.release(prefill(cache, p))  # computed and committed: in T0 and T1, not yet in T2
        cache.flush()
        cache.release(prefill(cache, p))  # a hit: now worth a T2 copy, but the store is down
        cache.flush()
        stats = cache.stats()
        assert stats.t2_put_blocks == 0 and stats.t2_errors == 1 and stats.dropped_writes == 2
        assert c.counters.dropped_puts == 2
        with BlockStoreThread(cfg):
            time.sleep(0.15)  # the circuit half-opens: the next call is the probe
            cache.release(prefill(cache, p))  # another hit: the blocks were not marked stored
            cache.flush()
            assert cache.stats().t2_put_blocks == 2
            with client_for(address, token="") as other:
                assert other.lookup("tenant", p.hashes) == 2


def test_circuit_breaker_states():
    now = [0.0]
    b = CircuitBreaker(failures=2, reset_s=5, clock=lambda: now[0])
    assert b.allow() and b.state is BreakerState.CLOSED
    b.record_failure()
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    now[0] = 5.0
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()  # exactly one probe
    b.record_failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    now[0] = 10.0
    assert b.allow()
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.allow()


def test_a_probe_stopped_early_or_malformed_still_closes_the_circuit(store, monkeypatch):
    p = prefix(range(5000, 5000 + 3 * BS), namespace="tenant")
    with client_for(store.address, breaker_failures=1, breaker_reset_s=0.05) as c:
        c.put("tenant", [(p.hashes[i], encoded(p, i)) for i in range(3)])
        c.breaker.record_failure()  # open
        time.sleep(0.06)
        stream = c.get_iter("tenant", p.hashes)  # the half-open probe...
        assert next(stream)[0] == 0
        stream.close()  # ...abandoned after its first block
        assert c.breaker.state is BreakerState.CLOSED and c.lookup("tenant", p.hashes) == 3

        c.breaker.record_failure()
        time.sleep(0.06)
        monkeypatch.setattr(blockstore_client, "decode_get_response", lambda msg: [(99, b"")])
        with pytest.raises(BlockStoreError, match="out of range"):
            list(c.get_iter("tenant", p.hashes))  # a probe answered with nonsense
        assert c.breaker.state is BreakerState.CLOSED


def test_requests_over_the_batch_limit_are_split(store):
    p = prefix(range(1100 * BS), namespace="tenant")
    blocks = [(p.hashes[i], encoded(p, i)) for i in range(1030)]
    with client_for(store.address) as c:
        c.put("tenant", blocks)
        assert c.lookup("tenant", p.hashes) == 1030  # spans two Lookup requests
        got = c.get("tenant", p.hashes)
        assert got[:1030] == [b for _, b in blocks] and got[1030:] == [None] * 70
        assert c.delete("tenant", p.hashes) == 1030 and c.lookup("tenant", p.hashes) == 0


def test_get_iter_streams_found_blocks_in_order_and_can_stop_early(store):
    p = prefix(range(2000, 2000 + 8 * BS), namespace="tenant")
    blobs = [encoded(p, i) for i in range(8)]
    present = [0, 1, 2, 4, 5, 6, 7]
    with client_for(store.address) as c:
        c.put("tenant", [(p.hashes[i], blobs[i]) for i in present])
        got = [(i, bytes(d)) for i, d in c.get_iter("tenant", p.hashes)]
        assert got == [(i, blobs[i]) for i in present]  # ascending; the miss (3) is absent
        stream = c.get_iter("tenant", p.hashes)
        assert next(stream)[0] == 0
        stream.close()  # cancels the call; the client stays usable
        assert [i for i, _ in c.get_iter("tenant", p.hashes[4:])] == [0, 1, 2, 3]
        assert c.counters.failures == 0


def test_load_decodes_t2_blocks_as_they_arrive_and_a_gap_ends_the_prefix(store):
    p = prefix(range(3000, 3000 + 4 * BS + 1), namespace="tenant")
    with client_for(store.address) as c:
        c.put("tenant", [(p.hashes[i], encoded(p, i)) for i in range(4)])
        with TieredKVCache(SPEC, CacheConfig(t0_blocks=8, t1_blocks=8), remote=c) as cache:
            hit = cache.lookup(p)
            assert hit.tiers == [Tier.T2] * 4
            c.delete("tenant", [p.hashes[2]])  # gone between lookup and load
            loaded = cache.load(p, hit)
            assert loaded.num_blocks == 2
            assert all(t0_holds(cache, loaded.block_table[i], p.hashes[i]) for i in range(2))
            stats = cache.stats()
            assert stats.t2_get_blocks == 2 and stats.t2_errors == 0 and stats.t2_corrupt == 0
            cache.release(loaded.block_table)


class _FlakyBlockStore:
    """A real gRPC server standing in for the block store: its first Get sends the first
    message, then fails with UNAVAILABLE (a transient fault mid-stream)."""

    def __init__(self, blobs: dict[bytes, bytes], fail_calls: int) -> None:
        self.blobs = blobs
        self.requests: list[list[bytes]] = []
        self._fail_calls = fail_calls
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_stream_rpc_method_handler(
            self._get, request_deserializer=pb.GetRequest.FromString,
            response_serializer=pb.GetResponse.SerializeToString)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kvstore.v1.BlockStore", {"Get": handler}),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _get(self, request: pb.GetRequest, context: grpc.ServicerContext):
        self.requests.append(list(request.hashes))
        found = [pb.FoundBlock(index=i, data=self.blobs[h]) for i, h in enumerate(request.hashes) if h in self.blobs]
        if len(self.requests) <= self._fail_calls:
            yield pb.GetResponse(blocks=found[:2])
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault")
        yield from (pb.GetResponse(blocks=[b]) for b in found)


@pytest.mark.parametrize("fail_calls", [1, 99])
def test_get_iter_resumes_after_a_transient_failure_with_only_the_missing_blocks(fail_calls):
    hashes = [bytes([i]) * 16 for i in range(6)]
    blobs = {h: b"block %d" % i for i, h in enumerate(hashes) if i != 3}
    flaky = _FlakyBlockStore(blobs, fail_calls)
    try:
        with client_for(flaky.address, token="", retries=1, backoff_s=0.01) as c:
            got = [(i, bytes(d)) for i, d in c.get_iter("tenant", hashes)]
            if fail_calls == 1:  # the retry asks only for what did not arrive, nothing repeats
                assert got == [(i, b"block %d" % i) for i in (0, 1, 2, 4, 5)]
                assert flaky.requests == [hashes, hashes[2:]]
                assert c.counters.retries == 1 and c.counters.failures == 0
            else:  # unavailable to the end: what arrived counts, the rest are misses
                assert got == [(0, b"block 0"), (1, b"block 1"), (2, b"block 2"), (4, b"block 4")]
                assert c.counters.failures == 1
    finally:
        flaky.server.stop(None)
