"""Fuzzing the session gRPC service (hypothesis) over a real server, Redis and Ray workers:
raw bytes and structured requests to every method, with and without valid credentials.
Every answer must carry one of the documented status codes (never UNKNOWN or INTERNAL), and
the server must stay healthy and serve a normal turn afterwards."""
from __future__ import annotations

import re
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servicehelpers import serving, worker_stack

from kvstore.client import SessionClient
from kvstore.v1 import session_pb2 as pb

C = grpc.StatusCode
# What proto/kvstore/v1/session.proto documents (DEADLINE_EXCEEDED and CANCELLED aside: the
# fuzzer sets generous deadlines and never cancels).
DOCUMENTED = {C.OK, C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.PERMISSION_DENIED, C.NOT_FOUND,
              C.FAILED_PRECONDITION, C.ABORTED, C.RESOURCE_EXHAUSTED}
RAW_CASES, STRUCTURED_CASES = 1000, 2500
SERVICE = pb.DESCRIPTOR.services_by_name["Sessions"]
_cases = {"raw": 0, "structured": 0}
_seen: Counter = Counter()  # (method, status code) of the structured cases


@pytest.fixture(scope="module")
def fuzz_env(redis_server, tmp_path_factory):
    with worker_stack(redis_server, str(tmp_path_factory.mktemp("ray")), "fuzz-test", 4) as stack, \
            serving(stack.loop, stack.pool, stack.redis.url, blockstore_address=stack.blockstore.address, max_tokens=8,
                    default_max_tokens=4, max_sessions_per_namespace=300, queue_timeout_s=5.0) as server:
        ids = []
        for key in ["key-a"] * 10 + ["key-b"] * 2:
            with SessionClient(server.address, api_key=key) as kv:
                ids.append(kv.create_session(system_prompt="fuzz me").session_id)
        with grpc.insecure_channel(server.address) as channel:
            yield {"server": server, "channel": channel, "session_ids": ids}


def _call(channel: grpc.Channel, method: str, data: bytes, metadata) -> grpc.StatusCode:
    path = f"/{SERVICE.full_name}/{method}"
    try:
        if method == "SubscribeKVEvents":  # never ends by itself: its first batch, or a quiet second, will do
            call = channel.unary_stream(path)(data, metadata=metadata, timeout=1)
            try:
                next(call, None)
            except grpc.RpcError as e:
                if e.code() is not C.DEADLINE_EXCEEDED:
                    raise
            call.cancel()
        elif SERVICE.methods_by_name[method].server_streaming:
            for _ in channel.unary_stream(path)(data, metadata=metadata, timeout=30):
                pass
        else:
            channel.unary_unary(path)(data, metadata=metadata, timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return C.OK


KEY_A = (("authorization", "Bearer key-a"),)
AUTH = st.sampled_from([(), (("authorization", "Bearer key-b"),), (("authorization", "Bearer admin"),),
                        (("authorization", "Bearer wrong"),), (("authorization", "Basic key-a"),)]) | st.just(KEY_A)
METHODS = st.sampled_from([m.name for m in SERVICE.methods])
TEXT = st.text(max_size=40)
U32 = st.integers(0, 2**32 - 1)
FLOAT = st.floats(width=32)  # NaN and infinities included


def _requests(session_ids: list[str]) -> dict[str, st.SearchStrategy]:
    """Each field mixes well-formed values (so that many calls reach the turns themselves) with
    hostile ones."""
    session_id = st.sampled_from(session_ids) | st.just("tenant-a:" + "0" * 24) | TEXT
    namespace = st.sampled_from(["", "tenant-a", "tenant-b", "default", "bad ns"]) | TEXT
    token_ids = st.lists(st.integers(0, 600), max_size=30) | st.lists(U32, max_size=30)
    messages = st.lists(st.builds(pb.Message, role=st.sampled_from(["system", "user", "assistant", "tool", "wizard"])
                                  | TEXT, content=st.text(max_size=120)), max_size=3)
    inputs = st.none() | st.builds(pb.Input, tokens=st.builds(pb.TokenIds, ids=token_ids)) | \
        st.builds(pb.Input, messages=st.builds(pb.Messages, items=messages))
    sampling = st.none() | st.builds(
        pb.SamplingParams, max_tokens=st.integers(0, 8), temperature=st.floats(0, 2), top_p=st.floats(0, 1),
        seed=st.none() | st.integers(0, 2**64 - 1)) | st.builds(
        pb.SamplingParams, max_tokens=st.integers(0, 12) | U32, temperature=FLOAT, top_k=U32, top_p=FLOAT,
        seed=st.none() | st.integers(0, 2**64 - 1), stop_token_ids=st.lists(U32, max_size=3),
        stop=st.lists(TEXT, max_size=2), ignore_eos=st.booleans())
    request_id = st.just("") | st.sampled_from(["r1", "r2"]) | st.text(max_size=140)
    metadata = st.dictionaries(TEXT, TEXT, max_size=3)
    return {
        "CreateSession": st.builds(pb.CreateSessionRequest, namespace=namespace,
                                   model=st.sampled_from(["", "tiny"]) | TEXT, system_prompt=st.text(max_size=200),
                                   metadata=metadata),
        "Append": st.builds(pb.AppendRequest, session_id=session_id, input=inputs, request_id=request_id),
        "Generate": st.builds(pb.GenerateRequest, session_id=session_id, input=inputs, sampling=sampling,
                              request_id=request_id, worker_id=st.sampled_from(["", "w0", "w1"]) | TEXT,
                              skip_cache=st.booleans()),
        "Fork": st.builds(pb.ForkRequest, session_id=session_id, metadata=metadata),
        "GetSession": st.builds(pb.GetSessionRequest, session_id=session_id, include_tokens=st.booleans()),
        "ListSessions": st.builds(pb.ListSessionsRequest, namespace=namespace, limit=st.integers(0, 2000) | U32),
        # Closing is rare, so that most of the sessions stay open for the turns.
        "CloseSession": st.builds(pb.CloseSessionRequest, session_id=st.sampled_from(session_ids[-2:]) | TEXT),
        "Pin": st.builds(pb.PinRequest, session_id=session_id, ttl_seconds=st.integers(0, 4000) | U32),
        "Prefetch": st.builds(pb.PrefetchRequest, session_id=session_id),
        "GetStats": st.builds(pb.GetStatsRequest),
        # Not the workers' real ids: draining them is tests/test_admin.py's (a drain waits for generations).
        "DrainWorker": st.builds(pb.DrainWorkerRequest, worker_id=TEXT.filter(lambda w: not re.fullmatch(r"w\d+", w)),
                                 timeout_seconds=FLOAT),
        "FlushNamespace": st.builds(pb.FlushNamespaceRequest, namespace=namespace),
        "SubscribeKVEvents": st.builds(pb.SubscribeKVEventsRequest, namespace=namespace),
    }


FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.mark.slow
def test_raw_bytes_to_every_method(fuzz_env):
    @settings(FUZZ, max_examples=RAW_CASES)
    @given(method=METHODS, data=st.binary(max_size=300), metadata=AUTH)
    def case(method, data, metadata):
        _cases["raw"] += 1
        code = _call(fuzz_env["channel"], method, data, metadata)
        assert code in DOCUMENTED, (method, data, code)
    case()


@pytest.mark.slow
def test_structured_requests_to_every_method(fuzz_env):
    requests = _requests(fuzz_env["session_ids"])

    @settings(FUZZ, max_examples=STRUCTURED_CASES)
    @given(request=METHODS.flatmap(lambda m: st.tuples(st.just(m), requests[m])), metadata=AUTH)
    def case(request, metadata):
        _cases["structured"] += 1
        method, message = request
        code = _call(fuzz_env["channel"], method, message.SerializeToString(), metadata)
        _seen[method, code] += 1
        assert code in DOCUMENTED, (method, message, code)
    case()


def test_the_server_is_healthy_after_the_fuzzing(fuzz_env):
    assert _cases["raw"] >= RAW_CASES and _cases["structured"] >= STRUCTURED_CASES  # >= 3,500 cases per run
    print(sorted((m, c.name, n) for (m, c), n in _seen.items()))
    assert _seen["Generate", C.OK] and _seen["Append", C.OK]  # the fuzzer also reached the turns themselves
    server = fuzz_env["server"]
    health = health_pb2_grpc.HealthStub(fuzz_env["channel"]).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    internal = [k for k in ("INTERNAL", "UNKNOWN") if server.metrics.registry.get_sample_value(
        "kvstore_session_requests_total", {"method": "Generate", "code": k})]
    assert not internal
    with SessionClient(server.address, api_key="key-b") as kv:
        s = kv.create_session(system_prompt="after the storm").session_id
        g = kv.generate(s, messages=[{"role": "user", "content": "still fine?"}], max_tokens=4, ignore_eos=True)
        assert len(g.result().ids) == 4
