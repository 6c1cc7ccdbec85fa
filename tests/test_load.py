"""Load: 64 concurrent Generate streams across two tenants for three rounds, against a session
service in its own process (so that its memory is its own) over two Ray decode workers with
the tiny model: no errors, both tenants progress in every round, and no process's RSS grows
by more than 5% from round 2 to round 3."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import grpc
import pytest
import ray

from kvstore.v1 import session_pb2 as pb
from kvstore.v1 import session_pb2_grpc as pb_grpc
from services.blockstore.server import BlockStoreConfig, BlockStoreThread
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig

STREAMS_PER_TENANT, ROUNDS, MAX_TOKENS = 32, 3, 32
KEYS = {"tenant-a": "key-a", "tenant-b": "key-b"}
WORKER_PREFIX = "load-test"

# The session service process: joins the test's Ray, starts two workers (16 sequences each:
# 32 generations run at once, the other 32 queue) and serves until its stdin closes.
_SERVICE = r"""
import asyncio, json, sys
import ray
from kvstore.blockstore_client import BlockStoreClientConfig
from kvstore.cache import CacheConfig
from services.session.pool import PoolConfig, WorkerPool
from services.session.server import SessionServer, SessionServiceConfig
from workers.actor import WorkerConfig
from workers.tokenizer import ByteTokenizer

async def main(redis_url, blockstore, prefix):
    worker = WorkerConfig(model="tiny", dtype="float32", block_size=4, cache=CacheConfig(t0_blocks=512, t1_blocks=1024),
                          blockstore=BlockStoreClientConfig(address=blockstore), threads=1)
    pool = WorkerPool(PoolConfig(num_workers=2, worker=worker, name_prefix=prefix))
    await pool.start()
    server = SessionServer(SessionServiceConfig(port=0, redis_url=redis_url, api_keys="key-a=tenant-a;key-b=tenant-b"),
                           pool, ByteTokenizer(pool.info.vocab_size))
    await server.start()
    print(json.dumps({"address": server.address}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(grace=1)
    await pool.close()

ray.init(address=sys.argv[1], log_to_driver=False, _node_ip_address="127.0.0.1")
asyncio.run(main(*sys.argv[2:]))
"""


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def service(redis_server, tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    blockstore = BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_server.url))
    blockstore.start()
    sessions = EmbeddedRedis(EmbeddedRedisConfig(maxmemory="0", maxmemory_policy="noeviction")).start()
    proc = subprocess.Popen([sys.executable, "-c", _SERVICE, ray.get_runtime_context().gcs_address, sessions.url,
                             blockstore.address, WORKER_PREFIX], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=os.getcwd())
    try:
        address = json.loads(proc.stdout.readline())["address"]
        workers = [ray.get_actor(f"{WORKER_PREFIX}-{i}", namespace="kvstore") for i in range(2)]
        pids = {"session service": proc.pid}
        for i, w in enumerate(workers):
            pids[f"worker {i}"] = ray.get(w.__ray_call__.remote(lambda self: os.getpid()))
        yield address, pids, workers
    finally:
        proc.stdin.close()
        proc.wait(60)
        sessions.stop()
        blockstore.stop()
        ray.shutdown()


async def _round(stub, sessions: dict[str, list[str]]) -> dict[str, list[int | BaseException]]:
    async def turn(tenant: str, session_id: str) -> int:
        n = 0
        request = pb.GenerateRequest(session_id=session_id, request_id=uuid.uuid4().hex,
                                     input=pb.Input(messages=pb.Messages(items=[pb.Message(role="user",
                                                                                           content="go on")])),
                                     sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        async for r in stub.Generate(request, metadata=(("authorization", f"Bearer {KEYS[tenant]}"),), timeout=300):
            n += len(r.chunk.ids)
        return n
    results = await asyncio.gather(*(turn(t, s) for t, ids in sessions.items() for s in ids), return_exceptions=True)
    return {"tenant-a": results[:STREAMS_PER_TENANT], "tenant-b": results[STREAMS_PER_TENANT:]}


@pytest.mark.slow
def test_64_streams_of_two_tenants_for_three_rounds(service):
    address, pids, workers = service
    held = []  # sequences each worker holds: beyond what it runs at once (16), they would get no tokens

    async def watch(done: asyncio.Event) -> None:
        while not done.is_set():
            stats = await asyncio.gather(*(w.stats.remote() for w in workers))
            held.append(max(s.running + s.waiting for s in stats))
            await asyncio.sleep(0.05)

    async def scenario():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.SessionsStub(channel)
            sessions = {tenant: [(await stub.CreateSession(
                pb.CreateSessionRequest(system_prompt=f"You are agent {i} of {tenant}."),
                metadata=(("authorization", f"Bearer {key}"),))).session_id for i in range(STREAMS_PER_TENANT)]
                for tenant, key in KEYS.items()}
            rounds, rss, done = [], [], asyncio.Event()
            watcher = asyncio.create_task(watch(done))
            for _ in range(ROUNDS):
                rounds.append(await _round(stub, sessions))
                rss.append({name: rss_mb(pid) for name, pid in pids.items()})
            done.set()
            await watcher
            return rounds, rss
    rounds, rss = asyncio.run(scenario())
    print("RSS (MB) after each round:", {name: [round(r[name]) for r in rss] for name in pids})
    for i, results in enumerate(rounds, 1):
        for tenant, counts in results.items():
            errors = [r for r in counts if isinstance(r, BaseException)]
            assert not errors, (i, tenant, errors[:3])
            assert counts == [MAX_TOKENS] * STREAMS_PER_TENANT, (i, tenant)  # every stream of both tenants ran
    for name in pids:
        assert rss[2][name] <= 1.05 * rss[1][name], (name, [r[name] for r in rss])
    assert len(held) > 10 and max(held) == 16, max(held)  # full, never over
