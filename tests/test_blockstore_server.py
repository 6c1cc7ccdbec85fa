"""The block store service (services/blockstore) on a single real Redis, over real gRPC with the
generated stub: round trips, set-if-absent, prefix lookup, streaming, namespaces, auth,
validation, TTLs, corruption, health, faults, graceful shutdown, the CLI, TLS."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kvhelpers import SPEC, content

from kvstore.blockstore_wire import encode_get_response
from kvstore.codec import encode_block, tensor_bytes
from kvstore.spec import KVSpec
from kvstore.v1 import blockstore_pb2 as pb
from kvstore.v1 import blockstore_pb2_grpc as pb_grpc
from services.blockstore import resp
from services.blockstore.server import BlockStoreConfig, BlockStoreServer, BlockStoreThread, main, redacted
from services.common.embedded_redis import EmbeddedRedis
from services.common.errors import ConfigError, ServerStartError

ROOT = Path(__file__).resolve().parents[1]
TOKENS = "admin=*;tenant-token=tenant,shared"
ADMIN = (("authorization", "Bearer admin"),)
TENANT = (("authorization", "Bearer tenant-token"),)
TTL = 3600
MAX_BLOCK = 4096
MAX_BATCH = 64
CHUNK = 2000  # bytes per Get message: ~3 blocks of SPEC
BIG = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=8, model_id="big")  # > CHUNK
HUGE = KVSpec(num_layers=2, num_kv_heads=2, head_dim=64, block_size=8, model_id="huge")  # > MAX_BLOCK
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# -- helpers --------------------------------------------------------------------------------
def hash_of(name: str, size: int = 16) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=size).digest()


def hashes_of(name: str, n: int) -> list[bytes]:
    return [hash_of(f"{name}/{i}") for i in range(n)]


def make_block(block_hash: bytes, spec: KVSpec = SPEC, parent: bytes = bytes(16)) -> bytes:
    """A valid encoded block for ``block_hash``; ``parent`` varies the bytes, not the hash."""
    return encode_block(tensor_bytes(content(block_hash, spec).contiguous()), dtype=spec.dtype,
                        shape=spec.block_shape, fingerprint=spec.fingerprint, block_hash=block_hash,
                        parent_hash=parent, token_ids=list(range(spec.block_size)), codec="raw")


def key(namespace: str, block_hash: bytes) -> bytes:
    return f"kv:{namespace}:{block_hash.hex()}".encode()


def put(stub, namespace: str, blocks, md=ADMIN) -> pb.PutResponse:
    req = pb.PutRequest(namespace=namespace, blocks=[pb.Block(hash=h, data=d) for h, d in blocks])
    return stub.Put(req, metadata=md, timeout=10)


def get_messages(stub, namespace: str, hashes, md=ADMIN) -> list[pb.GetResponse]:
    return list(stub.Get(pb.GetRequest(namespace=namespace, hashes=hashes), metadata=md, timeout=10))


def get(stub, namespace: str, hashes, md=ADMIN) -> dict[int, bytes]:
    """Found blocks by request index."""
    found: dict[int, bytes] = {}
    for msg in get_messages(stub, namespace, hashes, md):
        for block in msg.blocks:
            assert block.index not in found
            found[block.index] = block.data
    return found


def lookup(stub, namespace: str, hashes, md=ADMIN) -> int:
    return stub.Lookup(pb.LookupRequest(namespace=namespace, hashes=hashes), metadata=md, timeout=10).prefix_length


def delete(stub, namespace: str, hashes, corrupt: bool = False, md=ADMIN) -> int:
    req = pb.DeleteRequest(namespace=namespace, hashes=hashes, corrupt=corrupt)
    return stub.Delete(req, metadata=md, timeout=10).deleted


def stats(stub, md=ADMIN) -> pb.StatsResponse:
    return stub.Stats(pb.StatsRequest(), metadata=md, timeout=10)


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kwargs)
    return e.value


def wait_until(cond, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout} s")
        time.sleep(0.01)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def succeeds(fn, *args, **kwargs) -> bool:
    try:
        fn(*args, **kwargs)
    except grpc.RpcError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(redis_server):
    cfg = BlockStoreConfig(port=0, redis_url=redis_server.url, tokens=TOKENS, ttl_seconds=TTL,
                           max_block_bytes=MAX_BLOCK, max_batch_blocks=MAX_BATCH, get_chunk_bytes=CHUNK)
    with BlockStoreThread(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.BlockStoreStub(channel)


@pytest.fixture(scope="module")
def rc(redis_server):
    c = redis_server.client()
    yield c
    c.close()


# -- data path ------------------------------------------------------------------------------
def test_put_get_lookup_delete_round_trip_bit_exact(stub, rc):
    hashes = hashes_of("round-trip", 5) + [hash_of("round-trip/32", size=32)]
    blocks = [(h, make_block(h)) for h in hashes]
    assert put(stub, "tenant", blocks) == pb.PutResponse(stored=6, existed=0)
    assert get(stub, "tenant", hashes) == {i: d for i, (_, d) in enumerate(blocks)}
    assert rc.get(key("tenant", hashes[5])) == blocks[5][1]  # the documented key layout
    assert lookup(stub, "tenant", hashes) == 6
    assert delete(stub, "tenant", hashes[:2]) == 2
    assert delete(stub, "tenant", hashes[:2]) == 0
    assert lookup(stub, "tenant", hashes) == 0
    assert get(stub, "tenant", hashes) == {i: blocks[i][1] for i in range(2, 6)}


def test_put_is_set_if_absent_and_refreshes_the_ttl(stub, rc):
    h = hash_of("set-if-absent")
    first, second = make_block(h), make_block(h, parent=b"\x01" * 16)
    assert first != second
    assert put(stub, "tenant", [(h, first)]).stored == 1
    rc.expire(key("tenant", h), 100)
    assert put(stub, "tenant", [(h, second)]) == pb.PutResponse(stored=0, existed=1)
    assert get(stub, "tenant", [h]) == {0: first}
    assert TTL - 60 < rc.ttl(key("tenant", h)) <= TTL
    # The same hash twice in one batch: the first copy wins.
    h2 = hash_of("set-if-absent/2")
    assert put(stub, "tenant", [(h2, make_block(h2)), (h2, make_block(h2, parent=b"\x02" * 16))]) \
        == pb.PutResponse(stored=1, existed=1)
    assert get(stub, "tenant", [h2]) == {0: make_block(h2)}


def test_lookup_returns_the_longest_present_prefix(stub):
    hashes = hashes_of("prefix", 6)
    put(stub, "tenant", [(hashes[i], make_block(hashes[i])) for i in (0, 1, 2, 4, 5)])
    assert lookup(stub, "tenant", hashes) == 3  # the gap at 3 ends it, though 4 and 5 exist
    assert lookup(stub, "tenant", hashes[3:]) == 0
    assert lookup(stub, "tenant", hashes[4:]) == 2
    assert lookup(stub, "tenant", []) == 0


def test_get_streams_messages_of_about_chunk_bytes_with_request_indexes(stub):
    hashes = hashes_of("chunks", 10)
    big = hash_of("chunks/big")
    present = [0, 1, 3, 4, 5, 7, 8, 9]
    blocks = {i: make_block(hashes[i]) for i in present}
    put(stub, "tenant", [(hashes[i], blocks[i]) for i in present] + [(big, make_block(big, BIG))])
    request = hashes[:6] + [big] + hashes[6:]  # the big block sits at index 6
    expected = {(i if i < 6 else i + 1): blocks[i] for i in present} | {6: make_block(big, BIG)}
    assert len(expected[6]) > CHUNK

    messages = get_messages(stub, "tenant", request)
    assert len(messages) > 3
    found = {b.index: b.data for m in messages for b in m.blocks}
    assert found == expected  # misses (2 and 7 of the request) are absent
    for m in messages:
        size = sum(len(b.data) for b in m.blocks)
        assert size <= CHUNK or len(m.blocks) == 1  # a larger block goes alone
    assert [b.index for m in messages for b in m.blocks] == sorted(expected)
    assert len(messages[0].blocks) == 1  # the first block goes alone, at once


@pytest.mark.parametrize("found", [
    [], [(0, b"x")], [(0, b"")], [(5, b"abc"), (127, b"y" * 127), (128, b"z" * 128)],
    [(300, b"\x00" * 70000), (2**32 - 1, b"\xff" * 16385)],
])
def test_hand_encoded_get_responses_equal_protobuf(found):
    reference = pb.GetResponse(blocks=[pb.FoundBlock(index=i, data=d) for i, d in found])
    encoded = encode_get_response(found)
    assert encoded == reference.SerializeToString()
    assert pb.GetResponse.FromString(encoded) == reference


def test_namespaces_are_isolated(stub):
    h = hash_of("isolation")
    put(stub, "tenant", [(h, make_block(h))])
    assert lookup(stub, "shared", [h]) == 0
    assert get(stub, "shared", [h]) == {}
    assert delete(stub, "shared", [h]) == 0
    assert lookup(stub, "tenant", [h]) == 1


# -- auth and validation --------------------------------------------------------------------
@pytest.mark.parametrize("md", [(), (("authorization", "Bearer nope"),), (("authorization", "admin"),),
                                (("authorization", "Bearer "),)],
                         ids=["missing", "unknown", "no-bearer", "empty"])
def test_missing_or_unknown_token_is_unauthenticated(stub, md):
    h = [hash_of("auth")]
    for call in (lambda: lookup(stub, "tenant", h, md=md), lambda: get(stub, "tenant", h, md=md),
                 lambda: put(stub, "tenant", [(h[0], make_block(h[0]))], md=md),
                 lambda: delete(stub, "tenant", h, md=md), lambda: stats(stub, md=md)):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
    assert "Bearer" in rpc_error(lookup, stub, "tenant", h, md=()).details()
    # Authentication comes first: a bad namespace does not tell an outsider anything either.
    assert rpc_error(lookup, stub, "bad ns", h, md=md).code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_limited_to_its_namespaces(stub):
    h = hash_of("perm")
    block = make_block(h)
    assert put(stub, "tenant", [(h, block)], md=TENANT).stored == 1
    assert get(stub, "tenant", [h], md=TENANT) == {0: block}
    assert lookup(stub, "shared", [h], md=TENANT) == 0
    for call in (lambda: lookup(stub, "other", [h], md=TENANT), lambda: get(stub, "other", [h], md=TENANT),
                 lambda: put(stub, "other", [(h, block)], md=TENANT), lambda: delete(stub, "other", [h], md=TENANT)):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'other'" in err.details()
    assert stats(stub, md=TENANT).puts >= 1  # any valid token may read the server's counters
    # The wildcard token reaches every namespace.
    assert put(stub, "other", [(h, block)], md=ADMIN).stored == 1
    assert lookup(stub, "other", [h], md=ADMIN) == 1


@pytest.mark.parametrize("namespace", ["", "has space", "x" * 65, "colon:ns", "star*", "ünïcode", "a/b", "trailing\n"])
def test_bad_namespace_is_invalid_argument(stub, namespace):
    err = rpc_error(lookup, stub, namespace, [hash_of("ns")])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid namespace" in err.details() and "A-Za-z0-9._-" in err.details()
    assert rpc_error(put, stub, namespace, []).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_malformed_hash_and_oversize_batch_are_invalid_argument(stub):
    good = hash_of("malformed")
    for bad in (b"", b"x" * 15, b"x" * 17, b"x" * 31, b"x" * 64):
        for call in (lookup, get, delete):
            err = rpc_error(call, stub, "tenant", [good, bad])
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed hash at index 1" in err.details()
        err = rpc_error(put, stub, "tenant", [(good, make_block(good)), (bad, make_block(good))])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed hash at index 1" in err.details()
    too_many = hashes_of("batch", MAX_BATCH + 1)
    for call in (lookup, get, delete):
        err = rpc_error(call, stub, "tenant", too_many)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"max_batch_blocks={MAX_BATCH}" in err.details()
    err = rpc_error(put, stub, "tenant", [(h, make_block(h)) for h in too_many])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f"max_batch_blocks={MAX_BATCH}" in err.details()
    assert lookup(stub, "tenant", hashes_of("batch", MAX_BATCH)) == 0  # exactly the limit is fine
    assert lookup(stub, "tenant", [good]) == 0  # nothing of a rejected Put was stored


def test_oversize_block_is_resource_exhausted(stub):
    h = hash_of("huge")
    data = make_block(h, HUGE)
    assert len(data) > MAX_BLOCK
    err = rpc_error(put, stub, "tenant", [(hash_of("huge/ok"), make_block(hash_of("huge/ok"))), (h, data)])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "index 1" in err.details() and f"max_block_bytes={MAX_BLOCK}" in err.details()
    assert lookup(stub, "tenant", [hash_of("huge/ok")]) == 0


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


INVALID_BLOCKS = {
    "garbage": lambda h: b"not a block at all" * 10,
    "empty": lambda h: b"",
    "header-byte-flipped": lambda h: _flip(make_block(h), 20),
    "bad-magic": lambda h: b"XXXX" + make_block(h)[4:],
    "other-hash": lambda h: make_block(hash_of("someone else")),
    "truncated": lambda h: make_block(h)[:-1],
    "extra-byte": lambda h: make_block(h) + b"\x00",
}


@pytest.mark.parametrize("kind", INVALID_BLOCKS)
def test_invalid_block_data_is_invalid_argument_and_nothing_is_stored(stub, kind):
    ok, h = hash_of(f"invalid/{kind}/ok"), hash_of(f"invalid/{kind}")
    err = rpc_error(put, stub, "tenant", [(ok, make_block(ok)), (h, INVALID_BLOCKS[kind](h))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid block data at index 1" in err.details()
    assert lookup(stub, "tenant", [ok]) == 0 and lookup(stub, "tenant", [h]) == 0


# -- TTLs and corruption --------------------------------------------------------------------
def test_ttl_is_set_on_write_and_refreshed_on_get(stub, rc):
    h = hash_of("ttl")
    put(stub, "tenant", [(h, make_block(h))])
    assert TTL - 60 < rc.ttl(key("tenant", h)) <= TTL
    rc.expire(key("tenant", h), 100)
    assert rc.ttl(key("tenant", h)) <= 100
    assert len(get(stub, "tenant", [h])) == 1
    assert TTL - 60 < rc.ttl(key("tenant", h)) <= TTL
    rc.expire(key("tenant", h), 100)
    lookup(stub, "tenant", [h])  # existence checks do not refresh
    assert rc.ttl(key("tenant", h)) <= 100


def touch(stub, namespace: str, hashes, ttl: int, md=ADMIN) -> int:
    return stub.Touch(pb.TouchRequest(namespace=namespace, hashes=hashes, ttl_seconds=ttl), metadata=md,
                      timeout=10).found


def test_touch_extends_ttls_of_pinned_blocks_and_never_shortens(stub, rc):
    hashes = hashes_of("touch", 3)
    put(stub, "tenant", [(h, make_block(h)) for h in hashes[:2]])
    assert touch(stub, "tenant", hashes, 10 * TTL) == 2  # the third is not stored
    assert 10 * TTL - 60 < rc.ttl(key("tenant", hashes[0])) <= 10 * TTL
    assert touch(stub, "tenant", hashes[:1], 100) == 1  # shorter than what it has: kept
    assert rc.ttl(key("tenant", hashes[0])) > 10 * TTL - 60
    assert not rc.exists(key("tenant", hashes[2]))
    for ttl in (0, 31 * 86400):
        assert rpc_error(touch, stub, "tenant", hashes, ttl).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error(touch, stub, "other", hashes, 10, md=TENANT).code() == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_error(touch, stub, "tenant", hashes, 10, md=()).code() == grpc.StatusCode.UNAUTHENTICATED
    assert rpc_error(touch, stub, "tenant", [b"short"], 10).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_expired_blocks_are_gone(stub, rc):
    hashes = hashes_of("expiry", 2)
    put(stub, "tenant", [(h, make_block(h)) for h in hashes])
    rc.pexpire(key("tenant", hashes[1]), 50)
    wait_until(lambda: lookup(stub, "tenant", hashes) == 1, timeout=5, what="block expiry")
    assert get(stub, "tenant", hashes) == {0: make_block(hashes[0])}


CORRUPTIONS = {
    "header-byte-flipped": lambda data: _flip(data, 12),
    "truncated": lambda data: data[: len(data) // 2],
    "appended": lambda data: data + b"\x00\x00",
    "other-blocks-value": lambda data: make_block(hash_of("an unrelated block")),
    "garbage": lambda data: b"\x00" * 100,
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_stored_value_is_a_miss_deleted_and_counted(stub, rc, kind, caplog):
    hashes = hashes_of(f"corrupt/{kind}", 3)
    blocks = [make_block(h) for h in hashes]
    put(stub, "tenant", list(zip(hashes, blocks)))
    rc.set(key("tenant", hashes[1]), CORRUPTIONS[kind](blocks[1]))
    before = stats(stub)
    assert get(stub, "tenant", hashes) == {0: blocks[0], 2: blocks[2]}
    after = stats(stub)
    assert rc.exists(key("tenant", hashes[1])) == 0
    assert after.corrupt - before.corrupt == 1
    assert (after.hits - before.hits, after.misses - before.misses) == (2, 1)
    assert lookup(stub, "tenant", hashes) == 1
    assert any("corrupt block" in r.getMessage() and hashes[1].hex() in r.getMessage() for r in caplog.records)


def test_get_through_the_narrowest_redis_window(redis_server, rc, monkeypatch):
    """Two GETEX in flight at a time (the least): hits, misses and a corrupt value, in order."""
    ahead: list[int] = []  # commands sent beyond the replies parsed, after each top-up
    send_more = resp._Protocol._send_more

    def recording(self):
        send_more(self)
        ahead.append(self._sent - self._parsed)

    monkeypatch.setattr(resp._Protocol, "_send_more", recording)
    cfg = BlockStoreConfig(port=0, redis_url=redis_server.url, tokens=TOKENS, get_chunk_bytes=CHUNK,
                           redis_window_bytes=1)
    hashes = hashes_of("narrow-window", 24)
    blocks = {i: make_block(hashes[i]) for i in range(24) if i % 5}  # 0, 5, 10, 15, 20 missing
    with BlockStoreThread(cfg) as server, grpc.insecure_channel(server.address) as ch:
        narrow = pb_grpc.BlockStoreStub(ch)
        put(narrow, "tenant", [(hashes[i], d) for i, d in blocks.items()])
        rc.set(key("tenant", hashes[7]), blocks[7][:-1])  # truncated: a miss, and deleted
        assert get(narrow, "tenant", hashes) == {i: d for i, d in blocks.items() if i != 7}
        assert rc.exists(key("tenant", hashes[7])) == 0
        assert get(narrow, "tenant", hashes[::-1]) == {23 - i: d for i, d in blocks.items() if i != 7}
    assert ahead and max(ahead) == 2  # the configured window reached the Redis client


def test_delete_reported_corrupt_is_counted(stub):
    hashes = hashes_of("client-corrupt", 3)
    put(stub, "tenant", [(h, make_block(h)) for h in hashes])
    before = stats(stub).corrupt
    assert delete(stub, "tenant", hashes[:2], corrupt=True) == 2
    assert stats(stub).corrupt - before == 2
    assert delete(stub, "tenant", hashes[:2], corrupt=True) == 0  # a second report of the same blocks
    assert stats(stub).corrupt - before == 2
    assert delete(stub, "tenant", hashes[2:]) == 1
    assert stats(stub).corrupt - before == 2  # a plain delete is not corruption


def test_stats_counts_requests_blocks_and_bytes(stub, redis_server):
    hashes = hashes_of("stats", 4)
    blocks = [make_block(h) for h in hashes]
    before = stats(stub)
    put(stub, "tenant", list(zip(hashes[:3], blocks[:3])))
    get(stub, "tenant", hashes)
    lookup(stub, "tenant", hashes)
    after = stats(stub)
    delta = {f: getattr(after, f) - getattr(before, f) for f in ("puts", "blocks_stored", "gets", "hits",
                                                                   "misses", "lookups", "bytes_in", "bytes_out")}
    size = sum(map(len, blocks[:3]))
    assert delta == dict(puts=1, blocks_stored=3, gets=1, hits=3, misses=1, lookups=1, bytes_in=size, bytes_out=size)
    client = redis_server.client()
    assert after.redis_keys == client.dbsize()
    assert after.redis_used_memory > 0


def test_redis_error_is_internal_and_the_server_keeps_serving(stub, rc):
    h = hash_of("wrongtype")
    rc.hset(key("tenant", h), "field", "value")  # not a string: GETEX fails with WRONGTYPE
    err = rpc_error(get, stub, "tenant", [h])
    assert err.code() == grpc.StatusCode.INTERNAL and "WRONGTYPE" in err.details()
    rc.delete(key("tenant", h))
    assert put(stub, "tenant", [(h, make_block(h))]).stored == 1


# -- service plumbing -----------------------------------------------------------------------
def test_health_reflection_and_metrics(server, channel, stub):
    assert health_status(channel) == SERVING
    assert health_status(channel, "kvstore.v1.BlockStore") == SERVING
    assert rpc_error(health_status, channel, "no.such.Service").code() == grpc.StatusCode.NOT_FOUND

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"kvstore.v1.BlockStore", "grpc.health.v1.Health"} <= names

    registry = server.server.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0

    def present(name: str, **labels: str) -> float:
        value = registry.get_sample_value(name, labels)
        assert value is not None, f"no sample {name}{labels}"
        return value

    ok, bad = sample("kvstore_blockstore_requests_total", method="Lookup", code="OK"), \
        sample("kvstore_blockstore_requests_total", method="Lookup", code="UNAUTHENTICATED")
    lookup(stub, "tenant", [hash_of("metrics")])
    rpc_error(lookup, stub, "tenant", [hash_of("metrics")], md=())
    assert sample("kvstore_blockstore_requests_total", method="Lookup", code="OK") == ok + 1
    assert sample("kvstore_blockstore_requests_total", method="Lookup", code="UNAUTHENTICATED") == bad + 1
    assert sample("kvstore_blockstore_request_seconds_count", method="Lookup") >= 2
    assert sample("kvstore_blockstore_redis_up") == 1
    assert present("kvstore_blockstore_in_flight", method="Lookup") == 0


def test_redis_down_is_unavailable_fast_then_service_recovers():
    with EmbeddedRedis() as redis_:
        cfg = BlockStoreConfig(port=0, redis_url=redis_.url, redis_timeout_s=1.0)  # no tokens: auth off
        with BlockStoreThread(cfg) as server, grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.BlockStoreStub(ch)
            h = hash_of("fault")
            assert put(stub, "tenant", [(h, make_block(h))], md=()).stored == 1
            redis_.kill()
            calls = {"Lookup": lambda: lookup(stub, "tenant", [h], md=()),
                     "Get": lambda: get(stub, "tenant", [h], md=()),
                     "Put": lambda: put(stub, "tenant", [(h, make_block(h))], md=()),
                     "Delete": lambda: delete(stub, "tenant", [h], md=()),
                     "Stats": lambda: stats(stub, md=())}
            for name, call in calls.items():
                start = time.monotonic()
                err = rpc_error(call)
                elapsed = time.monotonic() - start
                assert err.code() == grpc.StatusCode.UNAVAILABLE, (name, err.details())
                assert "Redis is unavailable" in err.details()
                assert elapsed < 2.0, (name, elapsed)
            wait_until(lambda: health_status(ch) == NOT_SERVING, what="NOT_SERVING")
            assert health_status(ch, "kvstore.v1.BlockStore") == NOT_SERVING

            redis_.restart()  # same port, empty
            h2 = hash_of("fault/after")
            wait_until(lambda: succeeds(put, stub, "tenant", [(h2, make_block(h2))], md=()),
                       what="puts working again")
            assert get(stub, "tenant", [h, h2], md=()) == {1: make_block(h2)}
            wait_until(lambda: health_status(ch) == SERVING, what="SERVING again")


def test_a_redis_restart_between_calls_is_invisible():
    """Pooled connections die with the old process; the next call reconnects at once."""
    with EmbeddedRedis() as redis_:
        with BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_.url)) as server, \
                grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.BlockStoreStub(ch)
            hashes = hashes_of("restart", 2)
            for i, h in enumerate(hashes):
                assert put(stub, "tenant", [(h, make_block(h))], md=()).stored == 1
                assert lookup(stub, "tenant", [h], md=()) == 1
                if i == 0:
                    redis_.restart()  # empty again, same port


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_after_a_redis_restart_calls_succeed_from_the_first_success_on(how):
    """Redis restarts (gracefully, or killed and started again on its port) while six clients
    loop over Put, Get and Lookup, after bursts of 24 concurrent calls filled the connection
    pools: once a call has succeeded after the restart, none started later fails, a burst
    that reuses every pooled connection included (redis-py 8 hands pooled connections out
    unchecked: a dead one must be retried on a new socket, never surface)."""
    with EmbeddedRedis() as redis_, BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_.url)) as server, \
            grpc.insecure_channel(server.address) as ch, futures.ThreadPoolExecutor(24) as pool:
        stub = pb_grpc.BlockStoreStub(ch)
        recovered_at: list[float] = []  # start time of the first call that succeeded after the restart
        failures: list[str] = []
        stop = threading.Event()

        def round_trip(tag: str, after_restart: bool = True) -> None:
            h = hash_of(tag)
            started = time.monotonic()
            try:  # (across the restart itself a block may be lost: Redis comes back empty)
                put(stub, "tenant", [(h, make_block(h))], md=())
                found = get(stub, "tenant", [h, hash_of("absent"), h], md=())
                problem = None if found == {0: make_block(h), 2: make_block(h)} else f"Get found {sorted(found)}"
                problem = problem or (None if lookup(stub, "tenant", [h], md=()) == 1 else "Lookup: 0")
            except grpc.RpcError as e:
                problem = f"{e.code().name}: {e.details()}"
            if problem is None and after_restart and not recovered_at:
                recovered_at.append(started)
            elif problem is not None and recovered_at and started > recovered_at[0]:
                failures.append(problem)

        def client(k: int) -> int:
            n = 0
            while not stop.is_set():
                n += 1
                round_trip(f"{how}/{k}/{n}", after_restart=restarted)
            return n

        list(pool.map(round_trip, [f"{how}/before/{i}" for i in range(24)], [False] * 24))
        restarted = False
        loops = [pool.submit(client, k) for k in range(6)]
        try:
            time.sleep(0.3)
            if how == "kill":
                redis_.kill()
                time.sleep(0.3)
            redis_.restart()
            restarted = True
            wait_until(lambda: bool(recovered_at), what="a successful call after the restart")
            list(pool.map(round_trip, [f"{how}/after/{i}" for i in range(18)]))
            time.sleep(2)
        finally:
            stop.set()
        assert min(loop.result() for loop in loops) > 5  # every client kept going
        assert not failures, failures[:5]


def test_unresponsive_redis_times_out_as_unavailable():
    """A Redis that accepts connections but never answers (the kernel completes the handshake)."""
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        url = f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0"
        with BlockStoreThread(BlockStoreConfig(port=0, redis_url=url, redis_timeout_s=0.3)) as server, \
                grpc.insecure_channel(server.address) as ch:
            assert health_status(ch) == NOT_SERVING
            start = time.monotonic()
            err = rpc_error(lookup, pb_grpc.BlockStoreStub(ch), "tenant", [hash_of("blackhole")], md=())
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - start < 2.0


def test_graceful_stop_lets_the_in_flight_call_finish():
    with EmbeddedRedis() as redis_:
        admin = redis_.client()
        # A long Redis timeout: the paused Put must wait for UNPAUSE, however slow the machine.
        server = BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_.url, redis_timeout_s=60))
        server.start()
        try:
            with grpc.insecure_channel(server.address) as ch:
                stub = pb_grpc.BlockStoreStub(ch)
                hashes = hashes_of("graceful", 4)
                registry = server.server.metrics.registry
                admin.execute_command("CLIENT", "PAUSE", 10000, "WRITE")  # holds the Put's SETs
                try:
                    req = pb.PutRequest(namespace="tenant", blocks=[pb.Block(hash=h, data=make_block(h)) for h in hashes])
                    pending = stub.Put.future(req, timeout=30)
                    wait_until(lambda: registry.get_sample_value("kvstore_blockstore_in_flight", {"method": "Put"}) == 1,
                               what="Put in flight")
                    stopper = threading.Thread(target=server.stop, kwargs=dict(grace=20))
                    stopper.start()
                    # New calls are refused while the in-flight one may still finish.
                    wait_until(lambda: not succeeds(lookup, stub, "tenant", hashes, md=()), what="refusal")
                    assert rpc_error(lookup, stub, "tenant", hashes, md=()).code() == grpc.StatusCode.UNAVAILABLE
                    assert not pending.done()
                finally:
                    admin.execute_command("CLIENT", "UNPAUSE")
                    unpaused = time.monotonic()
                assert pending.result(timeout=10) == pb.PutResponse(stored=4, existed=0)
                stopper.join(timeout=20)
                # It stopped once the call was done, not at the end of its 20 s grace.
                assert not stopper.is_alive() and time.monotonic() - unpaused < 10
                assert all(admin.exists(key("tenant", h)) for h in hashes)
        finally:
            server.stop()


def test_embedded_redis_is_started_and_stopped_with_the_server():
    server = BlockStoreThread(BlockStoreConfig(port=0, embedded_maxmemory="64mb"))
    server.start()
    try:
        client = redis.Redis.from_url(server.server.redis_url)
        pid = int(client.info("server")["process_id"])
        assert client.config_get("maxmemory")["maxmemory"] == str(64 << 20)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
        with grpc.insecure_channel(server.address) as ch:
            h = hash_of("embedded")
            assert put(pb_grpc.BlockStoreStub(ch), "tenant", [(h, make_block(h))], md=()).stored == 1
        client.close()
    finally:
        server.stop()
    assert not pid_alive(pid)


# -- configuration and CLI ------------------------------------------------------------------
def test_refuses_to_start_on_a_non_loopback_host_without_tokens():
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(ConfigError, match="non-loopback.*tokens"):
            BlockStoreServer(BlockStoreConfig(host=host, port=0))
    BlockStoreServer(BlockStoreConfig(host="0.0.0.0", port=0, tokens="t=*"))  # with tokens: allowed
    for host in ("127.0.0.1", "localhost", "::1"):
        BlockStoreServer(BlockStoreConfig(host=host, port=0))


@pytest.mark.parametrize("overrides, message", [
    (dict(tokens="justatoken"), "malformed"),
    (dict(tokens="t=bad ns"), "invalid namespace"),
    (dict(tokens="t=a;t=b"), "twice"),
    (dict(tls_cert="/some/cert.pem"), "tls_key"),
    (dict(redis_cluster=True), "redis_url"),
    (dict(ttl_seconds=0), "ttl_seconds"),
    (dict(redis_window_bytes=0), "redis_window_bytes must be positive"),
    (dict(max_block_bytes=128 << 20), "max_message_bytes"),
])
def test_bad_configuration_raises_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        BlockStoreServer(BlockStoreConfig(port=0, **overrides))


@pytest.mark.parametrize("argv, message", [
    (["--port", "many"], "invalid int value"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--host", "0.0.0.0"], "non-loopback"),
    (["--tokens", "nonsense"], "malformed"),
    (["--log-level", "chatty"], "log-level"),
])
def test_cli_rejects_bad_flags_and_config_with_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_taken_port_is_a_start_error_and_leaves_nothing_behind(redis_server, capsys):
    with BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_server.url)) as first:
        port = int(first.address.rsplit(":", 1)[1])
        second = BlockStoreThread(BlockStoreConfig(port=port, embedded_maxmemory="16mb"))
        with pytest.raises(ServerStartError, match=f"cannot listen on 127.0.0.1:{port}"):
            second.start()
        with pytest.raises(redis.ConnectionError):  # its embedded Redis was stopped again
            redis.Redis.from_url(second.server.redis_url, socket_connect_timeout=1).ping()
        assert main(["--port", str(port), "--redis-url", redis_server.url]) == 1
        assert "cannot start" in capsys.readouterr().err


def test_redis_passwords_are_not_logged():
    assert redacted("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redacted("rediss://user:s3cret@host:6379") == "rediss://user:***@host:6379"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"


def test_cli_rejects_bad_environment_with_exit_code_2(monkeypatch, capsys):
    monkeypatch.setenv("KVSTORE_BLOCKSTORE_PORT", "not-a-port")
    assert main([]) == 2
    assert "KVSTORE_BLOCKSTORE_PORT" in capsys.readouterr().err


def test_cli_serves_with_embedded_redis_and_metrics_until_sigterm():
    metrics_port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KVSTORE_BLOCKSTORE_TOKENS": "cli=tenant"}
    proc = subprocess.Popen([sys.executable, "-m", "services.blockstore", "--port", "0",
                             "--metrics-port", str(metrics_port), "--log-level", "WARNING"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    redis_pid = None
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(r"kvstore blockstore listening on (\S+) \(redis: (\S+)\)\n", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        address, redis_url = m.groups()
        redis_pid = int(redis.Redis.from_url(redis_url).info("server")["process_id"])
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.BlockStoreStub(ch)
            md = (("authorization", "Bearer cli"),)
            h = hash_of("cli")
            assert put(stub, "tenant", [(h, make_block(h))], md=md).stored == 1
            assert get(stub, "tenant", [h], md=md) == {0: make_block(h)}
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'kvstore_blockstore_requests_total{code="OK",method="Put"} 1.0' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        wait_until(lambda: not pid_alive(redis_pid), timeout=5, what="embedded redis stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if redis_pid and pid_alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(redis_server, tmp_path):
    cert, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key_file), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    cfg = BlockStoreConfig(port=0, redis_url=redis_server.url, tokens="tls=*",
                           tls_cert=str(cert), tls_key=str(key_file))
    with BlockStoreThread(cfg) as server:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(server.address, creds) as ch:
            h = hash_of("tls")
            md = (("authorization", "Bearer tls"),)
            assert put(pb_grpc.BlockStoreStub(ch), "tenant", [(h, make_block(h))], md=md).stored == 1
        with grpc.insecure_channel(server.address) as ch:  # plaintext is not served
            err = rpc_error(lookup, pb_grpc.BlockStoreStub(ch), "tenant", [h], md=md)
            assert err.code() == grpc.StatusCode.UNAVAILABLE
