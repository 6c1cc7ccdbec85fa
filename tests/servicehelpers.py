"""A session service over a real Ray worker pool, driven from a background event loop so the
tests can use the synchronous ``SessionClient`` like an agent runtime would."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray
import redis
from enginehelpers import tiny

from kvstore.blockstore_client import BlockStoreClientConfig
from kvstore.cache import CacheConfig, TieredKVCache
from services.blockstore.server import BlockStoreConfig, BlockStoreThread
from services.cli.serve import BackgroundLoop as LoopThread
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig
from services.session.pool import PoolConfig, WorkerPool
from services.session.server import SessionServer, SessionServiceConfig
from workers.actor import WorkerConfig
from workers.engine import Engine, EngineConfig
from workers.loadcost import LoadCostConfig
from workers.loader import kv_spec
from workers.sampling import SamplingParams
from workers.tokenizer import ByteTokenizer

BLOCK = 4
API_KEYS = "key-a=tenant-a;key-b=tenant-b;admin=*"


def worker_config(blockstore_address: str, t0_blocks: int = 512, t1_blocks: int = 1024,
                  max_num_seqs: int = 16, cost_aware: bool = True) -> WorkerConfig:
    """``cost_aware=False``: every cached block is loaded (the tiny model may recompute a short
    T2 prefix faster than it loads, which tests of the T2 path must not depend on)."""
    return WorkerConfig(model="tiny", dtype="float32", block_size=BLOCK,
                        cache=CacheConfig(t0_blocks=t0_blocks, t1_blocks=t1_blocks),
                        blockstore=BlockStoreClientConfig(address=blockstore_address), threads=1,
                        engine=EngineConfig(max_num_seqs=max_num_seqs,
                                            load_cost=LoadCostConfig(cost_aware=cost_aware)))


def start_pool(loop: LoopThread, config: PoolConfig) -> WorkerPool:
    pool = WorkerPool(config)
    loop.run(pool.start())
    return pool


def start_server(loop: LoopThread, pool: WorkerPool, redis_url: str, **overrides) -> SessionServer:
    """A session server on ``pool``; pass ``blockstore_address`` for Pin's cold-tier part.
    The shared test Redis servers evict any key (allkeys-lru); session state must not be
    evicted (``SessionServer`` refuses such a Redis), so they are switched to noeviction."""
    client = redis.Redis.from_url(redis_url)
    if client.config_get("maxmemory-policy")["maxmemory-policy"].startswith("allkeys-"):
        client.config_set("maxmemory-policy", "noeviction")
    cfg = SessionServiceConfig(port=0, redis_url=redis_url, api_keys=API_KEYS, grace_seconds=1.0, **overrides)
    server = SessionServer(cfg, pool, ByteTokenizer(pool.info.vocab_size))
    loop.run(server.start())
    return server


@contextlib.contextmanager
def serving(loop: LoopThread, pool: WorkerPool, redis_url: str, **overrides) -> Iterator[SessionServer]:
    """``start_server`` for the ``with`` block."""
    server = start_server(loop, pool, redis_url, **overrides)
    try:
        yield server
    finally:
        loop.run(server.stop(grace=0))


@dataclass(slots=True)
class Stack:
    """A real Ray pool of two tiny-model workers, a block store and a session Redis."""

    loop: LoopThread
    pool: WorkerPool
    blockstore: BlockStoreThread
    redis: EmbeddedRedis


@contextlib.contextmanager
def worker_stack(redis_server: EmbeddedRedis, ray_dir: str, name: str, max_num_seqs: int) -> Iterator[Stack]:
    """``Stack`` on a fresh local Ray (one per test module), stopped after the block."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             _temp_dir=ray_dir)
    blockstore = BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_server.url))
    blockstore.start()
    sessions = EmbeddedRedis(EmbeddedRedisConfig(maxmemory="0", maxmemory_policy="noeviction")).start()
    loop = LoopThread()
    pool = start_pool(loop, PoolConfig(num_workers=2, worker=worker_config(blockstore.address, max_num_seqs=max_num_seqs),
                                       poll_interval_s=0.05, name_prefix=name))
    try:
        yield Stack(loop, pool, blockstore, sessions)
    finally:
        loop.run(pool.close())
        loop.close()
        sessions.stop()
        blockstore.stop()
        ray.shutdown()


def reference(prompt: list[int], max_tokens: int, ignore_eos: bool = True) -> list[int]:
    """Greedy output of the in-process engine, computing everything (no reuse)."""
    config, model, digest = tiny()
    cache = TieredKVCache(kv_spec(config, "reference", digest, BLOCK), CacheConfig(t0_blocks=1100, t1_blocks=1))
    engine = Engine(model, cache, eos_token_ids=config.eos_token_ids)
    (seq,) = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))
    assert seq.usage.cached_tokens == [0, 0, 0]
    cache.close()
    return seq.output


def wait_for(predicate, timeout: float = 60, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value (state owned by other processes)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)

