"""Session state in a real Redis (single and 3-node cluster): survives a new store instance
(a restarted service), idempotent appends (also retried after close), forks, pins, close, the
index, a session removed underneath, bad input."""
import asyncio

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from services.session.router import Affinity
from services.session.state import MAX_REQUEST_IDS, SessionClosed, SessionNotFound, SessionStore


@pytest.fixture(params=["single", "cluster"])
def store_factory(request):
    backend = request.getfixturevalue("redis_server" if request.param == "single" else "redis_cluster")

    def make() -> SessionStore:
        if request.param == "single":
            return SessionStore(aioredis.Redis.from_url(backend.url))
        return SessionStore(RedisCluster.from_url(backend.url))
    return make


def test_sessions_survive_a_restarted_service(store_factory):
    async def scenario():
        a = store_factory()
        s = await a.create("tenant", "qwen", tokens=[1, 2, 3], metadata={"agent": "planner"})
        assert (await a.append_turn("tenant", s.id, [4, 5], request_id="r1")).num_tokens == 5
        b = store_factory()  # a new replica / restarted process: state comes from Redis
        got = await b.get("tenant", s.id)
        assert got.tokens == [1, 2, 3, 4, 5] and got.model == "qwen" and got.metadata == {"agent": "planner"}
        assert got.created <= got.updated and not got.closed
        assert s.id in await b.list("tenant")
        assert s.id not in await b.list("other")
    asyncio.run(scenario())


def test_the_worker_affinity_is_shared_by_replicas_and_kept_by_turns_without_one(store_factory):
    """The worker that ran a session's last turn is in its record, so every replica routes the
    next turn alike: set by a turn or a prefetch, kept by an append without one or a replay."""
    async def scenario():
        a, b = store_factory(), store_factory()
        s = await a.create("tenant", "m", tokens=[1, 2])
        assert (await b.get("tenant", s.id)).affinity is None
        await a.append_turn("tenant", s.id, [3, 4], request_id="t1", affinity=Affinity("w1", "inc1", 4))
        assert (await b.get("tenant", s.id)).affinity == Affinity("w1", "inc1", 4)
        await b.append_turn("tenant", s.id, [5])  # an Append: no generation, the affinity stays
        await b.append_turn("tenant", s.id, [3, 4], request_id="t1", affinity=Affinity("w0", "x", 9))  # a replay
        assert (await a.get("tenant", s.id)).affinity == Affinity("w1", "inc1", 4)
        await b.set_affinity("tenant", s.id, Affinity("w0", "inc2", 5))
        assert (await a.get("tenant", s.id)).affinity == Affinity("w0", "inc2", 5)
        with pytest.raises(SessionNotFound):
            await a.set_affinity("tenant", "0" * 24, Affinity("w0", "inc2", 5))
    asyncio.run(scenario())


def test_retried_append_is_applied_once(store_factory):
    async def scenario():
        st = store_factory()
        s = await st.create("tenant", "m", tokens=[7])
        assert (await st.append_turn("tenant", s.id, [1, 2], request_id="req-1")).num_tokens == 3
        assert (await st.append_turn("tenant", s.id, [1, 2], request_id="req-1")).num_tokens == 3  # the retry
        assert (await st.append_turn("tenant", s.id, [9], request_id="req-2")).num_tokens == 4
        assert (await st.append_turn("tenant", s.id, [9])).num_tokens == 5  # no request id: always applied
        assert (await st.get("tenant", s.id)).tokens == [7, 1, 2, 9, 9]
    asyncio.run(scenario())


def test_kept_records_outlive_the_last_request_ids_and_forks_start_at_them(store_factory):
    """A stored response is a kept turn record: not dropped with the last MAX_REQUEST_IDS, read
    back and deleted by id; a fork can start at the point it records."""
    async def scenario():
        st = store_factory()
        s = await st.create("tenant", "m", tokens=[1], messages=[{"role": "system", "content": "x"}])
        await st.append_turn("tenant", s.id, [2, 3], request_id="kept", result="{}", keep_record=True,
                             messages=[{"role": "user", "content": "a"}])
        for i in range(MAX_REQUEST_IDS + 1):
            await st.append_turn("tenant", s.id, [4], request_id=f"r{i}", result="{}")
        assert await st.record("tenant", s.id, "r0") is None  # dropped: beyond the last MAX_REQUEST_IDS
        assert await st.record("tenant", s.id, "kept") == (3, "{}")
        f = await st.fork("tenant", s.id, at=(3, 2))
        got = await st.get("tenant", f.id)
        assert got.tokens == [1, 2, 3] and [m["content"] for m in got.messages] == ["x", "a"] and got.parent == s.id
        assert await st.drop_record("tenant", s.id, "kept") and await st.record("tenant", s.id, "kept") is None
        assert not await st.drop_record("tenant", s.id, "kept")
    asyncio.run(scenario())


def test_fork_shares_history_and_diverges(store_factory):
    async def scenario():
        st = store_factory()
        s = await st.create("tenant", "m", tokens=[1, 2, 3])
        f = await st.fork("tenant", s.id)
        await st.append_turn("tenant", f.id, [10])
        await st.append_turn("tenant", s.id, [20])
        assert (await st.get("tenant", f.id)).tokens == [1, 2, 3, 10]
        assert (await st.get("tenant", s.id)).tokens == [1, 2, 3, 20]
        assert (await st.get("tenant", f.id)).parent == s.id
    asyncio.run(scenario())


def test_pin_close_and_errors(store_factory):
    async def scenario():
        st = store_factory()
        s = await st.create("tenant", "m")
        until = await st.pin("tenant", s.id, 60)
        assert (await st.get("tenant", s.id)).pinned_until == pytest.approx(until)
        await st.close("tenant", s.id)
        assert (await st.get("tenant", s.id)).closed
        assert s.id not in await st.list("tenant")
        with pytest.raises(SessionClosed):
            await st.append_turn("tenant", s.id, [1])
        with pytest.raises(SessionNotFound):
            await st.get("tenant", "nope")
        with pytest.raises(SessionNotFound):
            await st.append_turn("tenant", "nope", [1])
        with pytest.raises(SessionNotFound):
            await st.get("other", s.id)  # another tenant cannot see it
        with pytest.raises(ValueError):
            await st.append_turn("tenant", s.id, [-1])
        with pytest.raises(ValueError):
            await st.create("tenant", "m", tokens=[2**33])
    asyncio.run(scenario())


def test_turns_are_atomic_checked_against_concurrent_changes_and_replayed(store_factory):
    from services.session.state import SessionChanged

    async def scenario():
        st = store_factory()
        s = await st.create("tenant", "m", tokens=[1], messages=[{"role": "system", "content": "be brief"}])
        turn = await st.append_turn("tenant", s.id, [2, 3], request_id="t1", expected_len=1, result="answer-1",
                                    messages=[{"role": "user", "content": "hi"}])
        assert (turn.num_tokens, turn.result, turn.replayed) == (3, "answer-1", False)
        retry = await st.append_turn("tenant", s.id, [2, 3], request_id="t1", expected_len=1, result="other")
        assert (retry.num_tokens, retry.result, retry.replayed) == (3, "answer-1", True)
        async with st.request("tenant", s.id, "t1") as done:
            assert done == (3, "answer-1")  # applied: no lease, the recorded result
        async with st.request("tenant", s.id, "never") as done:
            assert done is None  # new: leased to this call
        with pytest.raises(SessionChanged):  # another turn landed since this one read the history
            await st.append_turn("tenant", s.id, [9], request_id="t2", expected_len=1)
        got = await st.get("tenant", s.id)
        assert got.tokens == [1, 2, 3]
        assert got.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        fork = await st.fork("tenant", s.id)
        assert (await st.get("tenant", fork.id)).messages == got.messages
    asyncio.run(scenario())


def test_a_retried_append_after_close_gets_its_result_and_leaves_the_index_alone(store_factory):
    async def scenario():
        st = store_factory()
        s = await st.create("tenant", "m", tokens=[1])
        first = await st.append_turn("tenant", s.id, [2], request_id="r1", result="done")
        await st.close("tenant", s.id)
        retry = await st.append_turn("tenant", s.id, [2], request_id="r1", result="other")
        assert (retry.num_tokens, retry.result, retry.replayed) == (first.num_tokens, "done", True)
        assert s.id not in await st.list("tenant")  # the replay did not re-add the closed session
        with pytest.raises(SessionClosed):  # a new request is still refused
            await st.append_turn("tenant", s.id, [3], request_id="r2")
        assert (await st.get("tenant", s.id)).tokens == [1, 2]
    asyncio.run(scenario())


def test_index_order_and_listing_with_lengths(store_factory):
    async def scenario():
        st = store_factory()
        ns = "listing"
        a = await st.create(ns, "m", tokens=[1, 2, 3], metadata={"k": "v"})
        b = await st.create(ns, "m")
        assert await st.list(ns) == [b.id, a.id]
        await st.append_turn(ns, a.id, [4])  # an append moves its session to the front
        listed = await st.list_sessions(ns)
        assert [(s.id, n) for s, n in listed] == [(a.id, 4), (b.id, 0)]
        assert listed[0][0].metadata == {"k": "v"} and listed[0][0].model == "m" and not listed[0][0].closed
        await st._r.delete(*st._keys(ns, b.id))  # removed underneath (the index entry stays)
        assert [s.id for s, _ in await st.list_sessions(ns)] == [a.id]
        assert await st.list_sessions("nothing-here") == []
    asyncio.run(scenario())


def test_pin_unpin_close_of_a_removed_session_do_not_recreate_it(store_factory):
    async def scenario():
        st = store_factory()
        s = await st.create("tenant", "m", tokens=[1])
        await st._r.delete(*st._keys("tenant", s.id))
        for change in (st.pin("tenant", s.id, 60), st.unpin("tenant", s.id), st.close("tenant", s.id)):
            with pytest.raises(SessionNotFound):
                await change
        with pytest.raises(SessionNotFound):  # not a partial hash (a KeyError on read)
            await st.get("tenant", s.id)
        assert await st.unpin("tenant", (await st.create("tenant", "m")).id) == 0.0
    asyncio.run(scenario())


def test_calls_with_one_request_id_run_one_at_a_time(store_factory):
    async def scenario():
        st = store_factory()
        s = await st.create("tenant", "m", tokens=[1])
        holding, release = asyncio.Event(), asyncio.Event()

        async def attempt(request_id: str, record: bool):
            async with st.request("tenant", s.id, request_id) as done:
                if done is not None:
                    return done
                holding.set()
                await release.wait()
                if record:
                    await st.append_turn("tenant", s.id, [2], request_id=request_id, result=request_id)
                return None

        # The holder records its turn: the waiting retry gets that result.
        holder = asyncio.create_task(attempt("r1", record=True))
        await holding.wait()
        retry = asyncio.create_task(attempt("r1", record=True))
        await asyncio.sleep(0.2)
        assert not retry.done()  # waiting for the holder
        release.set()
        assert await holder is None and await retry == (2, "r1")
        async with st.request("tenant", s.id, "r1") as done:  # a later retry: at once
            assert done == (2, "r1")

        # The holder fails: the waiting retry takes the request id over.
        holding.clear()
        release.clear()
        holder = asyncio.create_task(attempt("r2", record=False))
        await holding.wait()
        holding.clear()
        retry = asyncio.create_task(attempt("r2", record=True))
        await asyncio.sleep(0.2)
        assert not retry.done() and not holding.is_set()
        release.set()
        assert await holder is None
        assert await asyncio.wait_for(retry, 5) is None and holding.is_set()  # it held the id and recorded
        assert (await st.get("tenant", s.id)).tokens == [1, 2, 2]

        async with st.request("tenant", s.id, "") as a, st.request("tenant", s.id, "") as b:
            assert a is None and b is None  # without a request id nothing is leased
    asyncio.run(scenario())


def test_a_lease_is_renewed_while_held_and_lapses_after_a_crashed_holder(store_factory, monkeypatch):
    from services.session import state
    monkeypatch.setattr(state, "LEASE_S", 0.3)

    async def scenario():
        st = store_factory()
        s = await st.create("tenant", "m")

        async def waits(request_id: str, seconds: float) -> bool:
            try:
                async with asyncio.timeout(seconds):
                    async with st.request("tenant", s.id, request_id):
                        return False
            except TimeoutError:
                return True

        async with st.request("tenant", s.id, "r1") as done:
            assert done is None
            assert await waits("r1", 1.0)  # held 3 lease periods: renewed, so still held
        assert not await waits("r1", 1.0)  # released on exit
        # A holder that crashed never releases: its lease lapses and another call takes over.
        await st._r.set(st._lease_key("tenant", s.id, "r2"), "crashed-owner", px=300)
        assert not await waits("r2", 2.0)
    asyncio.run(scenario())


def test_the_history_limit_holds_for_concurrent_appends(store_factory):
    from services.session.state import HistoryTooLong

    async def scenario():
        st = store_factory()
        s = await st.create("tenant", "m", tokens=[1] * 6)
        results = await asyncio.gather(*(st.append_turn("tenant", s.id, [2] * 3, max_len=10) for _ in range(4)),
                                       return_exceptions=True)
        assert sum(isinstance(r, HistoryTooLong) for r in results) == 3  # only one fits
        assert len((await st.get("tenant", s.id)).tokens) == 9
    asyncio.run(scenario())


def test_request_ids_are_bounded_per_session_and_kept_without_a_ttl(store_factory):
    from services.session.state import MAX_REQUEST_IDS

    async def scenario():
        st = store_factory()
        s = await st.create("tenant", "m")
        for i in range(MAX_REQUEST_IDS + 8):
            await st.append_turn("tenant", s.id, [i], request_id=f"r{i}", result=str(i))
        records = st._keys("tenant", s.id)[3]
        assert await st._r.hlen(records) == MAX_REQUEST_IDS and await st._r.ttl(records) == -1
        old = await st.append_turn("tenant", s.id, [0], request_id="r0")  # forgotten: applied again
        recent = await st.append_turn("tenant", s.id, [0], request_id=f"r{MAX_REQUEST_IDS + 7}")
        assert not old.replayed and recent.replayed and recent.result == str(MAX_REQUEST_IDS + 7)
    asyncio.run(scenario())


def test_idle_sessions_expire_writes_refresh_them_and_pins_outlast_the_ttl(store_factory):
    async def scenario():
        st = SessionStore(store_factory()._r, idle_ttl_s=100)
        s = await st.create("tenant", "m", tokens=[1], messages=[{"role": "system", "content": "x"}])
        await st.append_turn("tenant", s.id, [2], request_id="r")

        async def ttls() -> list[int]:
            return [await st._r.pttl(k) for k in st._keys("tenant", s.id)]
        assert all(90_000 < t <= 100_000 for t in await ttls())  # all five keys
        await st.pin("tenant", s.id, 1000)
        assert all(t > 990_000 for t in await ttls())
        await st.append_turn("tenant", s.id, [3])  # a pinned session keeps its pin's TTL
        assert all(t > 990_000 for t in await ttls())
        await st.unpin("tenant", s.id)
        assert all(t <= 100_000 for t in await ttls())
        assert 0 < await st._r.pttl(st._index("tenant")) and await SessionStore(st._r).unpin("tenant", s.id) == 0
        assert all(t == -1 for t in await ttls())  # a store without an idle TTL keeps them forever
    asyncio.run(scenario())


def test_the_session_limit_counts_open_sessions_and_prunes_expired_ones(store_factory):
    from services.session.state import TooManySessions

    async def scenario():
        st = SessionStore(store_factory()._r, max_sessions=2)
        ns = "limited"
        a = await st.create(ns, "m")
        b = await st.create(ns, "m")
        with pytest.raises(TooManySessions):
            await st.create(ns, "m")
        with pytest.raises(TooManySessions):
            await st.fork(ns, a.id)
        await st.close(ns, a.id)  # closed: no longer counted
        c = await st.create(ns, "m")
        await st._r.delete(*st._keys(ns, b.id))  # as if it expired (its index entry stays)
        d = await st.create(ns, "m")
        assert set(await st.list(ns)) == {c.id, d.id}
    asyncio.run(scenario())
