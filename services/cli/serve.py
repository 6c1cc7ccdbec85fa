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
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import ray

from kvstore.blockstore_client import BlockStoreClientConfig
from kvstore.cache import CacheConfig
from services.blockstore.server import EXIT_ON_STDIN_EOF
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig
from services.session.pool import PoolConfig, WorkerPool
from services.session.server import SessionServer, SessionServiceConfig
from workers.actor import WorkerConfig
from workers.loader import builtin_config
from workers.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServeConfig:
    """Everything ``kvstore serve`` starts, with embedded defaults. ``session.redis_url`` and
    ``session.blockstore_*`` are the whole service's: empty starts embedded ones."""

    session: SessionServiceConfig = field(default_factory=SessionServiceConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)  # each worker's
    model: str = "small"  # a built-in model (tiny, small, qwen2.5-0.5b-shape) or a checkpoint directory
    workers: int = 2
    cpus_per_worker: float = 1.0
    block_size: int = 16
    redis_maxmemory: str = "2gb"  # of the embedded Redis
    ray_address: str = ""  # empty: start a local Ray; else e.g. "auto" or "ray://head:10001"

    def __post_init__(self) -> None:
        """Fail before starting anything on what would only fail later, inside a worker."""
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not os.path.isdir(self.model):
            builtin_config(self.model)  # raises naming the built-in models


class Service:
    """The running pieces; ``await start()`` / ``await stop()`` on one event loop."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.redis: EmbeddedRedis | None = None
        self.blockstore: subprocess.Popen | None = None
        self.blockstore_address = config.session.blockstore_address
        self.pool: WorkerPool | None = None
        self.server: SessionServer | None = None
        self._ray_started = False

    @property
    def address(self) -> str:
        return self.server.address if self.server else ""

    async def start(self) -> None:
        cfg = self.config
        try:
            redis_url = cfg.session.redis_url
            if not redis_url:
                # Embedded, shared by blocks and sessions: volatile-lru evicts only keys with
                # a TTL, i.e. blocks, never a session's history (which has none).
                # Started on this thread (blocking ~10 ms): from the main thread it gets a
                # parent-death signal, so it never outlives `kvstore serve`.
                self.redis = EmbeddedRedis(EmbeddedRedisConfig(
                    maxmemory=cfg.redis_maxmemory, maxmemory_policy="volatile-lru")).start()
                redis_url = self.redis.url
            if not self.blockstore_address:
                self.blockstore, self.blockstore_address = await asyncio.to_thread(
                    start_blockstore_process, redis_url,
                    env={"KVSTORE_BLOCKSTORE_REDIS_CLUSTER": "1"} if cfg.session.redis_cluster else None)
            self.init_ray()  # blocks a few seconds; nothing is served yet
            worker = WorkerConfig(
                model=cfg.model, block_size=cfg.block_size, cache=cfg.cache,
                blockstore=BlockStoreClientConfig(address=self.blockstore_address,
                                                  token=cfg.session.blockstore_token))
            self.pool = WorkerPool(PoolConfig(num_workers=cfg.workers, worker=worker,
                                              cpus_per_worker=cfg.cpus_per_worker))
            await self.pool.start()
            tokenizer = load_tokenizer(cfg.model if os.path.isdir(cfg.model) else None, self.pool.info.vocab_size)
            self.server = SessionServer(dataclasses.replace(
                cfg.session, redis_url=redis_url, blockstore_address=self.blockstore_address), self.pool, tokenizer)
            await self.server.start()
        except BaseException:
            await self.stop()
            raise

    def init_ray(self) -> None:
        """Join ``ray_address`` or start a local Ray (unless this process already has one).
        Call it from the main thread where possible: Ray installs signal handlers there."""
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


class BackgroundLoop:
    """An asyncio event loop in a daemon thread; ``run(coro)`` waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvstore-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()  # its selector and self-pipe


class BackgroundService:
    """A ``Service`` on a ``BackgroundLoop``, for synchronous programs (the demo, tests)."""

    def __init__(self, config: ServeConfig) -> None:
        self.service = Service(config)
        self._loop: BackgroundLoop | None = None

    @property
    def address(self) -> str:
        return self.service.address

    def start(self) -> BackgroundService:
        self.service.init_ray()  # in the caller's thread (usually main), not the loop's
        self._loop = BackgroundLoop()
        try:
            self._loop.run(self.service.start())
        except BaseException:
            self._loop.close()
            raise
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.run(self.service.stop())
            self._loop.close()
            self._loop = None


def start_blockstore_process(redis_url: str, *, env: dict[str, str] | None = None,
                             cwd: str | None = None) -> tuple[subprocess.Popen, str]:
    """``kvstore blockstore serve`` on a free loopback port, as its own process (it is CPU
    bound and must not share this process's GIL). It holds a pipe from us on its stdin and
    exits when that closes, so it never outlives us, however we end. ``env`` adds to our
    environment (e.g. KVSTORE_BLOCKSTORE_* settings); ``cwd`` is where it runs."""
    cmd = [sys.executable, "-m", "services.blockstore", "--port", "0", "--redis-url", redis_url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=cwd,
                            env={**os.environ, **(env or {}), EXIT_ON_STDIN_EOF: "1"})
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
    print(f"kvstore serving sessions on {service.address} ({config.workers} workers, model {config.model} "
          "(the built-in models have random weights: their text is noise); "
          f"block store {service.blockstore_address}; Ctrl-C stops)", flush=True)
    if ready is not None:
        ready(service)
    try:
        await stop.wait()
    finally:
        print("kvstore: shutting down", flush=True)
        await service.stop()
    return 0


