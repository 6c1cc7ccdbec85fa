"""Fuzz of the block store's gRPC API (hypothesis): structured but hostile requests to every
method (bad, foreign and overlong namespaces; hashes of every length; batches over the limit;
corrupt, mismatched and oversize blocks; TTLs out of range) with valid, unknown, malformed
and missing tokens, against a real server on a real Redis.

Every call must end with the status code the documented checks give, in their documented
order (authentication, namespace, permission, batch size, then each item in order), never
UNKNOWN or INTERNAL; whatever Get returns must be the block stored under the asked hash; and
the server must be healthy afterwards. Raw malformed protobuf is fuzzed with the other
services' (services/common).
"""
from __future__ import annotations

import hashlib
import re
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from kvhelpers import SPEC, content

from kvstore.blockstore_wire import MAX_TOUCH_TTL_S
from kvstore.codec import encode_block, read_header, tensor_bytes
from kvstore.v1 import blockstore_pb2 as pb
from kvstore.v1 import blockstore_pb2_grpc as pb_grpc
from services.blockstore.server import BlockStoreConfig, BlockStoreThread

CASES = 2600
MAX_BATCH = 16
MAX_BLOCK = 4096
Code = grpc.StatusCode
# The status codes the block store documents (docs/architecture.md), and nothing else.
DOCUMENTED = {Code.OK, Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED, Code.PERMISSION_DENIED,
              Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE}
NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,64}")
ALL = frozenset({"*"})
METHODS = ["Put", "Get", "Lookup", "Touch", "Delete", "Stats", "WatchRemovals"]
# Metadata -> the namespaces it may reach (None: UNAUTHENTICATED).
CREDENTIALS: list[tuple[tuple[tuple[str, str], ...], frozenset[str] | None]] = [
    ((("authorization", "Bearer admin"),), ALL),
    ((("authorization", "Bearer tenant-token"),), frozenset({"tenant", "shared"})),
    ((), None),
    ((("authorization", "Bearer nope"),), None),
    ((("authorization", "Bearer "),), None),
    ((("authorization", "tenant-token"),), None),
    ((("authorization", "Basic admin"),), None),
    ((("x-api-key", "admin"),), None),
]


def block_hash(name: str, size: int = 16) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=size).digest()


def encoded(h: bytes) -> bytes:
    return encode_block(tensor_bytes(content(h, SPEC).contiguous()), dtype=SPEC.dtype, shape=SPEC.block_shape,
                        fingerprint=SPEC.fingerprint, block_hash=h, parent_hash=bytes(16),
                        token_ids=list(range(SPEC.block_size)), codec="raw")


KNOWN = [block_hash(f"fuzz/{i}", 16 if i % 3 else 32) for i in range(6)]
VALID = {h: encoded(h) for h in KNOWN}


# -- requests with the outcome the documented checks give -----------------------------------
good_hash_st = st.one_of(st.sampled_from(KNOWN), st.binary(min_size=16, max_size=16),
                         st.binary(min_size=32, max_size=32))
bad_hash_st = st.binary(max_size=48).filter(lambda b: len(b) not in (16, 32))
valid_namespace_st = st.sampled_from(["tenant", "shared", "other"])
namespaces_st = st.one_of(valid_namespace_st, valid_namespace_st, valid_namespace_st,
                          st.sampled_from(["a" * 64, "a" * 65, "", "bad ns", "kv:x", "x\n", "ns/../x", "ümlaut", "*"]),
                          st.text(max_size=80))
credentials_st = st.one_of(st.sampled_from(CREDENTIALS[:2]), st.sampled_from(CREDENTIALS))
ttl_st = st.one_of(st.sampled_from([0, 1, MAX_TOUCH_TTL_S, MAX_TOUCH_TTL_S + 1, 2**32 - 1]),
                   st.integers(1, MAX_TOUCH_TTL_S), st.integers(0, 2**32 - 1))


@st.composite
def poisoned(draw, good: st.SearchStrategy, bad: st.SearchStrategy) -> list:
    """A list of up to MAX_BATCH + 4 ``good`` items (now and then thousands), half the time
    with one ``bad`` among them."""
    items = draw(st.lists(good, max_size=MAX_BATCH + 4))
    if items and draw(st.integers(0, 19)) == 0:
        items *= draw(st.integers(1000, 5000)) // len(items)
    if draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), draw(bad))
    return items


@st.composite
def bad_block_st(draw) -> tuple[bytes, bytes, str]:
    """(hash, data, what the server must reject it for)."""
    h = draw(st.sampled_from(KNOWN))
    data = VALID[h]
    kind = draw(st.sampled_from(["bad hash", "truncated", "extended", "header flip", "other block",
                                 "random", "empty", "oversize"]))
    if kind == "bad hash":
        return draw(bad_hash_st), data, "invalid"
    if kind == "truncated":
        return h, data[:draw(st.integers(0, len(data) - 1))], "invalid"
    if kind == "extended":
        return h, data + draw(st.binary(min_size=1, max_size=64)), "invalid"
    if kind == "header flip":
        i, bit = draw(st.integers(0, read_header(data).header_len - 1)), draw(st.integers(0, 7))
        return h, data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:], "invalid"
    if kind == "other block":
        return h, VALID[draw(st.sampled_from([k for k in KNOWN if k != h]))], "invalid"
    if kind == "random":
        return h, draw(st.binary(min_size=1, max_size=MAX_BLOCK)), "invalid"
    if kind == "empty":
        return h, b"", "invalid"
    return h, data + bytes(MAX_BLOCK + 1 - len(data)), "too big"


good_block_st = st.sampled_from(KNOWN).map(lambda h: (h, VALID[h], None))


def admitted(allowed: frozenset[str] | None, namespace: str, count: int) -> Code | None:
    """The code of the checks every method starts with, in their order (None: passed)."""
    if allowed is None:
        return Code.UNAUTHENTICATED
    if not NAMESPACE.fullmatch(namespace):
        return Code.INVALID_ARGUMENT
    if allowed != ALL and namespace not in allowed:
        return Code.PERMISSION_DENIED
    if count > MAX_BATCH:
        return Code.INVALID_ARGUMENT
    return None


def hashes_code(hashes: list[bytes]) -> Code:
    return Code.OK if all(len(h) in (16, 32) for h in hashes) else Code.INVALID_ARGUMENT


@st.composite
def calls_st(draw):
    """(method, request, metadata, expected code)."""
    metadata, allowed = draw(credentials_st)
    namespace = draw(namespaces_st)
    method = draw(st.sampled_from(METHODS))
    if method == "WatchRemovals":  # every namespace (empty) needs an all-namespace token
        namespace = draw(st.just("") | namespaces_st)
        expected = (Code.UNAUTHENTICATED if allowed is None else Code.PERMISSION_DENIED if allowed != ALL else
                    Code.OK) if not namespace else admitted(allowed, namespace, 0) or Code.OK
        return method, pb.WatchRemovalsRequest(namespace=namespace), metadata, expected
    if method == "Stats":
        return method, pb.StatsRequest(), metadata, Code.UNAUTHENTICATED if allowed is None else Code.OK
    if method == "Put":
        blocks = draw(poisoned(good_block_st, bad_block_st()))
        expected = admitted(allowed, namespace, len(blocks))
        for h, data, problem in blocks if expected is None else ():
            if len(h) not in (16, 32) or problem == "invalid":
                expected = Code.INVALID_ARGUMENT
            elif problem == "too big":
                expected = Code.RESOURCE_EXHAUSTED
            if expected is not None:
                break
        request = pb.PutRequest(namespace=namespace, blocks=[pb.Block(hash=h, data=d) for h, d, _ in blocks])
        return method, request, metadata, expected or Code.OK
    hashes = draw(poisoned(good_hash_st, bad_hash_st))
    expected = admitted(allowed, namespace, len(hashes)) or hashes_code(hashes)
    if method == "Touch":
        ttl = draw(ttl_st)
        if expected is Code.OK and not 0 < ttl <= MAX_TOUCH_TTL_S:
            expected = Code.INVALID_ARGUMENT
        return method, pb.TouchRequest(namespace=namespace, hashes=hashes, ttl_seconds=ttl), metadata, expected
    if method == "Delete":
        request = pb.DeleteRequest(namespace=namespace, hashes=hashes, corrupt=draw(st.booleans()))
        return method, request, metadata, expected
    request_type = pb.GetRequest if method == "Get" else pb.LookupRequest
    return method, request_type(namespace=namespace, hashes=hashes), metadata, expected


# -- the server -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(redis_server):
    cfg = BlockStoreConfig(port=0, redis_url=redis_server.url, tokens="admin=*;tenant-token=tenant,shared",
                           max_batch_blocks=MAX_BATCH, max_block_bytes=MAX_BLOCK, get_chunk_bytes=2000)
    with BlockStoreThread(cfg) as server:
        yield server


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@settings(max_examples=CASES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(call=calls_st())
def test_every_method_answers_hostile_requests_with_their_documented_code(channel, call):
    method, request, metadata, expected = call
    event(f"{method} {expected.name}")
    stub = pb_grpc.BlockStoreStub(channel)
    try:
        if method == "WatchRemovals":  # never ends by itself: a quiet 0.1 s is a healthy watch
            try:
                list(stub.WatchRemovals(request, metadata=metadata, timeout=0.1))
            except grpc.RpcError as e:
                if e.code() is not Code.DEADLINE_EXCEEDED:
                    raise
            reply = None
        else:
            reply = getattr(stub, method)(request, metadata=metadata, timeout=10)
        if method == "Get":
            for message in reply:
                for found in message.blocks:
                    asked = request.hashes[found.index]
                    assert read_header(found.data).block_hash == asked and found.data == VALID[asked]
        code = Code.OK
    except grpc.RpcError as e:
        code = e.code()
        assert e.details(), f"{method}: {code.name} without a message"
    assert code in DOCUMENTED, (method, code)
    assert code == expected, (method, code, expected)


def test_the_server_is_healthy_after_the_fuzz(server, channel):
    """(Runs after the fuzz, on the same server.) Health, a round trip, nothing left held."""
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.BlockStoreStub(channel)
    admin = (("authorization", "Bearer admin"),)
    h = block_hash("after the fuzz")
    stub.Put(pb.PutRequest(namespace="tenant", blocks=[pb.Block(hash=h, data=encoded(h))]), metadata=admin, timeout=5)
    found = [b for m in stub.Get(pb.GetRequest(namespace="tenant", hashes=[h]), metadata=admin, timeout=5)
             for b in m.blocks]
    assert [(b.index, b.data) for b in found] == [(0, encoded(h))]
    registry = server.server.metrics.registry
    assert registry.get_sample_value("kvstore_blockstore_budget_bytes_in_use") == 0
    deadline = time.monotonic() + 10  # watches the client gave up on end on the server too, soon after
    while time.monotonic() < deadline and registry.get_sample_value("kvstore_blockstore_in_flight",
                                                                     {"method": "WatchRemovals"}):
        time.sleep(0.05)
    for method in METHODS:
        assert not registry.get_sample_value("kvstore_blockstore_in_flight", {"method": method}), method
        for code in (Code.UNKNOWN, Code.INTERNAL):
            assert not registry.get_sample_value("kvstore_blockstore_requests_total", {"method": method,
                                                                                    "code": code.name})
