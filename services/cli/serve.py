"""``kvstore serve``: the whole service on one machine (or joining a Ray cluster).

Starts, in order: the session Redis (embedded, durable, unless ``--redis-url``), the block
Redis (embedded, an LRU cache, unless a URL is given for it), the block store (its own
process, unless ``--blockstore-address``), Ray (local, on loopback, unless ``--ray-address``)
with N decode workers, and the session service in this process; then supervises the embedded
processes. Stops them in reverse order. Internal tiers get per-run secrets (docs/security.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray._private import ray_constants
from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
from ray.exceptions import AuthenticationError

from kvstore.blockstore_client import BlockStoreClientConfig
from kvstore.cache import CacheConfig
from services.blockstore.server import ENV_PREFIX as BLOCKSTORE_ENV
from services.blockstore.server import start_blockstore_process
from services.cli.keys import api_keys
from services.cli.supervisor import Supervisor
from services.common.auth import ANY_NAMESPACE
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig
from services.common.errors import ConfigError
from services.session.pool import PoolConfig, WorkerPool
from services.session.server import SessionServer, SessionServiceConfig
from workers.actor import WorkerConfig
from workers.engine import EngineConfig
from workers.loader import builtin_config
from workers.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
SLOW_STOP_S = 5.0  # a step of shutdown taking longer is logged as a warning


def default_data_dir() -> Path:
    """Where the session Redis keeps its append-only file unless ``--data-dir``."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "kvstore"


@dataclass(slots=True)
class ServeConfig:
    """Everything ``kvstore serve`` starts, with embedded defaults. ``session.redis_url`` and
    ``session.blockstore_*`` are the whole service's: empty starts embedded ones."""

    session: SessionServiceConfig = field(default_factory=SessionServiceConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)  # each worker's
    engine: EngineConfig = field(default_factory=EngineConfig)  # each worker's
    model: str = "small"  # a built-in model (tiny, small, qwen2.5-0.5b-shape) or a checkpoint directory
    workers: int = 2
    cpus_per_worker: float = 1.0
    block_size: int = 16
    api_keys_file: str = ""  # more API keys, one 'key=ns1,ns2' or 'sha256:<hex>=ns1' per line
    data_dir: str = ""  # of the embedded session Redis (append-only file); empty: default_data_dir()
    session_redis_maxmemory: str = "1gb"  # of the embedded session Redis (noeviction: full refuses writes)
    redis_maxmemory: str = "2gb"  # of the embedded block Redis (allkeys-lru)
    blocks_redis_url: str = ""  # the block store's Redis; empty: --redis-url if set, else an embedded one
    blocks_redis_cluster: bool = False  # blocks_redis_url names a node of a Redis Cluster
    ray_address: str = ""  # empty: start a local Ray; else e.g. "auto" or "ray://head:10001"
    shared_workers: bool = False  # detached workers shared by the replicas on one Ray cluster (PoolConfig.shared)

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
    """The running pieces; ``await start()`` / ``await stop()`` on one event loop. The
    constructor checks the API keys (it reads ``api_keys_file``) and raises ``ConfigError``
    for a non-loopback host without keys, or shared workers without the shared tiers, before
    anything starts."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        if config.shared_workers and not (config.ray_address and config.session.redis_url
                                          and config.session.blockstore_address):
            raise ConfigError("--shared-workers needs --ray-address, --redis-url and --blockstore-address: the "
                              "replicas sharing the workers must share the Ray cluster, the session Redis and the "
                              "block store")
        self.api_keys = api_keys(config.session.host, config.session.api_keys, config.api_keys_file)
        self.session_redis: EmbeddedRedis | None = None
        self.blocks_redis: EmbeddedRedis | None = None
        self.blockstore: subprocess.Popen | None = None
        self.blockstore_address = config.session.blockstore_address
        self._start_blockstore: Callable[..., tuple[subprocess.Popen, str]] | None = None
        self.pool: WorkerPool | None = None
        self.server: SessionServer | None = None
        self.supervisor: Supervisor | None = None
        self._ray_started = False

    @property
    def address(self) -> str:
        return self.server.address if self.server else ""

    @property
    def data_dir(self) -> Path | None:
        """Where the embedded session Redis keeps its data (None with ``--redis-url``)."""
        return self.session_redis.data_dir if self.session_redis else None

    async def start(self) -> None:
        cfg = self.config
        try:
            session_url = cfg.session.redis_url or self._start_session_redis()
            blockstore_token = cfg.session.blockstore_token
            if not self.blockstore_address:
                blockstore_token = await self._start_blockstore_tier()
            self.init_ray()  # blocks a few seconds; nothing is served yet
            worker = WorkerConfig(
                model=cfg.model, block_size=cfg.block_size, cache=cfg.cache, engine=cfg.engine,
                blockstore=BlockStoreClientConfig(address=self.blockstore_address, token=blockstore_token))
            self.pool = WorkerPool(PoolConfig(num_workers=cfg.workers, worker=worker,
                                              cpus_per_worker=cfg.cpus_per_worker, shared=cfg.shared_workers))
            await self.pool.start()
            tokenizer = load_tokenizer(cfg.model if os.path.isdir(cfg.model) else None, self.pool.info.vocab_size)
            self.server = SessionServer(dataclasses.replace(
                cfg.session, redis_url=session_url, api_keys=self.api_keys, blockstore_address=self.blockstore_address,
                blockstore_token=blockstore_token), self.pool, tokenizer)
            await self.server.start()
            self._supervise()
        except BaseException:
            await self.stop()
            raise

    def _start_session_redis(self) -> str:
        """noeviction and an append-only file: session state is never evicted, and a killed
        Redis loses no acknowledged turn. Blocks this thread ~10 ms (longer to load a big file);
        nothing is served yet."""
        cfg = self.config
        self.session_redis = EmbeddedRedis(EmbeddedRedisConfig(
            maxmemory=cfg.session_redis_maxmemory, maxmemory_policy="noeviction", appendonly=True,
            data_dir=str(Path(cfg.data_dir or default_data_dir()) / "session-redis"),
            password=secrets.token_urlsafe(32), startup_timeout_s=600)).start()
        return self.session_redis.url

    async def _start_blockstore_tier(self) -> str:
        """The block Redis (unless a URL is given) and the block store process; returns the
        block store's token."""
        cfg = self.config
        blocks_url, cluster = cfg.blocks_redis_url, cfg.blocks_redis_cluster
        if not blocks_url and cfg.session.redis_url:
            blocks_url, cluster = cfg.session.redis_url, cfg.session.redis_cluster
        if not blocks_url:  # a cache: evicts least recently used blocks, keeps nothing
            self.blocks_redis = EmbeddedRedis(EmbeddedRedisConfig(
                maxmemory=cfg.redis_maxmemory, maxmemory_policy="allkeys-lru",
                password=secrets.token_urlsafe(32))).start()
            blocks_url = self.blocks_redis.url
        token = secrets.token_urlsafe(32)
        self._start_blockstore = functools.partial(start_blockstore_process, blocks_url, env={
            BLOCKSTORE_ENV + "TOKENS": f"{token}={ANY_NAMESPACE}",
            BLOCKSTORE_ENV + "REDIS_CLUSTER": "1" if cluster else "0"})
        self.blockstore, self.blockstore_address = await asyncio.to_thread(self._start_blockstore)
        return token

    def _supervise(self) -> None:
        self.supervisor = Supervisor(self.server.metrics.registry)
        for name, redis_ in (("session Redis", self.session_redis), ("block Redis", self.blocks_redis)):
            if redis_ is not None:
                self.supervisor.watch(name, redis_.is_running, redis_.restart)
        if self.blockstore is not None:
            self.supervisor.watch("block store", lambda: self.blockstore.poll() is None, self._restart_blockstore)
        self.supervisor.start()

    def _restart_blockstore(self) -> None:
        self.blockstore.stdin.close()  # the dead one's pipe
        port = int(self.blockstore_address.rsplit(":", 1)[1])  # the workers know this address
        self.blockstore, _ = self._start_blockstore(port=port)

    def init_ray(self) -> None:
        """Join ``ray_address`` or start a local Ray (unless this process already has one).
        Call it from the main thread where possible: Ray installs signal handlers there."""
        if ray.is_initialized():
            return
        if self.config.ray_address:
            join_ray(self.config.ray_address)
        else:
            cpus = max(os.cpu_count() or 1, int(self.config.workers * self.config.cpus_per_worker))
            start_local_ray(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        self._ray_started = True

    async def stop(self) -> None:
        """Stop in reverse order; idempotent."""
        if self.supervisor is not None:
            async with _stage("the supervisor"):
                await self.supervisor.stop()
            self.supervisor = None
        if self.server is not None:
            async with _stage("the session server"):
                await self.server.stop()
            self.server = None
        if self.pool is not None:
            async with _stage("the workers"):
                await self.pool.close()
            self.pool = None
        if self._ray_started:
            async with _stage("local Ray"):
                await asyncio.to_thread(ray.shutdown)
            self._ray_started = False
        if self.blockstore is not None:
            async with _stage("the block store"):
                self.blockstore.terminate()
                try:
                    await asyncio.to_thread(self.blockstore.wait, 30)
                except subprocess.TimeoutExpired:
                    self.blockstore.kill()
            self.blockstore = None
        for name, redis_ in (("the block Redis", self.blocks_redis), ("the session Redis", self.session_redis)):
            if redis_ is not None:
                async with _stage(name):
                    await asyncio.to_thread(redis_.stop)
        self.blocks_redis = self.session_redis = None


@contextlib.asynccontextmanager
async def _stage(name: str):
    """Log how long one step of stopping took: a slow shutdown names what it waited on."""
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    log.log(logging.WARNING if took > SLOW_STOP_S else logging.INFO, "stopped %s in %.1f s", name, took)


def join_ray(address: str) -> None:
    """``ray.init`` of the running Ray cluster at ``address``, with this machine's Ray token.

    ``ray start`` turns token authentication on when a token exists (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), but a driver given an explicit address keeps it
    off and is refused. As Ray does for ``address="auto"``: with RAY_AUTH_MODE unset, a token
    that exists is used."""
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as e:
        # Ray reports the refusal as the text of a RuntimeError (the last GCS connection error).
        causes = [e.__cause__, getattr(e.__cause__, "__cause__", None)]
        if not any(isinstance(c, AuthenticationError) or "InvalidAuthToken" in str(c) for c in causes if c):
            raise
        raise ConfigError(f"the Ray cluster at {address} refused this process's credentials: give it the cluster's "
                          "token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as on its head node) and "
                          "RAY_AUTH_MODE=token") from e


def start_local_ray(**kwargs) -> None:
    """``ray.init(**kwargs)`` of a new local Ray whose every server listens on 127.0.0.1 only.

    Ray binds to the node's address and replaces a loopback one by the host's own unless it
    runs as a single-machine Ray, as on macOS and Windows (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
    read when ``ray`` is imported): that switch is turned on for this call only.
    """
    cluster = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(**kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster


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


async def serve(config: ServeConfig, ready=None) -> int:
    """Run until SIGINT/SIGTERM. ``ready(service)`` is called once everything listens."""
    service = Service(config)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    http = service.server.http
    print(f"kvstore serving sessions on {service.address}"
          + (f" and the OpenAI-compatible API on http{'s' if config.session.tls_cert else ''}://{http.address}/v1"
             if http else "") + f" ({config.workers} workers, model {config.model} "
          "(the built-in models have random weights: their text is noise); "
          f"block store {service.blockstore_address}; session data in {service.data_dir or 'the given Redis'}; "
          "Ctrl-C stops)", flush=True)
    if ready is not None:
        ready(service)
    try:
        await stop.wait()
    finally:
        print("kvstore: shutting down", flush=True)
        await service.stop()
    return 0


