"""The session service under pressure, end to end (real Redis, real gRPC, real Ray with the
tiny model): Redis out of memory (a turn applied once, never INTERNAL, nothing half-made),
request ids that eviction cannot reach, bounded sessions (context, history, sessions per
namespace, idle TTL), the event loop free while a huge request is tokenized, fair admission
(two tenants; no admitted generation idles inside a worker), a Redis pool that waits, a
Redis restart, the eviction-policy check, malformed protobuf on both services, capped
echoes, and a pin whose block-store part failed."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import uuid
from collections import Counter

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servicehelpers import API_KEYS, BLOCK, serving, wait_for, worker_stack

from kvstore.client import SessionAPIError, SessionClient
from kvstore.v1 import session_pb2 as pb
from kvstore.v1 import session_pb2_grpc as pb_grpc
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig
from services.common.errors import ConfigError
from services.common.grpc_server import MAX_STATUS_MESSAGE
from services.session.server import SessionServer, SessionServiceConfig
from workers.tokenizer import ByteTokenizer

C = grpc.StatusCode
MAX_SEQS = 4  # per worker: 2 workers run 8 generations at once
CONTEXT = 4096  # the tiny model's


@pytest.fixture(scope="module")
def env(redis_server, tmp_path_factory):
    with worker_stack(redis_server, str(tmp_path_factory.mktemp("ray")), "limits-test", MAX_SEQS) as stack:
        yield {"loop": stack.loop, "pool": stack.pool, "blockstore": stack.blockstore, "redis": stack.redis}


def serve(env, redis_url: str | None = None, **overrides):
    return serving(env["loop"], env["pool"], redis_url or env["redis"].url, **overrides)


@contextlib.contextmanager
def own_redis(policy: str = "noeviction", **config):
    """A Redis of the test's own (its memory limit is changed)."""
    with EmbeddedRedis(EmbeddedRedisConfig(maxmemory="0", maxmemory_policy=policy, **config)) as r:
        yield r


def failure(fn) -> SessionAPIError | None:
    """The error of a call (a Generation is drained), or None if it succeeded."""
    try:
        r = fn()
        if hasattr(r, "result"):
            r.result()
    except SessionAPIError as e:
        return e
    return None


def code_of(fn) -> grpc.StatusCode:
    e = failure(fn)
    return C.OK if e is None else e.code


def history(kv: SessionClient, session_id: str) -> list[int]:
    return list(kv.get_session(session_id, include_tokens=True).token_ids)


def squeeze(rc, margin: int) -> None:
    """Let Redis use only ``margin`` bytes more than it does now."""
    rc.config_set("maxmemory", rc.info("memory")["used_memory"] + margin)


# ---- Redis out of memory ---------------------------------------------------------------------


def test_turns_under_oom_are_resource_exhausted_or_applied_once(env):
    """A sweep of memory margins around a turn's size, on the volatile-lru setup sessions
    used to share with blocks: each call is applied or RESOURCE_EXHAUSTED (never INTERNAL),
    and its same-id retry, with memory back, leaves the turn in the history exactly once."""
    seen = Counter()
    with own_redis("volatile-lru") as r, serve(env, r.url, idle_session_ttl_s=0) as server, \
            SessionClient(server.address, api_key="key-a") as kv:
        rc = r.client()
        for step in range(24):
            payload = [1 + step] * 1200
            s = kv.create_session().session_id
            squeeze(rc, step * 4096)
            first = failure(lambda: kv.append(s, tokens=payload, request_id="a"))
            rc.config_set("maxmemory", 0)
            assert first is None or (first.code is C.RESOURCE_EXHAUSTED and "memory" in first.message), first
            assert kv.append(s, tokens=payload, request_id="a") == len(payload)
            assert history(kv, s) == payload
            seen["append", first is None] += 1

            squeeze(rc, step * 4096)
            first = failure(lambda: kv.generate(s, tokens=payload[:300], max_tokens=4, ignore_eos=True,
                                                request_id="g"))
            rc.config_set("maxmemory", 0)
            assert first is None or first.code is C.RESOURCE_EXHAUSTED, first
            again = kv.generate(s, tokens=payload[:300], max_tokens=4, ignore_eos=True, request_id="g").result()
            assert history(kv, s) == payload + payload[:300] + again.ids
            seen["generate", first is None] += 1
    # The sweep crossed the limit both ways for both calls.
    assert all(seen[call, ok] for call in ("append", "generate") for ok in (True, False)), seen


def test_request_ids_survive_eviction_pressure(env):
    """volatile-lru evicts keys with a TTL first: request-id records must not be such keys,
    or a retry after memory pressure appends the turn again."""
    with own_redis("volatile-lru") as r, serve(env, r.url, idle_session_ttl_s=0) as server, \
            SessionClient(server.address, api_key="key-a") as kv:
        s = kv.create_session(system_prompt="be brief").session_id
        n = kv.append(s, tokens=[7] * 300, request_id="tool-1")
        g = kv.generate(s, tokens=[8, 9], max_tokens=6, ignore_eos=True, request_id="turn-1").result()
        rc = r.client()
        squeeze(rc, 2 << 20)
        with pytest.raises(Exception, match="OOM|maxmemory"):  # other data fills Redis up
            for i in range(10_000):
                rc.set(f"filler:{i}", b"x" * 16384)
        rc.config_set("maxmemory", 0)
        assert kv.append(s, tokens=[7] * 300, request_id="tool-1") == n
        again = kv.generate(s, tokens=[8, 9], max_tokens=6, ignore_eos=True, request_id="turn-1").result()
        assert again.ids == g.ids and len(history(kv, s)) == g.usage.num_tokens


def test_create_session_under_oom_leaves_nothing(env):
    seen = Counter()
    with own_redis() as r, serve(env, r.url) as server, SessionClient(server.address, api_key="key-a") as kv:
        rc = r.client()
        kv.create_session()  # the namespace's index exists
        for step in range(48):
            keys, index = set(rc.keys()), rc.zrange("sessidx:tenant-a", 0, -1)
            squeeze(rc, step * 2048)
            e = failure(lambda: kv.create_session(system_prompt="plan " * 800, metadata={"k": "v" * 2000}))
            rc.config_set("maxmemory", 0)
            seen[e is None] += 1
            if e is None:
                continue
            assert e.code is C.RESOURCE_EXHAUSTED and "retry" in e.message, e
            assert set(rc.keys()) == keys and rc.zrange("sessidx:tenant-a", 0, -1) == index  # nothing half-made
        assert seen[True] and seen[False], seen
        listed = kv.list_sessions(limit=1000)
        assert len(listed) == seen[True] + 1 and all(kv.get_session(x.session_id).num_tokens for x in listed[:-1])


def test_an_index_that_cannot_be_refreshed_does_not_fail_an_applied_turn(env, caplog):
    with own_redis() as r, serve(env, r.url) as server, SessionClient(server.address, api_key="key-a") as kv:
        s = kv.create_session().session_id
        rc = r.client()
        rc.delete("sessidx:tenant-a")
        rc.set("sessidx:tenant-a", "not a sorted set")  # every index write now fails
        assert kv.append(s, tokens=[1, 2, 3], request_id="a") == 3
        g = kv.generate(s, tokens=[4], max_tokens=3, ignore_eos=True, request_id="g").result()
        assert history(kv, s) == [1, 2, 3, 4] + g.ids
        assert "could not refresh session" in caplog.text


# ---- bounded sessions ---------------------------------------------------------------------------


def test_context_and_history_limits(env):
    with serve(env, max_history_tokens=1000) as small, serve(env) as server, \
            SessionClient(server.address, api_key="key-a") as kv, SessionClient(small.address, api_key="key-a") as sk:
        e = failure(lambda: kv.create_session(system_prompt="x" * CONTEXT))  # over the model's context
        assert e.code is C.INVALID_ARGUMENT and str(CONTEXT) in e.message
        s = kv.create_session().session_id
        assert kv.append(s, tokens=[1] * 4000) == 4000
        assert code_of(lambda: kv.append(s, tokens=[1] * 97)) is C.INVALID_ARGUMENT
        assert code_of(lambda: kv.append(s, messages=[{"role": "tool", "content": "y" * 200}])) is C.INVALID_ARGUMENT
        assert code_of(lambda: kv.generate(s, tokens=[1] * 50, max_tokens=50)) is C.INVALID_ARGUMENT
        assert kv.append(s, tokens=[1] * 96) == CONTEXT  # up to the limit exactly
        assert len(history(kv, s)) == CONTEXT

        t = sk.create_session().session_id
        assert code_of(lambda: sk.append(t, tokens=[2] * 1001)) is C.INVALID_ARGUMENT
        sk.append(t, tokens=[2] * 990)
        assert code_of(lambda: sk.generate(t, tokens=[3], max_tokens=10)) is C.INVALID_ARGUMENT
        g = sk.generate(t, tokens=[3], max_tokens=9, ignore_eos=True).result()
        assert g.usage.num_tokens == 1000
        fork = sk.fork(t)  # within the limit by construction
        assert fork.num_tokens == 1000 and code_of(lambda: sk.append(fork.session_id, tokens=[1])) is C.INVALID_ARGUMENT


def test_sessions_per_namespace_and_idle_ttl(env):
    with own_redis() as r, serve(env, r.url, max_sessions_per_namespace=3, idle_session_ttl_s=1.5) as server, \
            SessionClient(server.address, api_key="key-a") as kv, SessionClient(server.address, api_key="key-b") as kb:
        rc = r.client()
        a, b = kv.create_session().session_id, kv.create_session(system_prompt="keep me").session_id
        c = kv.fork(b).session_id  # a fork is a session too
        e = failure(kv.create_session)
        assert e.code is C.RESOURCE_EXHAUSTED and "3 open sessions" in e.message
        assert code_of(lambda: kv.fork(a)) is C.RESOURCE_EXHAUSTED
        assert kb.create_session().namespace == "tenant-b"  # another namespace has its own count
        kv.close_session(c)  # a closed session does not count
        c = kv.create_session().session_id

        def ttls(session_id: str) -> list[int]:
            ns, raw = session_id.split(":")
            return [rc.pttl(k) for k in rc.keys(f"sess:{{{ns}:{raw}}}:*")]
        assert all(0 < t <= 1500 for t in ttls(a))  # every key of a session expires with it
        kv.pin(b, 600)  # a pin keeps its session at least until it ends
        assert all(t > 590_000 for t in ttls(b))
        assert wait_for(lambda: code_of(lambda: kv.get_session(a)) is C.NOT_FOUND, timeout=10)
        assert not rc.keys(f"sess:{{{a}}}*")
        assert kv.get_session(b).pinned_until > 0
        d = kv.create_session().session_id  # room again: the expired session left the count
        time.sleep(0.6)
        kv.append(d, tokens=[1])  # every write refreshes the TTL
        assert all(t > 1000 for t in ttls(d))
        assert {b, d} <= {x.session_id for x in kv.list_sessions()} <= {b, c, d}


def test_requests_over_max_message_bytes_are_refused(env):
    with serve(env) as server, SessionClient(server.address, api_key="key-a") as kv:
        assert code_of(lambda: kv.create_session(system_prompt="x" * (9 << 20))) is C.RESOURCE_EXHAUSTED
        assert kv.create_session().session_id


def test_inputs_over_max_input_tokens_are_refused(env):
    with serve(env, max_input_tokens=100) as server, SessionClient(server.address, api_key="key-a") as kv:
        sid = kv.create_session().session_id
        e = failure(lambda: kv.append(sid, messages=[{"role": "user", "content": "x" * 101}]))
        assert e.code is C.INVALID_ARGUMENT and "at least 101 tokens" in e.message  # refused untokenized
        e = failure(lambda: kv.append(sid, messages=[{"role": "user", "content": "x" * 98}]))
        assert e.code is C.INVALID_ARGUMENT and "is 101 tokens, over max_input_tokens (100)" in e.message
        e = failure(lambda: kv.append(sid, tokens=[1] * 101))
        assert e.code is C.INVALID_ARGUMENT and "is 101 tokens" in e.message
        assert kv.append(sid, messages=[{"role": "user", "content": "x" * 97}]) == 100
        assert kv.append(sid, tokens=[1] * 100) == 200
        assert history(kv, sid)[100:] == [1] * 100  # nothing of the refused inputs was kept


def test_health_answers_while_huge_requests_arrive(env):
    with serve(env, max_message_bytes=32 << 20) as server:
        stop, worst = threading.Event(), []

        def probe():
            with grpc.insecure_channel(server.address) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                while not stop.is_set():
                    start = time.monotonic()
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status
                    worst.append((time.monotonic() - start, status))
                    time.sleep(0.05)
        thread = threading.Thread(target=probe)
        thread.start()
        try:
            with SessionClient(server.address, api_key="key-a") as kv:  # 12M characters each, far over the context
                errors = []
                while thread.is_alive() and (len(worst) < 5 or len(errors) < 4):  # health is probed meanwhile
                    errors.append(failure(lambda: kv.create_session(system_prompt="x" * (12 << 20))))
        finally:
            stop.set()
            thread.join()
    assert len(worst) >= 5 and max(t for t, _ in worst) < 1.0, max(worst)
    assert {s for _, s in worst} == {health_pb2.HealthCheckResponse.SERVING}
    assert all(e.code is C.INVALID_ARGUMENT and "system prompt" in e.message for e in errors), errors


# ---- fair admission ----------------------------------------------------------------------------


def _turn_request(session_id: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(session_id=session_id, input=pb.Input(tokens=pb.TokenIds(ids=[1, 2, 3])),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                              request_id=uuid.uuid4().hex)


async def _stream(stub, key: str, session_id: str, max_tokens: int, started: list | None = None) -> tuple[float, int]:
    """(time of the first token, tokens received) of one Generate; appends to ``started`` at
    its first token."""
    first, n = 0.0, 0
    async for r in stub.Generate(_turn_request(session_id, max_tokens), metadata=(("authorization", f"Bearer {key}"),),
                                 timeout=300):
        if r.HasField("chunk") and r.chunk.ids:
            if not first:
                first = time.monotonic()
                (started if started is not None else []).append(session_id)
            n += len(r.chunk.ids)
    return first, n


def test_one_tenants_burst_does_not_starve_another_and_admitted_generations_run(env):
    """Tenant A starts 64 streams, 8 run (2 workers x 4 sequences) and 56 queue; then tenant B
    starts 4: B's start as soon as slots free, before most of A's queue. No worker ever holds
    more sequences than it runs (none waits inside a worker without producing tokens)."""
    pool = env["pool"]
    # Slowed steps (>= 1.2 s a stream): A's first streams still run when its queue has filled up, on any machine.
    with slow_workers(env, 0.05), serve(env) as server, SessionClient(server.address, api_key="key-a") as kv, \
            SessionClient(server.address, api_key="key-b") as kb:
        a_sessions = [kv.create_session().session_id for _ in range(64)]
        b_sessions = [kb.create_session().session_id for _ in range(4)]
        queued = lambda: server.metrics.registry.get_sample_value("kvstore_session_queued_generations")  # noqa: E731

        async def scenario():
            samples, done = [], asyncio.Event()

            async def sample_workers():
                while not done.is_set():
                    stats = await asyncio.gather(*(pool.handle(w).stats.remote() for w in pool.worker_ids))
                    samples.append([s.running + s.waiting for s in stats])
                    await asyncio.sleep(0.05)
            async with grpc.aio.insecure_channel(server.address) as ch:
                stub = pb_grpc.SessionsStub(ch)
                sampler = asyncio.create_task(sample_workers())
                started = []
                a = [asyncio.create_task(_stream(stub, "key-a", s, 24, started)) for s in a_sessions]
                async with asyncio.timeout(60):  # A fills both workers and queues the rest
                    while len(started) < 2 * MAX_SEQS or (queued() or 0) < 40:
                        await asyncio.sleep(0.01)
                max_queued = queued()
                b = [asyncio.create_task(_stream(stub, "key-b", s, 8)) for s in b_sessions]
                results = await asyncio.gather(*a, *b, return_exceptions=True)
                done.set()
                await sampler
            return results[:64], results[64:], samples, max_queued
        a, b, samples, max_queued = asyncio.run(scenario())
    errors = [r for r in a + b if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(n == 24 for _, n in a) and all(n == 8 for _, n in b)
    a_starts = sorted(t for t, _ in a)
    b_starts = sorted(t for t, _ in b)
    assert b_starts[-1] < a_starts[31], ("tenant B waited behind tenant A's queue", [round(t - a_starts[0], 2) for t in
                                                                                      a_starts + b_starts])
    assert max_queued >= 40 and max(max(s) for s in samples) <= MAX_SEQS, (max_queued, max(max(s) for s in samples))


# Run inside the workers (``__ray_call__``), whose processes cannot import this module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _steps_take_at_least(self, seconds: float) -> None:
    """In a worker: each engine step lasts ``seconds`` or more (0: as the class has it)."""
    if not seconds:
        self.engine.__dict__.pop("step", None)
        return
    step = type(self.engine).step.__get__(self.engine)
    self.engine.step = lambda: (time.sleep(seconds), step())[1]


@contextlib.contextmanager
def slow_workers(env, seconds: float):
    """Generations that hold their slot for the whole test on any machine: a fast one ran a
    3000-token holder to its end (or out of T0) before the test was done with it."""
    handles = [env["pool"].handle(w) for w in env["pool"].worker_ids]
    ray.get([h.__ray_call__.remote(_steps_take_at_least, seconds) for h in handles])
    try:
        yield
    finally:
        ray.get([h.__ray_call__.remote(_steps_take_at_least, 0) for h in handles])


def test_a_queued_generation_starts_or_is_refused_within_its_deadline(env):
    with slow_workers(env, 0.01), \
            serve(env, max_concurrent_generations=1, max_queued_generations=1, queue_timeout_s=2.0) as server, \
            SessionClient(server.address, api_key="key-a") as kv, \
            SessionClient(server.address, api_key="key-a", timeout_s=1.5) as hurried:
        s1, s2, s3 = (kv.create_session().session_id for _ in range(3))
        holder = kv.generate(s1, tokens=[1], max_tokens=1500, ignore_eos=True)  # 15 s or more
        it = iter(holder)
        next(it)  # holds the only slot
        start = time.monotonic()
        e = failure(lambda: kv.generate(s2, tokens=[1], max_tokens=2))  # queued, then the queue timeout
        assert e.code is C.RESOURCE_EXHAUSTED and "freed within 2.0 s" in e.message, e
        assert 1.9 < time.monotonic() - start < 4
        start = time.monotonic()  # a deadline sooner than the queue timeout: refused before the deadline
        assert code_of(lambda: hurried.generate(s2, tokens=[1], max_tokens=2)) is C.RESOURCE_EXHAUSTED
        assert time.monotonic() - start < 1.5
        waiting = kv.generate(s2, tokens=[1], max_tokens=2)  # takes the one queue place ...
        outcome = {}
        t = threading.Thread(target=lambda: outcome.setdefault("e", failure(waiting.result)))
        t.start()
        time.sleep(0.3)
        e = failure(lambda: hurried.generate(s3, tokens=[1], max_tokens=2))
        assert e.code is C.RESOURCE_EXHAUSTED and "max_queued_generations" in e.message, e  # the queue is full
        waiting.cancel()  # ... and cancelling it frees the place
        t.join()
        assert outcome["e"].code is C.CANCELLED
        e = failure(lambda: hurried.generate(s3, tokens=[1], max_tokens=2))
        assert e.code is C.RESOURCE_EXHAUSTED and "freed within" in e.message, e  # queued this time
        holder.cancel()
        assert wait_for(lambda: code_of(lambda: kv.generate(s3, tokens=[1], max_tokens=2, ignore_eos=True)) is C.OK,
                        timeout=10)


def test_two_hundred_concurrent_get_session_calls_wait_for_redis_connections(env):
    with serve(env) as server, SessionClient(server.address, api_key="key-a") as kv:
        s = kv.create_session(system_prompt="shared").session_id
        n = kv.get_session(s).num_tokens

        async def scenario():
            async with grpc.aio.insecure_channel(server.address) as ch:
                stub, md = pb_grpc.SessionsStub(ch), (("authorization", "Bearer key-a"),)
                env["redis"].client().client_pause(1000)  # Redis stalls: every call holds its connection
                return await asyncio.gather(*(stub.GetSession(pb.GetSessionRequest(session_id=s, include_tokens=True),
                                                              metadata=md, timeout=60) for _ in range(200)),
                                            return_exceptions=True)
        replies = asyncio.run(scenario())
    assert not [r for r in replies if isinstance(r, BaseException)], [r for r in replies if isinstance(r, Exception)][:3]
    assert n > 0 and {r.num_tokens for r in replies} == {n}


def test_calls_after_a_redis_restart_succeed(env):
    with own_redis(appendonly=True) as r, serve(env, r.url) as server, \
            SessionClient(server.address, api_key="key-a") as kv:
        s = kv.create_session(system_prompt="durable").session_id
        n = kv.append(s, tokens=[1, 2, 3])
        for _ in range(20):  # every pooled connection has been used
            kv.get_session(s)
        r.restart()  # the pooled connections are now closed by the server
        assert [kv.get_session(s).num_tokens for _ in range(20)] == [n] * 20
        assert kv.generate(s, tokens=[4], max_tokens=2, ignore_eos=True).result().usage.num_tokens == n + 3


def test_a_redis_that_could_evict_session_state_is_refused(env, caplog):
    def start(url: str, **overrides) -> SessionServer:
        server = SessionServer(SessionServiceConfig(port=0, redis_url=url, api_keys=API_KEYS, **overrides),
                               env["pool"], ByteTokenizer(env["pool"].info.vocab_size))
        env["loop"].run(server.start())
        env["loop"].run(server.stop(grace=0))
        return server
    with own_redis("allkeys-lru") as r:
        with pytest.raises(ConfigError, match="allkeys-lru.*noeviction"):
            start(r.url, idle_session_ttl_s=0)
    with own_redis("volatile-lru") as r:
        with pytest.raises(ConfigError, match="volatile-lru.*idle_session_ttl_s=0"):
            start(r.url)
        start(r.url, idle_session_ttl_s=0)  # no session key has a TTL then
    with own_redis("allkeys-lru", extra_args=("--rename-command", "CONFIG", "")) as r:
        with caplog.at_level(logging.WARNING):
            start(r.url)  # the policy cannot be read (as on some managed Redis): a warning
        assert "maxmemory-policy" in caplog.text


# ---- errors --------------------------------------------------------------------------------------


def test_malformed_protobuf_is_invalid_argument_on_both_services(env, caplog):
    garbage = [b"\xff\xff\xff\xff", b"\x0a\x05\xff\xfe\xfd\xfc\xfb", b"\x12"]  # bad tag, bad UTF-8, truncated
    with serve(env) as server, caplog.at_level(logging.INFO):
        for address, methods in ((server.address, ["/kvstore.v1.Sessions/GetSession",
                                                   "/kvstore.v1.Sessions/CreateSession"]),
                                 (env["blockstore"].address, ["/kvstore.v1.BlockStore/Lookup",
                                                              "/kvstore.v1.BlockStore/Put"])):
            with grpc.insecure_channel(address) as ch:
                for method in methods:
                    call = ch.unary_unary(method)
                    for data in garbage * 10:
                        with pytest.raises(grpc.RpcError) as e:
                            call(data, timeout=10)
                        assert e.value.code() is C.INVALID_ARGUMENT and "malformed" in e.value.details()
                stream = ch.unary_stream("/kvstore.v1.Sessions/Generate" if address == server.address
                                         else "/kvstore.v1.BlockStore/Get")
                with pytest.raises(grpc.RpcError) as e:
                    list(stream(garbage[0], timeout=10))
                assert e.value.code() is C.INVALID_ARGUMENT
        requests = server.metrics.registry.get_sample_value(
            "kvstore_session_requests_total", {"method": "GetSession", "code": "INVALID_ARGUMENT"})
        assert requests == 30  # counted like any other call
    assert not [r for r in caplog.records if r.exc_info] and "Traceback" not in caplog.text
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) <= 1  # rate limited


def test_echoed_user_strings_are_capped(env):
    long = "z" * 100_000
    with serve(env) as server, SessionClient(server.address, api_key="key-a") as kv, \
            SessionClient(server.address, api_key="admin") as admin:
        s = kv.create_session().session_id
        cases = {
            "model": (lambda: kv.create_session(model=long), C.NOT_FOUND),
            "worker_id": (lambda: kv.generate(s, tokens=[1], max_tokens=2, worker_id=long), C.INVALID_ARGUMENT),
            "session id": (lambda: kv.get_session("tenant-a:" + long), C.INVALID_ARGUMENT),
            "namespace": (lambda: admin.create_session(namespace=long), C.INVALID_ARGUMENT),
            "request id": (lambda: kv.append(s, tokens=[1], request_id=long), C.INVALID_ARGUMENT),
            "role": (lambda: kv.append(s, messages=[{"role": long, "content": "x"}]), C.INVALID_ARGUMENT),
        }
        for name, (call, code) in cases.items():
            e = failure(call)
            assert e is not None and e.code is code, (name, e)
            assert len(e.message) <= MAX_STATUS_MESSAGE + 40, (name, len(e.message))


def test_pin_reports_unavailable_when_the_block_store_cannot_keep_the_blocks(env):
    with serve(env, blockstore_address="127.0.0.1:9") as server, SessionClient(server.address, api_key="key-a") as kv:
        s = kv.create_session(system_prompt="pin me " * 20).session_id
        assert kv.get_session(s).num_tokens > 4 * BLOCK
        e = failure(lambda: kv.pin(s, 600))
        assert e.code is C.UNAVAILABLE and "recorded" in e.message and "retry" in e.message
        assert kv.get_session(s).pinned_until > time.time() + 500  # the pin itself holds
