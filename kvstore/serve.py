"""``kvstore serve``: the whole service on one machine (or joining a Ray cluster).

Starts, in order: Redis (embedded unless ``--redis-url``), the block store (its own process,
unless ``--blockstore-address``), Ray (local unless ``--ray-address``) with N decode
workers, and the session service in this process. Stops them in reverse order.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from kvstore.config import BlockStoreClientConfig, CacheConfig, SessionServiceConfig
from services.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig
from services.session.server import SessionServer
from workers.actor import WorkerConfig
from workers.pool import PoolConfig, WorkerPool
from workers.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

_SETPRIV = shutil.which("setpriv")


@dataclass(slots=True)
class ServeConfig:
    """Everything ``kvstore serve`` starts, with embedded defaults."""

    host: str = "127.0.0.1"
    port: int = 50052  # the session service; 0 picks a free port
    api_keys: str = ""  # "key=tenant-a;key2=*"; empty: no auth, loopback only
    model: str = "small"  # a built-in model (tiny, small, qwen2.5-0.5b-shape) or a checkpoint directory
    workers: int = 2
    cpus_per_worker: float = 1.0
    block_size: int = 16
    t0_blocks: int = 1024
    t1_blocks: int = 4096
    redis_url: str = ""  # empty: an embedded redis-server (session state and blocks)
    redis_maxmemory: str = "2gb"
    blockstore_address: str = ""  # empty: start a block store process on the Redis
    blockstore_token: str = ""
    ray_address: str = ""  # empty: start a local Ray; else e.g. "auto" or "ray://head:10001"
    metrics_port: int = 0
    max_concurrent_generations: int = 64


class Service:
    """The running pieces; ``await start()`` / ``await stop()`` on one event loop."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.redis: EmbeddedRedis | None = None
        self.blockstore: subprocess.Popen | None = None
        self.blockstore_address = config.blockstore_address
        self.pool: WorkerPool | None = None
        self.server: SessionServer | None = None
        self._ray_started = False

    @property
    def address(self) -> str:
        return self.server.address if self.server else ""

    async def start(self) -> None:
        cfg = self.config
        try:
            redis_url = cfg.redis_url
            if not redis_url:
                # Embedded: blocks may be evicted (allkeys-lru); session state is small and hot.
                self.redis = await asyncio.to_thread(
                    EmbeddedRedis(EmbeddedRedisConfig(maxmemory=cfg.redis_maxmemory)).start)
                redis_url = self.redis.url
            if not self.blockstore_address:
                self.blockstore, self.blockstore_address = await asyncio.to_thread(_start_blockstore, redis_url)
            await asyncio.to_thread(self._init_ray)
            worker = WorkerConfig(
                model=cfg.model, block_size=cfg.block_size,
                cache=CacheConfig(t0_blocks=cfg.t0_blocks, t1_blocks=cfg.t1_blocks),
                blockstore=BlockStoreClientConfig(address=self.blockstore_address, token=cfg.blockstore_token))
            self.pool = WorkerPool(PoolConfig(num_workers=cfg.workers, worker=worker,
                                              cpus_per_worker=cfg.cpus_per_worker))
            await self.pool.start()
            tokenizer = load_tokenizer(cfg.model if os.path.isdir(cfg.model) else None, self.pool.info["vocab_size"])
            self.server = SessionServer(SessionServiceConfig(
                host=cfg.host, port=cfg.port, redis_url=redis_url, api_keys=cfg.api_keys,
                metrics_port=cfg.metrics_port, max_concurrent_generations=cfg.max_concurrent_generations),
                self.pool, tokenizer)
            await self.server.start()
        except BaseException:
            await self.stop()
            raise

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.config.ray_address:
            ray.init(address=self.config.ray_address, log_to_driver=False)
        else:
            cpus = max(os.cpu_count() or 1, int(self.config.workers * self.config.cpus_per_worker))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        self._ray_started = True

    async def stop(self) -> None:
        """Stop in reverse order; idempotent."""
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if self._ray_started:
            import ray

            await asyncio.to_thread(ray.shutdown)
            self._ray_started = False
        if self.blockstore is not None:
            self.blockstore.terminate()
            try:
                await asyncio.to_thread(self.blockstore.wait, 30)
            except subprocess.TimeoutExpired:
                self.blockstore.kill()
            self.blockstore = None
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)
            self.redis = None


def _start_blockstore(redis_url: str) -> tuple[subprocess.Popen, str]:
    """``kvstore blockstore serve`` on a free loopback port, as its own process (it is CPU
    bound and must not share this process's GIL); dies with us (pdeathsig)."""
    cmd = [sys.executable, "-m", "services.blockstore", "--port", "0", "--redis-url", redis_url]
    if _SETPRIV and threading.current_thread() is threading.main_thread():
        cmd = [_SETPRIV, "--pdeathsig", "TERM", "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line:
            # Keep draining its stdout so the pipe never fills up and blocks it.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.split("listening on", 1)[1].split()[0]
    raise RuntimeError(f"the block store exited with code {proc.wait()} before listening")


async def serve(config: ServeConfig, ready=None) -> int:
    """Run until SIGINT/SIGTERM. ``ready(service)`` is called once everything listens."""
    service = Service(config)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    print(f"kvstore serving sessions on {service.address} ({config.workers} workers, model {config.model}; "
          f"block store {service.blockstore_address}; Ctrl-C stops)", flush=True)
    if ready is not None:
        ready(service)
    try:
        await stop.wait()
    finally:
        print("kvstore: shutting down", flush=True)
        await service.stop()
    return 0


