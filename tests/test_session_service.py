"""The session service end to end over gRPC: a real local Ray with two decode workers, a real
block store and real Redis. Greedy outputs equal the in-process engine computing everything;
usage reports the reuse; retries, restarts, a killed worker, bad input and 16 concurrent
sessions."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import ray
import redis.exceptions as rex
from servicehelpers import LoopThread, reference, start_pool, start_server, wait_for, worker_config

from kvstore.client import SessionAPIError, SessionClient
from services.blockstore.server import BlockStoreConfig, BlockStoreThread
from services.blockstore.store import RedisBlockStore
from services.session.pool import PoolConfig
from services.session.service import _classify
from services.session.state import SessionStore

SYSTEM = "You are a careful planning agent. Think step by step and call tools when needed. " * 2


@pytest.fixture(scope="module")
def service(redis_server, tmp_path_factory):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    blockstore = BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_server.url))
    blockstore.start()
    loop = LoopThread()
    pool = start_pool(loop, PoolConfig(num_workers=2, worker=worker_config(blockstore.address), poll_interval_s=0.05,
                                       name_prefix="svc-test"))
    server = start_server(loop, pool, redis_server.url, blockstore_address=blockstore.address)
    state = {"loop": loop, "pool": pool, "server": server, "redis_url": redis_server.url, "redis": redis_server}
    yield state
    loop.run(state["server"].stop(grace=0))
    loop.run(pool.close())
    loop.close()
    blockstore.stop()
    ray.shutdown()


@pytest.fixture
def kv(service):
    with SessionClient(service["server"].address, api_key="key-a") as client:
        yield client


def history(kv: SessionClient, session_id: str) -> list[int]:
    return list(kv.get_session(session_id, include_tokens=True).token_ids)


def turn(kv, session_id, max_tokens=8, **kw):
    """Run one turn; returns (prompt the model saw, generation)."""
    before = history(kv, session_id)
    g = kv.generate(session_id, max_tokens=max_tokens, ignore_eos=True, **kw).result()
    after = history(kv, session_id)
    prompt = after[:g.usage.prompt_tokens]
    assert prompt[:len(before)] == before and after[len(prompt):len(prompt) + len(g.ids)] == g.ids
    return prompt, g


def test_turns_append_fork_and_close_match_the_engine(kv, service):
    s = kv.create_session(system_prompt=SYSTEM, metadata={"agent": "planner"})
    assert s.session_id.startswith("tenant-a:") and s.num_tokens > 0 and s.metadata["agent"] == "planner"
    p1, g1 = turn(kv, s.session_id, messages=[{"role": "user", "content": "Plan a trip to Kyoto."}])
    assert g1.ids == reference(p1, 8) and g1.usage.completion_tokens == 8
    assert g1.usage.finish_reason == "length" and g1.usage.ttft_seconds > 0
    n = kv.append(s.session_id, messages=[{"role": "tool", "content": '{"weather": "sunny"}'}])
    assert n == history(kv, s.session_id).__len__() and n > g1.usage.num_tokens
    p2, g2 = turn(kv, s.session_id, messages=[{"role": "user", "content": "And the budget?"}])
    assert g2.ids == reference(p2, 8)
    u = g2.usage  # the history of turn 1 came back from a cache (sticky worker: T0)
    assert u.cached_tokens_t0 + u.cached_tokens_t1 + u.cached_tokens_t2 >= len(p1) // 4 * 4 - 4
    assert u.worker_id == g1.usage.worker_id
    assert u.num_tokens == len(history(kv, s.session_id))

    fork = kv.fork(s.session_id, metadata={"branch": "b"})
    assert fork.parent_id == s.session_id and fork.num_tokens == u.num_tokens
    p3, g3 = turn(kv, fork.session_id, messages=[{"role": "user", "content": "Try Osaka instead."}])
    assert g3.ids == reference(p3, 8) and sum((g3.usage.cached_tokens_t0, g3.usage.cached_tokens_t1,
                                                g3.usage.cached_tokens_t2)) > 0
    assert history(kv, s.session_id)[:u.num_tokens] == history(kv, fork.session_id)[:u.num_tokens]
    assert kv.get_session(s.session_id).num_tokens == u.num_tokens  # the fork did not touch its parent

    raw = kv.generate(s.session_id, tokens=[1, 2, 3], max_tokens=4, ignore_eos=True).result()  # token input
    assert raw.usage.prompt_tokens == u.num_tokens + 3
    listed = {x.session_id: x for x in kv.list_sessions()}
    assert listed[s.session_id].num_tokens == raw.usage.num_tokens
    assert listed[fork.session_id].num_tokens == len(history(kv, fork.session_id))
    assert listed[fork.session_id].parent_id == s.session_id and listed[s.session_id].metadata["agent"] == "planner"
    closed = kv.close_session(s.session_id)
    assert closed.closed and kv.close_session(s.session_id).closed  # idempotent
    with pytest.raises(SessionAPIError) as e:
        kv.generate(s.session_id, messages=[{"role": "user", "content": "more"}]).result()
    assert e.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert kv.get_session(s.session_id).closed


def test_skip_cache_computes_everything_with_the_same_output(kv):
    s = kv.create_session(system_prompt=SYSTEM)
    p1, g1 = turn(kv, s.session_id, messages=[{"role": "user", "content": "hi"}])
    f = kv.fork(s.session_id)
    p2, reused = turn(kv, s.session_id, messages=[{"role": "user", "content": "next"}])
    p3, computed = turn(kv, f.session_id, messages=[{"role": "user", "content": "next"}], skip_cache=True)
    assert p2 == p3 and reused.ids == computed.ids == reference(p2, 8)
    assert reused.usage.cached_tokens_t0 > 0
    assert (computed.usage.cached_tokens_t0, computed.usage.cached_tokens_t1, computed.usage.cached_tokens_t2) == (0, 0, 0)


def test_retried_generate_and_append_are_applied_once(kv):
    s = kv.create_session(system_prompt=SYSTEM)
    g = kv.generate(s.session_id, messages=[{"role": "user", "content": "q"}], max_tokens=6, request_id="turn-1").result()
    again = kv.generate(s.session_id, messages=[{"role": "user", "content": "q"}], max_tokens=6,
                        request_id="turn-1").result()
    assert again.ids == g.ids and again.text == g.text and again.usage.num_tokens == g.usage.num_tokens
    assert kv.get_session(s.session_id).num_tokens == g.usage.num_tokens
    n = kv.append(s.session_id, tokens=[5, 6], request_id="tool-1")
    assert kv.append(s.session_id, tokens=[5, 6], request_id="tool-1") == n == g.usage.num_tokens + 2
    kv.close_session(s.session_id)  # retries of requests that succeeded before the close still get their results
    assert kv.append(s.session_id, tokens=[5, 6], request_id="tool-1") == n
    late = kv.generate(s.session_id, messages=[{"role": "user", "content": "q"}], max_tokens=6,
                       request_id="turn-1").result()
    assert late.ids == g.ids and late.usage == g.usage
    closed = grpc.StatusCode.FAILED_PRECONDITION
    assert _codes(lambda: kv.append(s.session_id, tokens=[7], request_id="tool-2")) is closed
    assert kv.get_session(s.session_id).num_tokens == n


def _sampled_turn(max_tokens: int = 600) -> dict:
    """A turn long enough to overlap with another call, sampled so two generations differ."""
    return dict(messages=[{"role": "user", "content": "surprise me"}], max_tokens=max_tokens, temperature=1.0,
                ignore_eos=True, request_id="turn-1")


def _drain_in_background(stream) -> tuple[threading.Thread, dict]:
    """Consume a started Generate stream on a thread; the dict gets 'end' (when it ended) and
    'error' (the status code, if it failed)."""
    out: dict = {}

    def drain():
        try:
            for _ in stream:
                pass
        except SessionAPIError as e:
            out["error"] = e.code
        out["end"] = time.monotonic()
    thread = threading.Thread(target=drain)
    thread.start()
    return thread, out


def test_a_retry_overlapping_its_first_attempt_gets_the_recorded_turn(kv):
    s = kv.create_session(system_prompt=SYSTEM)
    before = history(kv, s.session_id)
    first = kv.generate(s.session_id, **_sampled_turn())
    it = iter(first)
    next(it)  # the first attempt holds the request id and streams
    thread, first_out = _drain_in_background(it)
    retried_at = time.monotonic()
    retry = kv.generate(s.session_id, **_sampled_turn()).result()  # e.g. after a client-side timeout
    thread.join(60)
    assert retried_at < first_out["end"] and "error" not in first_out  # they overlapped
    assert len(first.ids) == 600 and retry.ids == first.ids and retry.text == first.text
    assert retry.usage == first.usage
    after = history(kv, s.session_id)  # what both callers received is what was recorded, once
    p = first.usage.prompt_tokens
    assert after[:len(before)] == before and after[p:p + 600] == first.ids and len(after) == first.usage.num_tokens


def test_a_waiting_retry_takes_over_when_the_first_attempt_is_cancelled(kv):
    s = kv.create_session(system_prompt=SYSTEM)
    n = kv.get_session(s.session_id).num_tokens
    first = kv.generate(s.session_id, **_sampled_turn())
    it = iter(first)
    next(it)
    retry = kv.generate(s.session_id, **_sampled_turn())  # waits for the first attempt's request id
    time.sleep(0.3)
    first.cancel()
    with pytest.raises(SessionAPIError) as e:
        list(it)
    assert e.value.code is grpc.StatusCode.CANCELLED
    retry.result()
    after = history(kv, s.session_id)
    p = retry.usage.prompt_tokens
    assert len(retry.ids) == 600 and after[p:p + 600] == retry.ids and len(after) == retry.usage.num_tokens > n


def test_a_lapsed_lease_never_streams_an_answer_that_is_not_recorded(kv, service):
    """Last line of defence: when the first attempt's lease lapsed (Redis unreachable for its
    renewals), two attempts generate; the one recorded second must not report success for
    tokens that are not in the history."""
    s = kv.create_session(system_prompt=SYSTEM)
    namespace, raw = s.session_id.split(":")
    first = kv.generate(s.session_id, **_sampled_turn())
    it = iter(first)
    next(it)
    service["redis"].client().delete(SessionStore._lease_key(namespace, raw, "turn-1"))  # as if it lapsed
    first_thread, first_out = _drain_in_background(it)
    second = kv.generate(s.session_id, **_sampled_turn())
    second_thread, second_out = _drain_in_background(second)
    first_thread.join(60)
    second_thread.join(60)
    after = history(kv, s.session_id)
    for gen, out in ((first, first_out), (second, second_out)):
        if "error" in out:
            assert out["error"] is grpc.StatusCode.ABORTED
        else:  # a success is always the recorded answer
            p = gen.usage.prompt_tokens
            assert after[p:p + 600] == gen.ids and gen.usage.num_tokens == len(after)
    assert "error" not in first_out or "error" not in second_out


def test_prefetch_and_pin(kv, service):
    s = kv.create_session(system_prompt=SYSTEM)
    _, g = turn(kv, s.session_id, messages=[{"role": "user", "content": "warm me"}])
    r = kv.prefetch(s.session_id)
    n = kv.get_session(s.session_id).num_tokens
    assert r.worker_id == g.usage.worker_id and n - 4 <= r.cached_tokens <= n
    pool, rc = service["pool"], service["redis"].client()

    def block_ttls(session_id: str) -> list[int]:
        ray.get([pool.handle(w).flush.remote() for w in pool.worker_ids])  # T2 writes are asynchronous
        tokens = history(kv, session_id)
        keys = [RedisBlockStore.key_prefix("tenant-a") + h.hex().encode() for h in pool.block_hashes(tokens, "tenant-a")]
        ttls = [rc.ttl(k) for k in keys]
        present = [t for t in ttls if t != -2]  # the last block's KV may not be computed yet
        assert len(present) >= len(ttls) - 1 and len(present) > 10
        return present
    ten_days = 10 * 86400  # longer than the block store's default TTL (1 day)
    assert all(0 < t <= 86400 for t in block_ttls(s.session_id))
    pinned = kv.pin(s.session_id, ten_days)
    assert pinned.pinned_until > 0 and kv.get_session(s.session_id).pinned_until == pytest.approx(pinned.pinned_until)
    assert all(t > ten_days - 60 for t in block_ttls(s.session_id))  # kept in the cold tier
    turn(kv, s.session_id, messages=[{"role": "user", "content": "a turn of a pinned session"}])
    # Its new blocks too: re-pinned after the reply, in the background.
    assert wait_for(lambda: all(t > ten_days - 60 for t in block_ttls(s.session_id)), timeout=30)
    assert kv.pin(s.session_id, 0).pinned_until == 0


def test_cancelling_a_stream_frees_the_worker_and_records_nothing(kv, service):
    s = kv.create_session(system_prompt=SYSTEM)
    n = kv.get_session(s.session_id).num_tokens
    gen = kv.generate(s.session_id, messages=[{"role": "user", "content": "long"}], max_tokens=2000, ignore_eos=True)
    it = iter(gen)
    next(it)
    gen.cancel()
    with pytest.raises(SessionAPIError) as e:
        list(it)
    assert e.value.code is grpc.StatusCode.CANCELLED
    pool = service["pool"]

    def idle():
        stats = [ray.get(pool.handle(w).stats.remote()) for w in pool.worker_ids]
        return all(st.running == 0 and st.waiting == 0 and st.cache.t0_in_use == 0 for st in stats)
    assert wait_for(idle)
    assert kv.get_session(s.session_id).num_tokens == n


def test_sixteen_concurrent_sessions(service):
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def agent(i: int) -> None:
        try:
            with SessionClient(service["server"].address, api_key="key-b") as c:
                # Nothing shared: the router spreads them by load, not by where a prefix is cached.
                s = c.create_session(system_prompt=f"Agent {i}. {SYSTEM}")
                turns = []
                for t in range(2):
                    turns.append(turn(c, s.session_id, max_tokens=6,
                                      messages=[{"role": "user", "content": f"agent {i} step {t}"}]))
                results[i] = turns
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=agent, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 16
    for turns in results.values():
        for prompt, g in turns:
            assert g.ids == reference(prompt, 6)
    assert {g.usage.worker_id for turns in results.values() for _, g in turns} == {"w0", "w1"}  # both used


def test_sessions_survive_a_restart_of_the_session_service(service):
    with SessionClient(service["server"].address, api_key="key-a") as kv:
        s = kv.create_session(system_prompt=SYSTEM)
        _, g = turn(kv, s.session_id, messages=[{"role": "user", "content": "remember me"}])
        before = history(kv, s.session_id)
    loop = service["loop"]
    loop.run(service["server"].stop(grace=1))
    service["server"] = start_server(loop, service["pool"], service["redis_url"])  # as a new process would
    with SessionClient(service["server"].address, api_key="key-a") as kv:
        assert history(kv, s.session_id) == before
        p, g2 = turn(kv, s.session_id, messages=[{"role": "user", "content": "still there?"}])
        assert p[:len(before)] == before and g2.ids == reference(p, 8)


def test_killed_worker_session_continues_on_another(service):
    pool = service["pool"]
    with SessionClient(service["server"].address, api_key="key-a") as kv:
        s = kv.create_session(system_prompt=SYSTEM)
        _, g1 = turn(kv, s.session_id, messages=[{"role": "user", "content": "turn one"}])
        victim = g1.usage.worker_id
        ray.get(pool.handle(victim).flush.remote())  # T2 writes are asynchronous: let them land
        # Between turns: the sticky worker dies; the next turn runs elsewhere and resumes from T2.
        ray.kill(pool.handle(victim), no_restart=False)
        p2, g2 = turn(kv, s.session_id, messages=[{"role": "user", "content": "turn two"}])
        assert g2.usage.worker_id != victim and g2.ids == reference(p2, 8)
        # Found in T2; the engine recomputes it instead when its measured rates say that is faster.
        assert g2.usage.cached_tokens_t2 + g2.usage.recomputed_tokens_t2 > 0
        assert wait_for(lambda: pool.live_worker_ids == ["w0", "w1"], timeout=120)  # Ray restarted it

        # Mid-stream: kill the worker after the first tokens; the stream goes on elsewhere.
        survivor = g2.usage.worker_id
        gen = kv.generate(s.session_id, messages=[{"role": "user", "content": "turn three"}], max_tokens=1200,
                          ignore_eos=True, worker_id=survivor)
        it = iter(gen)
        next(it)
        ray.kill(pool.handle(survivor), no_restart=False)
        for _ in it:
            pass
        after = history(kv, s.session_id)
        p3 = after[:gen.usage.prompt_tokens]
        assert gen.usage.failovers == 1 and gen.usage.worker_id != survivor
        assert gen.ids == reference(p3, 1200) and len(gen.ids) == 1200
        assert wait_for(lambda: pool.live_worker_ids == ["w0", "w1"], timeout=120)


def _codes(fn) -> grpc.StatusCode:
    with pytest.raises(SessionAPIError) as e:
        r = fn()
        if hasattr(r, "result"):
            r.result()
    return e.value.code


def test_auth_and_bad_input_on_every_rpc(service):
    addr = service["server"].address
    C = grpc.StatusCode
    with SessionClient(addr, api_key="key-a") as a, SessionClient(addr, api_key="key-b") as b, \
            SessionClient(addr) as anon, SessionClient(addr, api_key="wrong") as wrong, \
            SessionClient(addr, api_key="admin") as admin:
        s = a.create_session(system_prompt="x").session_id
        missing = "tenant-a:" + "0" * 24
        calls = {
            "CreateSession": lambda c: c.create_session(),
            "Append": lambda c: c.append(s, tokens=[1]),
            "Generate": lambda c: c.generate(s, max_tokens=2),
            "Fork": lambda c: c.fork(s),
            "GetSession": lambda c: c.get_session(s),
            "ListSessions": lambda c: c.list_sessions(),
            "CloseSession": lambda c: c.close_session(missing),
            "Pin": lambda c: c.pin(s, 10),
            "Prefetch": lambda c: c.prefetch(s),
        }
        for name, call in calls.items():
            assert _codes(lambda: call(anon)) is C.UNAUTHENTICATED, name
            assert _codes(lambda: call(wrong)) is C.UNAUTHENTICATED, name
        for name in ("Append", "Generate", "Fork", "GetSession", "Pin", "Prefetch"):
            assert _codes(lambda: calls[name](b)) is C.PERMISSION_DENIED, name  # another tenant's session
        assert _codes(lambda: b.list_sessions(namespace="tenant-a")) is C.PERMISSION_DENIED
        assert _codes(lambda: b.create_session(namespace="tenant-a")) is C.PERMISSION_DENIED
        assert _codes(lambda: admin.create_session()) is C.INVALID_ARGUMENT  # which namespace?
        assert admin.create_session(namespace="tenant-b").namespace == "tenant-b"
        for sid in ("nope", "tenant-a:xyz", "bad ns:" + "0" * 24, ""):
            for name, call in (("Append", lambda: a.append(sid, tokens=[1])), ("Generate", lambda: a.generate(sid)),
                               ("Fork", lambda: a.fork(sid)), ("GetSession", lambda: a.get_session(sid)),
                               ("CloseSession", lambda: a.close_session(sid)), ("Pin", lambda: a.pin(sid, 5)),
                               ("Prefetch", lambda: a.prefetch(sid))):
                assert _codes(call) is C.INVALID_ARGUMENT, (name, sid)
        for name, call in (("Append", lambda: a.append(missing, tokens=[1])), ("Generate", lambda: a.generate(missing)),
                           ("Fork", lambda: a.fork(missing)), ("GetSession", lambda: a.get_session(missing)),
                           ("CloseSession", lambda: a.close_session(missing)), ("Pin", lambda: a.pin(missing, 5)),
                           ("Prefetch", lambda: a.prefetch(missing))):
            assert _codes(call) is C.NOT_FOUND, name
        n = a.get_session(s).num_tokens
        bad = [
            lambda: a.create_session(model="gpt-9"),  # NOT_FOUND: not served here
            lambda: a.create_session(namespace="bad namespace!"),
            lambda: a.append(s),  # empty input
            lambda: a.append(s, messages=[{"role": "wizard", "content": "hi"}]),
            lambda: a.append(s, messages=[]),
            lambda: a.append(s, tokens=[10 ** 6]),
            lambda: a.append(s, tokens=[1], request_id="x" * 200),
            lambda: a.generate(s, tokens=[1], max_tokens=10 ** 6),
            lambda: a.generate(s, tokens=[1], temperature=-1),
            lambda: a.generate(s, tokens=[1], worker_id="w9"),
            lambda: a.generate(s, tokens=[1] * 5000),  # longer than the model's context
            lambda: a.list_sessions(limit=10 ** 6),
            lambda: a.pin(s, 10 ** 9),
        ]
        codes = [_codes(f) for f in bad]
        assert codes[0] is C.NOT_FOUND and all(c is C.INVALID_ARGUMENT for c in codes[1:]), codes
        assert a.get_session(s).num_tokens == n  # nothing was applied
        with SessionClient(addr, api_key="key-a", timeout_s=0.001) as hurried:
            assert _codes(lambda: hurried.generate(s, tokens=[1], max_tokens=50)) is C.DEADLINE_EXCEEDED


def test_too_many_concurrent_generations_is_resource_exhausted(service):
    loop = service["loop"]
    small = start_server(loop, service["pool"], service["redis_url"], max_concurrent_generations=1,
                         max_queued_generations=0)
    try:
        with SessionClient(small.address, api_key="key-a") as kv:
            s1 = kv.create_session(system_prompt=SYSTEM).session_id
            s2 = kv.create_session(system_prompt=SYSTEM).session_id
            gen = kv.generate(s1, tokens=[1], max_tokens=1500, ignore_eos=True)
            it = iter(gen)
            next(it)
            assert _codes(lambda: kv.generate(s2, tokens=[1], max_tokens=2)) is grpc.StatusCode.RESOURCE_EXHAUSTED
            gen.cancel()
    finally:
        loop.run(small.stop(grace=0))


def test_health_reflection_and_metrics(service, kv):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    server = service["server"]
    with grpc.insecure_channel(server.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="kvstore.v1.Sessions"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reply = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "kvstore.v1.Sessions" in {s.name for s in reply.list_services_response.service}

    def scrape() -> dict:
        """The samples a Prometheus scrape gets: (name, sorted labels) -> value."""
        text = generate_latest(server.metrics.registry).decode()
        return {(x.name, tuple(sorted(x.labels.items()))): x.value
                for family in text_string_to_metric_families(text) for x in family.samples}
    generate_ok = ("kvstore_session_requests_total", (("code", "OK"), ("method", "Generate")))
    cached_t0 = ("kvstore_session_cached_tokens_total", (("tier", "t0"),))
    ttft_count, completion = ("kvstore_session_ttft_seconds_count", ()), ("kvstore_session_completion_tokens_total", ())
    before = scrape()
    s = kv.create_session(system_prompt=SYSTEM)
    _, g1 = turn(kv, s.session_id, max_tokens=3, messages=[{"role": "user", "content": "count me"}])
    _, g2 = turn(kv, s.session_id, max_tokens=3, messages=[{"role": "user", "content": "and me"}])
    assert g2.usage.cached_tokens_t0 > 0  # the second turn reused the first's history from T0
    after = scrape()

    def grew(key) -> float:
        return after[key] - before.get(key, 0.0)
    assert grew(generate_ok) == 2 and grew(ttft_count) == 2 and grew(completion) == 6
    assert grew(cached_t0) == g1.usage.cached_tokens_t0 + g2.usage.cached_tokens_t0 > 0
    assert after[("kvstore_session_active_generations", ())] == 0


@pytest.mark.parametrize("error", [rex.ConnectionError("Connection refused"), rex.TimeoutError(),
                                   rex.ClusterDownError("CLUSTERDOWN The cluster is down"),
                                   rex.TryAgainError("TRYAGAIN"), rex.RedisClusterException("no node")])
def test_an_unreachable_redis_or_cluster_is_unavailable(error):
    code, message = asyncio.run(_classify(error))
    assert code is grpc.StatusCode.UNAVAILABLE and "Redis" in message and "retry" in message


@pytest.mark.parametrize("error, code", [
    (rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.", status_code="OOM"),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
    (rex.ResponseError("Error running script (call to f_1): @user_script:4: @user_script: 4: -OOM command not "
                       "allowed when used memory > 'maxmemory'."), grpc.StatusCode.RESOURCE_EXHAUSTED),  # Redis 6
    (rex.ReadOnlyError("You can't write against a read only replica.", status_code="READONLY"),
     grpc.StatusCode.UNAVAILABLE),
    (rex.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist "
                       "to disk."), grpc.StatusCode.UNAVAILABLE),
])
def test_redis_refusing_writes_is_a_retryable_status(error, code):
    mapped, message = asyncio.run(_classify(error))
    assert mapped is code and "retry" in message and "Redis" in message



def test_work_left_after_replies_is_awaited_or_cancelled_on_stop(caplog):
    from services.common.auth import TokenTable
    from services.session.metrics import SessionMetrics
    from services.session.server import SessionServiceConfig
    from services.session.service import SessionServicer
    from workers.tokenizer import ByteTokenizer

    async def scenario():
        servicer = SessionServicer(None, None, ByteTokenizer(512), TokenTable(""), SessionMetrics(),
                                    SessionServiceConfig())
        finished = []

        async def work(seconds: float):
            await asyncio.sleep(seconds)
            finished.append(seconds)

        async def broken():
            raise RuntimeError("block store exploded")
        for w in (work(0.05), work(60), broken()):
            servicer._in_background(w, "test-work")
        await servicer.stop(timeout=0.5)
        assert finished == [0.05] and not servicer._background  # the slow one was cancelled
    asyncio.run(scenario())
    assert "block store exploded" in caplog.text  # a failure is logged, not lost
