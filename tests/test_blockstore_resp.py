"""The block store's lean Redis client (services/blockstore/resp.py) against real redis-servers:
values and misses, TTL refresh, large pipelines, batches while replies arrive, error replies,
auth and SELECT, unix sockets, Redis down / restarted / unresponsive, abandoned pipelines."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

import pytest

from services.blockstore import resp
from services.blockstore.budget import CallBudget, MemoryBudget
from services.blockstore.resp import LeanRedis, encode_command
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig
from services.common.errors import StoreError, StoreUnavailableError


def run(coro):
    return asyncio.run(coro)


def budget(limit: int = 1 << 40, wait_s: float = 60) -> CallBudget:
    """A call's budget of ``limit`` bytes, alone in its process budget."""
    return CallBudget(MemoryBudget(limit), limit, time.monotonic() + wait_s)


async def getex(lean: LeanRedis, keys: list[bytes], ttl: int = 100, within: CallBudget | None = None
                ) -> list[bytes | None]:
    """All values of one GETEX pipeline, as bytes, each released from the budget once copied."""
    within = within or budget()
    out: list[bytes | None] = []
    async for batch in lean.getex(keys, ttl, within):
        out += [None if v is None else bytes(v) for v in batch]
        within.release(sum(len(v) for v in batch if v is not None))
    assert within.used == 0
    return out


@pytest.fixture()
def rc(redis_server):
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


def test_encode_command_is_a_resp_array_of_bulk_strings():
    assert encode_command(b"GETEX", b"k", b"EX", b"5") == b"*4\r\n$5\r\nGETEX\r\n$1\r\nk\r\n$2\r\nEX\r\n$1\r\n5\r\n"


def test_supports_plain_tcp_and_unix_sockets_only():
    assert LeanRedis.supports("redis://h:1/0") and LeanRedis.supports("unix:///tmp/r.sock")
    assert not LeanRedis.supports("rediss://h:1/0")
    with pytest.raises(ValueError, match="rediss"):
        LeanRedis("rediss://h:1/0", timeout_s=1)


def test_values_misses_and_ttl_refresh(redis_server, rc):
    rc.set(b"a", b"alpha")
    rc.set(b"empty", b"")
    rc.set(b"binary", bytes(range(256)) * 3 + b"\r\n$-1\r\n")  # RESP-looking bytes inside a value

    async def main():
        lean = LeanRedis(redis_server.url, timeout_s=2)
        try:
            return await getex(lean, [b"a", b"missing", b"empty", b"binary"], ttl=77)
        finally:
            await lean.close()

    assert run(main()) == [b"alpha", None, b"", bytes(range(256)) * 3 + b"\r\n$-1\r\n"]
    assert 70 < rc.ttl(b"a") <= 77 and 70 < rc.ttl(b"binary") <= 77
    assert rc.ttl(b"missing") == -2


def test_a_large_pipeline_arrives_in_batches_in_order_and_the_buffer_grows(redis_server, rc):
    values = {f"k{i}".encode(): os.urandom(200_000 + i) for i in range(80)}  # ~16 MB
    rc.mset(values)

    async def main():
        lean = LeanRedis(redis_server.url, timeout_s=5)
        lean._value_hint = 1000  # far too small: the receive buffer must grow mid-pipeline
        try:
            batches = [batch async for batch in lean.getex(list(values), 100, budget())]
            again = await getex(lean, list(values))  # the same pooled connection, a learnt size
            return batches, again
        finally:
            await lean.close()

    batches, again = run(main())
    assert len(batches) > 1  # handed over while later replies were still arriving
    assert [bytes(v) for batch in batches for v in batch] == list(values.values())
    assert again == list(values.values())


def test_a_window_keeps_few_commands_in_flight_and_loses_nothing(redis_server, rc, monkeypatch):
    values = {f"w{i}".encode(): os.urandom(150_000 + i) for i in range(0, 40, 2)}  # every other key
    rc.mset(values)
    keys = [f"w{i}".encode() for i in range(40)]
    in_flight: list[tuple[int, int]] = []  # (commands sent, replies parsed) after each top-up
    send_more = resp._Protocol._send_more

    def recording(self):
        send_more(self)
        in_flight.append((self._sent, self._parsed))

    monkeypatch.setattr(resp._Protocol, "_send_more", recording)

    async def main(window: int):
        lean = LeanRedis(redis_server.url, timeout_s=5, window_bytes=window)
        lean._value_hint = 150_000
        try:
            return await getex(lean, keys)
        finally:
            await lean.close()

    assert run(main(1)) == [values.get(k) for k in keys]  # a window of 2 commands (the least)
    assert in_flight[0] == (2, 0) and in_flight[-1][0] == 40
    assert all(sent - parsed <= 2 for sent, parsed in in_flight)
    in_flight.clear()
    assert run(main(1 << 30)) == [values.get(k) for k in keys]  # a window wider than the pipeline
    assert in_flight[0] == (40, 0)


def test_commands_go_out_only_as_the_consumer_takes_the_replies(redis_server, rc):
    """A consumer that stops taking replies (its own client stopped reading) stops the GETEX
    commands too: Redis executes a few beyond what was taken, not the whole pipeline."""
    values = {f"slow{i}".encode(): os.urandom(200_000) for i in range(100)}
    rc.mset(values)

    def getex_calls() -> int:
        return rc.info("commandstats").get("cmdstat_getex", {}).get("calls", 0)

    async def main():
        lean = LeanRedis(redis_server.url, timeout_s=5)
        within, out, executed = budget(), [], None
        try:
            before = getex_calls()
            async with contextlib.aclosing(lean.getex(list(values), 100, within)) as batches:
                async for batch in batches:
                    out += [bytes(v) for v in batch]
                    within.release(sum(map(len, batch)))
                    if executed is None:
                        await asyncio.sleep(0.3)  # plenty of time for Redis to run them all
                        executed = getex_calls() - before
            return executed, out
        finally:
            await lean.close()

    executed, out = run(main())
    assert out == list(values.values())
    assert executed <= 12, executed  # 2 in flight + under 1 MiB parsed and not taken


def test_a_short_budget_pauses_reading_and_says_so_with_an_empty_batch(redis_server, rc):
    values = {f"b{i}".encode(): os.urandom(300_000) for i in range(12)}
    rc.mset(values)

    async def main():
        lean = LeanRedis(redis_server.url, timeout_s=5)
        within, out, held, peak, waits = budget(limit=2 * 700_000), [], [], 0, 0
        try:
            async for batch in lean.getex(list(values), 100, within):
                peak = max(peak, within.used)
                if not batch:  # what we hold must go before the next value can come
                    waits += 1
                    within.release(sum(map(len, held)))
                    held.clear()
                out += [bytes(v) for v in batch]
                held += batch
            within.release(sum(map(len, held)))
            return out, peak, waits, within.used
        finally:
            await lean.close()

    out, peak, waits, left = run(main())
    assert out == list(values.values())
    assert peak <= 2 * 700_000 and waits >= 5 and left == 0


def test_an_error_reply_is_a_store_error_and_the_pool_recovers(redis_server, rc):
    rc.set(b"ok", b"v")
    rc.hset(b"hash", "f", "v")  # GETEX on a hash: WRONGTYPE

    async def main():
        lean = LeanRedis(redis_server.url, timeout_s=2)
        try:
            with pytest.raises(StoreError, match="WRONGTYPE") as err:
                await getex(lean, [b"ok", b"hash", b"ok"])
            assert not isinstance(err.value, StoreUnavailableError)
            return await getex(lean, [b"ok"])
        finally:
            await lean.close()

    assert run(main()) == [b"v"]


def test_password_acl_user_and_database_from_the_url(redis_server, rc):
    rc.execute_command("ACL", "SETUSER", "reader", "on", ">s3cret", "~*", "+@all")
    db3 = redis_server.client(db=3)
    db3.set(b"k", b"in db 3")
    host, port = redis_server.host, redis_server.port
    try:
        async def main(url: str):
            lean = LeanRedis(url, timeout_s=2)
            try:
                return await getex(lean, [b"k"])
            finally:
                await lean.close()

        assert run(main(f"redis://reader:s3cret@{host}:{port}/3")) == [b"in db 3"]
        assert run(main(f"redis://{host}:{port}/0")) == [None]
        with pytest.raises(StoreUnavailableError, match="AuthenticationError"):
            run(main(f"redis://reader:wrong@{host}:{port}/3"))
    finally:
        rc.execute_command("ACL", "DELUSER", "reader")
        db3.flushdb()
        db3.close()


def test_unix_socket(tmp_path):
    path = tmp_path / "redis.sock"
    with EmbeddedRedis(EmbeddedRedisConfig(extra_args=("--unixsocket", str(path)))) as server:
        server.client().set(b"k", b"over a unix socket")

        async def main():
            lean = LeanRedis(f"unix://{path}?db=0", timeout_s=2)
            try:
                return await getex(lean, [b"k"])
            finally:
                await lean.close()

        assert run(main()) == [b"over a unix socket"]


def test_redis_down_fails_fast_and_a_restart_is_invisible():
    with EmbeddedRedis() as server:
        async def main():
            lean = LeanRedis(server.url, timeout_s=1)
            try:
                server.client().set(b"k", b"v1")
                assert await getex(lean, [b"k"]) == [b"v1"]  # leaves a pooled connection
                server.restart()  # that connection is dead now; the next call retries once
                server.client().set(b"k", b"v2")
                assert await getex(lean, [b"k"]) == [b"v2"]
                server.kill()
                start = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="ConnectionError"):
                    await getex(lean, [b"k"])
                assert time.monotonic() - start < 1.0
                server.restart()
                assert await getex(lean, [b"k"]) == [None]  # (restarted empty)
            finally:
                await lean.close()

        run(main())


def test_an_unresponsive_redis_times_out_as_unavailable():
    with socket.socket() as blackhole:  # accepts connections (kernel backlog), never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(8)

        async def main():
            lean = LeanRedis(f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0", timeout_s=0.3)
            start = time.monotonic()
            with pytest.raises(StoreUnavailableError, match="TimeoutError"):
                await getex(lean, [b"k"])
            await lean.close()
            return time.monotonic() - start

        assert run(main()) < 1.5


def test_a_consumer_stopping_early_closes_that_connection_and_the_next_call_works(redis_server, rc):
    values = {f"s{i}".encode(): os.urandom(300_000) for i in range(20)}
    rc.mset(values)

    async def main():
        lean = LeanRedis(redis_server.url, timeout_s=2)
        try:
            stream = lean.getex(list(values), 100, budget())
            first = await anext(stream)
            await stream.aclose()  # mid-pipeline: its replies are still arriving
            assert not lean._idle  # not returned to the pool
            task = asyncio.create_task(getex(lean, list(values)))
            await asyncio.sleep(0)
            task.cancel()  # cancelled mid-pipeline too
            with pytest.raises(asyncio.CancelledError):
                await task
            return bytes(first[0]), await getex(lean, list(values))
        finally:
            await lean.close()

    first, all_values = run(main())
    assert first == values[b"s0"]
    assert all_values == list(values.values())


def test_concurrent_pipelines_use_separate_connections(redis_server, rc):
    rc.mset({f"c{i}".encode(): f"value {i}".encode() * 1000 for i in range(50)})

    async def main():
        lean = LeanRedis(redis_server.url, timeout_s=2)
        try:
            keys = [[f"c{i}".encode() for i in range(j, 50, 5)] for j in range(5)]
            results = await asyncio.gather(*(getex(lean, k) for k in keys))
            return keys, results, len(lean._idle)
        finally:
            await lean.close()

    keys, results, idle = run(main())
    for ks, vs in zip(keys, results):
        assert vs == [f"value {k.decode()[1:]}".encode() * 1000 for k in ks]
    assert idle == 5
