"""Bounded memory in the block store: Get flow control with slow readers (RSS of a real block
store process over a real Redis), the per-call and per-process byte budgets, RESOURCE_EXHAUSTED
for calls that cannot get memory in time, and the budget itself."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from kvstore.blockstore_wire import decode_get_response
from kvstore.codec import encode_block
from kvstore.v1 import blockstore_pb2 as pb
from kvstore.v1 import blockstore_pb2_grpc as pb_grpc
from services.blockstore.budget import CallBudget, MemoryBudget
from services.blockstore.server import BlockStoreConfig, BlockStoreThread
from services.common.errors import RequestError

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def big_block(block_hash: bytes, nbytes: int) -> bytes:
    """A valid raw-coded block of about ``nbytes`` (random bf16 payload)."""
    data = np.frombuffer(os.urandom(nbytes), np.uint8)
    return encode_block(data, dtype=torch.bfloat16, shape=(nbytes // 2,), fingerprint=bytes(16),
                        block_hash=block_hash, parent_hash=bytes(16), token_ids=[1], codec="raw")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def metric(url: str, name: str) -> float:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    m = re.search(rf"^{name} (\S+)$", body, re.MULTILINE)
    assert m, f"{name} not in metrics"
    return float(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def blockstore_process(redis_url: str, **settings: int):
    """``python -m services.blockstore`` on a free port; yields (pid, address, metrics URL).
    Settings go through the environment (KVSTORE_BLOCKSTORE_<FIELD>)."""
    metrics_port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           **{f"KVSTORE_BLOCKSTORE_{k.upper()}": str(v) for k, v in settings.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "services.blockstore", "--port", "0", "--redis-url", redis_url,
                             "--metrics-port", str(metrics_port), "--log-level", "WARNING"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(r"kvstore blockstore listening on (\S+) .*\n", line)
        assert m, f"block store did not start: {line!r}"
        yield proc.pid, m.group(1), f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_slow_readers_of_1024_copies_of_a_32_mib_block_keep_rss_bounded(redis_server):
    """The finding, reproduced: an ~18 KB Get for 1024 copies of a 32 MiB block's hash, read
    slowly, here by three clients at once (two calls fill the process budget, the third
    waits its turn). Unbounded, RSS grew by ~330 MB/s; now it stays under baseline + twice
    the process budget, every reader keeps getting correct blocks in order, and the budget
    is all given back once they hang up."""
    budget = 128 * MiB
    h = bytes(range(16))
    block = big_block(h, 31 * MiB)
    with blockstore_process(redis_server.url, memory_budget_bytes=budget, call_budget_bytes=64 * MiB,
                            redis_timeout_s=10) as (pid, address, metrics_url), \
            grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * MiB)]) as ch:
        stub = pb_grpc.BlockStoreStub(ch)
        assert stub.Put(pb.PutRequest(namespace="big", blocks=[pb.Block(hash=h, data=block)]), timeout=30).stored == 1
        request = pb.GetRequest(namespace="big", hashes=[h] * 1024)
        assert len(request.SerializeToString()) < 20_000
        time.sleep(0.5)
        baseline = rss_bytes(pid)
        bound = baseline + 2 * budget

        get = ch.unary_stream("/kvstore.v1.BlockStore/Get", request_serializer=pb.GetRequest.SerializeToString)
        calls = [get(request, timeout=60) for _ in range(3)]
        received: list[list[int]] = [[] for _ in calls]
        stop = threading.Event()

        def slow_reader(call, indexes: list[int]) -> None:
            with contextlib.suppress(grpc.RpcError):  # cancelled at the end
                for message in call:
                    for index, data in decode_get_response(message):
                        assert data == block
                        indexes.append(index)
                    if stop.wait(0.25):
                        return

        readers = [threading.Thread(target=slow_reader, args=args) for args in zip(calls, received)]
        for reader in readers:
            reader.start()
        peak = 0
        try:  # until each reader has had two messages (~2 s when the machine is quiet)
            start = time.monotonic()
            while time.monotonic() - start < 30 and (time.monotonic() - start < 2 or min(map(len, received)) < 2):
                peak = max(peak, rss_bytes(pid))
                if peak > bound:
                    break  # fail before the machine runs out of memory
                time.sleep(0.02)
        finally:
            stop.set()
            for call in calls:
                call.cancel()
            for reader in readers:
                reader.join()
        assert peak <= bound, f"RSS {peak / MiB:.0f} MiB > baseline {baseline / MiB:.0f} + 2 x {budget / MiB:.0f} MiB"
        for indexes in received:
            assert len(indexes) >= 2 and indexes == list(range(len(indexes)))
        deadline = time.monotonic() + 5
        while metric(metrics_url, "kvstore_blockstore_budget_bytes_in_use") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(metrics_url, "kvstore_blockstore_budget_bytes_in_use") == 0


def test_calls_that_get_no_memory_within_their_deadline_are_resource_exhausted(redis_server):
    """Four Gets whose clients never read hold the whole process budget: a Get and a Put
    with a 1 s deadline end with RESOURCE_EXHAUSTED (and a message) before it; once the
    stalled calls go, the budget is free again and both work."""
    h = bytes(range(1, 17))
    block = big_block(h, MiB - 4096)
    cfg = BlockStoreConfig(port=0, redis_url=redis_server.url, max_block_bytes=MiB, max_message_bytes=4 * MiB,
                           get_chunk_bytes=256 << 10, call_budget_bytes=2 * MiB, memory_budget_bytes=8 * MiB)
    with BlockStoreThread(cfg) as server, grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.BlockStoreStub(ch)

        def in_use() -> float:
            return server.server.metrics.registry.get_sample_value("kvstore_blockstore_budget_bytes_in_use")

        put = pb.PutRequest(namespace="t", blocks=[pb.Block(hash=h, data=block)])
        assert stub.Put(put, timeout=10).stored == 1
        stalled = [stub.Get(pb.GetRequest(namespace="t", hashes=[h] * 1024), timeout=60) for _ in range(4)]
        full = 4 * 2 * len(block)  # each holds one block, counted twice; no room for a fifth
        deadline, since = time.monotonic() + 20, time.monotonic()
        while time.monotonic() - since < 1 and time.monotonic() < deadline:  # full for 1 s: stalled
            if in_use() < full:
                since = time.monotonic()
            time.sleep(0.01)
        assert in_use() == full

        for name, call in {"Get": lambda: list(stub.Get(pb.GetRequest(namespace="t", hashes=[h]), timeout=1)),
                           "Put": lambda: stub.Put(put, timeout=1)}.items():
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == EXHAUSTED, (name, err.value.code(), err.value.details())
            assert "short of memory" in err.value.details() and "memory_budget_bytes=8388608" in err.value.details()
            assert 0.8 < time.monotonic() - start < 1.0, name

        for call in stalled:
            call.cancel()
        deadline = time.monotonic() + 5
        while in_use() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert in_use() == 0
        assert stub.Put(put, timeout=10).existed == 1
        assert [decode_get_response(m) for m in ch.unary_stream("/kvstore.v1.BlockStore/Get", request_serializer=
                pb.GetRequest.SerializeToString)(pb.GetRequest(namespace="t", hashes=[h]), timeout=10)] == [
            [(0, memoryview(block))]]


def test_a_block_larger_than_the_call_budget_is_resource_exhausted_at_once(redis_server):
    """A stored value no Put could have written (over max_block_bytes): the Get cannot
    hold it, and says so, without waiting."""
    h = bytes(range(2, 18))
    with redis_server.client() as rc:
        rc.set(b"kv:t:" + h.hex().encode(), big_block(h, 3 * MiB))
    cfg = BlockStoreConfig(port=0, redis_url=redis_server.url, max_block_bytes=MiB, max_message_bytes=4 * MiB,
                           get_chunk_bytes=256 << 10, call_budget_bytes=2 * MiB, memory_budget_bytes=8 * MiB)
    with BlockStoreThread(cfg) as server, grpc.insecure_channel(server.address) as ch:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.BlockStoreStub(ch).Get(pb.GetRequest(namespace="t", hashes=[h]), timeout=5))
        assert err.value.code() == EXHAUSTED and "call_budget_bytes=2097152" in err.value.details()
        assert time.monotonic() - start < 1
        assert server.server.metrics.registry.get_sample_value("kvstore_blockstore_budget_bytes_in_use") == 0


# -- the budget itself ----------------------------------------------------------------------
def test_the_process_budget_serves_waiters_in_order_until_their_deadline():
    async def main():
        budget = MemoryBudget(10)
        assert budget.try_take(8)
        order: list[str] = []

        async def take(name: str, n: int, wait_s: float) -> None:
            await budget.take(n, time.monotonic() + wait_s)
            order.append(name)

        first = asyncio.create_task(take("first", 5, 5))
        second = asyncio.create_task(take("second", 1, 5))  # would fit now, but waits its turn
        late = asyncio.create_task(take("late", 9, 0.05))
        cancelled = asyncio.create_task(take("cancelled", 4, 5))
        await asyncio.sleep(0.01)
        assert not budget.try_take(1)  # nobody jumps the line
        with pytest.raises(RequestError) as err:
            await late
        assert err.value.code == EXHAUSTED and "memory_budget_bytes=10" in err.value.message
        cancelled.cancel()
        budget.release(8)
        await asyncio.gather(first, second)
        assert order == ["first", "second"] and budget.used == 6
        assert cancelled.cancelled()

        call = CallBudget(budget, 6, time.monotonic() + 1)
        assert not call.try_take(4)  # 8 charged (two copies) > 6
        assert call.try_take(2) and budget.used == 10
        with pytest.raises(RequestError, match="call_budget_bytes=6"):
            await call.take(2)
        call.close()
        assert budget.used == 6

    asyncio.run(main())
