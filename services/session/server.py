"""The session service's gRPC server: Sessions API, health (SERVING while Redis answers and a
worker is live), reflection, Prometheus metrics, graceful shutdown.

Session state must never be evicted: at start the server reads Redis' ``maxmemory-policy``
and refuses one that could remove session keys. Its Redis client waits for a free connection
(a blocking pool sized from the generation limits) and retries commands that lost their
connection (e.g. after a Redis restart) with backoff; every session write is a script that
is safe to run again (request ids, expected lengths, random session ids).

The worker pool and tokenizer are passed in: ``kvstore serve`` (services/cli/serve.py) builds
them, and tests restart a server over the same pool to show that sessions live in Redis.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis
import redis.exceptions as rex
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from kvstore.blockstore_client import (
    BlockStoreClient,
    BlockStoreClientConfig,
    BlockStoreError,
    BlockStoreUnavailable,
    RemovalStream,
)
from kvstore.cache import BlockEvent, Tier
from kvstore.v1 import session_pb2 as pb
from services.common.auth import TokenTable
from services.common.errors import REDIS_UNAVAILABLE, ConfigError
from services.common.grpc_server import MetricsEndpoint, add_servicer, bind
from services.common.net import host_port, is_loopback
from services.session.http import HTTPServer, create_app
from services.session.metrics import SessionMetrics, WorkerCollector
from services.session.pool import WorkerPool
from services.session.service import SERVICE_NAME, SessionServicer, read_worker_stats
from services.session.state import SessionStore
from workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
MAX_SEND_BYTES = 64 << 20  # replies (ListSessions of many sessions with metadata)
# Commands that lost their connection are retried this often, backing off up to ~0.5 s.
_REDIS_RETRY = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(slots=True)
class SessionServiceConfig:
    """The session service (the gRPC API for agent runtimes)."""

    host: str = "127.0.0.1"
    port: int = 50052  # 0 picks a free port
    redis_url: str = ""  # session state; empty: `kvstore serve` starts an embedded redis-server
    redis_cluster: bool = False
    # "key=tenant-a;key2=tenant-b,tenant-c;admin=*". Empty: no authentication (loopback only),
    # one namespace "default".
    api_keys: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    metrics_port: int = 0
    grace_seconds: float = 5.0
    max_message_bytes: int = 8 << 20  # the largest request accepted
    max_tokens: int = 4096  # per Generate
    default_max_tokens: int = 64
    max_input_tokens: int = 32768
    max_history_tokens: int = 0  # a session's history limit; 0: the model's context
    max_sessions_per_namespace: int = 10000  # open sessions; 0: no limit
    idle_session_ttl_s: float = 7 * 86400.0  # a session not written for this long is removed; 0: never
    # Generations run at once: what the live workers batch (the sum of their max_num_seqs), and
    # at most max_concurrent_generations when set (0: no cap of its own). More wait in a queue
    # of max_queued_generations, at most queue_timeout_s (less if the call's deadline is sooner).
    max_concurrent_generations: int = 0
    max_queued_generations: int = 64
    max_generations_per_namespace: int = 0  # 0: no cap of its own (slots are still shared fairly)
    queue_timeout_s: float = 30.0
    redis_max_connections: int = 0  # of the session state's Redis client; 0: sized from the limits above
    redis_pool_timeout_s: float = 10.0  # a call waits this long for a free Redis connection
    # The block store, for Pin (keeps a pinned session's blocks in the cold tier); empty: none.
    blockstore_address: str = ""
    blockstore_token: str = ""
    # The OpenAI-compatible HTTP API (http.py) on `host`, beside the gRPC API; -1: off, 0: a free port.
    http_port: int = -1


def validate_config(config: SessionServiceConfig) -> TokenTable:
    for name in ("max_tokens", "default_max_tokens", "max_input_tokens", "max_message_bytes", "queue_timeout_s",
                 "redis_pool_timeout_s"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")
    for name in ("max_history_tokens", "max_sessions_per_namespace", "idle_session_ttl_s",
                 "max_concurrent_generations", "max_queued_generations", "max_generations_per_namespace",
                 "redis_max_connections"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must not be negative (0: see its help), got {getattr(config, name)}")
    if config.default_max_tokens > config.max_tokens:
        raise ConfigError("default_max_tokens must not exceed max_tokens")
    if not config.redis_url:
        raise ConfigError("the session service needs redis_url (kvstore serve starts an embedded Redis)")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("TLS needs both tls_cert and tls_key (PEM file paths), or neither")
    keys = TokenTable(config.api_keys)
    if not keys.enabled and not is_loopback(config.host):
        raise ConfigError(f"refusing to serve {config.host} without api_keys: set --api-keys, or listen on "
                          "127.0.0.1")
    return keys


class SessionServer:
    """``await start()`` then ``await stop()`` on the same event loop."""

    def __init__(self, config: SessionServiceConfig, pool: WorkerPool, tokenizer: Tokenizer) -> None:
        self.config = config
        self._keys = validate_config(config)
        self.pool = pool
        self.tokenizer = tokenizer
        self._blockstore: BlockStoreClient | None = None
        self.metrics = SessionMetrics()
        self.port = 0
        self._redis: aioredis.Redis | None = None
        self._server: grpc.aio.Server | None = None
        self._servicer: SessionServicer | None = None
        self._health: health.aio.HealthServicer | None = None
        self._health_task: asyncio.Task | None = None
        self._t2_task: asyncio.Task | None = None
        self._t2_stream: RemovalStream | None = None
        # Its own thread: the relay blocks for the service's lifetime, which would hold one of
        # the default executor's few threads (chat rendering, block store calls) forever.
        self._t2_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="t2-removals")
        self._healthy: bool | None = None
        self._metrics_http = None
        self.http: HTTPServer | None = None

    @property
    def address(self) -> str:
        return host_port(self.config.host, self.port)

    async def start(self) -> int:
        cfg = self.config
        try:
            self._redis = self._redis_client()
            await check_eviction_policy(self._redis, cfg.idle_session_ttl_s)
            if cfg.blockstore_address:
                self._blockstore = BlockStoreClient(BlockStoreClientConfig(
                    address=cfg.blockstore_address, token=cfg.blockstore_token))
            store = SessionStore(self._redis, cfg.idle_session_ttl_s, cfg.max_sessions_per_namespace)
            self._servicer = servicer = SessionServicer(store, self.pool, self.tokenizer, self._keys, self.metrics,
                                                        cfg, self._blockstore)
            self._server = grpc.aio.server(options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                ("grpc.so_reuseport", 0),
            ])
            add_servicer(self._server, pb.DESCRIPTOR.services_by_name["Sessions"], servicer, servicer.rpc)
            self._health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                                self._server)
            self.port = bind(self._server, cfg.host, cfg.port, cfg.tls_cert, cfg.tls_key)
            if cfg.metrics_port:
                self.metrics.registry.register(WorkerCollector(functools.partial(read_worker_stats, self.pool, 5.0)))
                self._metrics_http = MetricsEndpoint(cfg.host, cfg.metrics_port, self.metrics.registry)
            await self._check()
            await self._server.start()
            if cfg.http_port >= 0:
                self.http = HTTPServer(create_app(servicer, cfg, lambda: bool(self._healthy)), cfg)
                await self.http.start()
            self._health_task = asyncio.create_task(self._health_loop(), name="session-health")
            if self._blockstore is not None:
                self._t2_task = asyncio.create_task(self._watch_t2_removals(), name="t2-removals")
        except BaseException:
            await self.stop(grace=0)
            raise
        logger.info("session service on %s%s (auth %s)", self.address,
                    f", OpenAI-compatible HTTP API on {self.http.address}" if self.http else "",
                    "on" if self._keys.enabled else "off")
        return self.port

    def _redis_client(self) -> aioredis.Redis:
        """Commands that lost their connection are retried; calls wait for a free connection
        (one per running or queued generation, plus some for the other calls)."""
        cfg = self.config
        connections = cfg.redis_max_connections or 16 + cfg.max_queued_generations + (
            cfg.max_concurrent_generations or self.pool.capacity)
        common = dict(socket_timeout=5, socket_connect_timeout=2, retry=_REDIS_RETRY,
                      retry_on_error=[rex.ConnectionError, rex.TimeoutError])
        if cfg.redis_cluster:  # per node; its pool does not block, so it has no limit of its own
            return RedisCluster.from_url(cfg.redis_url, **common)
        return aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            cfg.redis_url, max_connections=connections, timeout=cfg.redis_pool_timeout_s, **common))

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones (then the work they left
        running, such as re-pins) finish within ``grace`` each."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        grace = self.config.grace_seconds if grace is None else grace
        if self.http is not None:
            await self.http.stop(grace)
            self.http = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._servicer is not None:  # its background work uses Redis and the block store client
            await self._servicer.stop(grace)
            self._servicer = None
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        if self._t2_task is not None:
            if self._t2_stream is not None:
                self._t2_stream.cancel()  # ends the thread reading it
            self._t2_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._t2_task
            self._t2_task = None
        self._t2_thread.shutdown(wait=False)
        if self._metrics_http is not None:
            await self._metrics_http.stop()
            self._metrics_http = None
        if self._redis is not None:
            await self._redis.aclose()
            if not self.config.redis_cluster:  # a client given a pool leaves closing it to its owner
                await self._redis.connection_pool.disconnect()
            self._redis = None
        if self._blockstore is not None:
            self._blockstore.close()
            self._blockstore = None

    async def _check(self) -> None:
        reason = ""
        try:
            await asyncio.wait_for(self._redis.ping(), 3)
        except Exception as e:  # noqa: BLE001 - any failure means not serving
            reason = f"Redis: {e or type(e).__name__}"
        if not reason and not self.pool.live_worker_ids:
            reason = "no live decode worker"
        if not reason and self._blockstore is not None:
            try:  # Stats reaches the block store and its Redis; the client's deadline bounds it
                await asyncio.to_thread(self._blockstore.stats)
            except Exception as e:  # noqa: BLE001 - any failure means not serving
                reason = f"block store: {e}"
        healthy = not reason
        if healthy != self._healthy and self._health is not None:
            self._healthy = healthy
            for service in ("", SERVICE_NAME):
                await self._health.set(service, _SERVING if healthy else _NOT_SERVING)
            (logger.info if healthy else logger.warning)("health: %s%s", "SERVING" if healthy else "NOT_SERVING",
                                                         f" ({reason})" if reason else "")

    async def _watch_t2_removals(self) -> None:
        """Relay the block store's T2 removals (evicted, expired, deleted: no worker sees them)
        into the KV event stream, watching again after the block store was unreachable."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            self._t2_stream = stream = self._blockstore.watch_removals()
            try:
                await loop.run_in_executor(self._t2_thread, self._relay_removals, stream, loop)
                failures = 0
            except BlockStoreUnavailable as e:
                if not failures:
                    logger.warning("not watching T2 removals (%s); retrying", e)
                failures += 1
            except BlockStoreError as e:
                logger.warning("T2 removals will not be in the KV event stream: %s (the block store token must "
                               "be for every namespace)", e)
                return
            await asyncio.sleep(min(5.0, 0.2 * 2 ** min(failures, 5)))

    def _relay_removals(self, stream: RemovalStream, loop: asyncio.AbstractEventLoop) -> None:
        for batch in stream:
            events = [BlockEvent(Tier.T2, False, r.hash, r.namespace) for r in batch.removals]
            loop.call_soon_threadsafe(self.pool.events.removed_from_t2, events)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await self._check()
            except Exception:  # noqa: BLE001
                logger.exception("health check failed")


async def check_eviction_policy(client: aioredis.Redis, idle_ttl_s: float) -> None:
    """Refuse a Redis whose ``maxmemory-policy`` could evict session state: ``allkeys-*``, or
    ``volatile-*`` while sessions carry an idle TTL. Warns when the policy cannot be read
    (CONFIG disabled, as on some managed Redis) or Redis is unreachable."""
    try:
        reply = await client.config_get("maxmemory-policy")
    except rex.ResponseError as e:
        logger.warning("cannot read Redis' maxmemory-policy (%s); make sure it never evicts session state "
                       "(noeviction)", e)
        return
    except REDIS_UNAVAILABLE as e:
        logger.warning("cannot read Redis' maxmemory-policy now (%s); make sure it is noeviction", e)
        return
    per_node = reply.values() if reply and all(isinstance(v, dict) for v in reply.values()) else [reply]
    for config in per_node:
        policy = {_text(k): _text(v) for k, v in config.items()}.get("maxmemory-policy", "")
        if policy.startswith("allkeys-") or (policy.startswith("volatile-") and idle_ttl_s > 0):
            why = "any key" if policy.startswith("allkeys-") else \
                f"keys with a TTL, and sessions carry one (idle_session_ttl_s={idle_ttl_s:g})"
            raise ConfigError(
                f"Redis' maxmemory-policy is {policy}, which evicts {why}: session state would be lost. Set "
                "maxmemory-policy noeviction on the Redis that holds sessions (CONFIG SET maxmemory-policy "
                "noeviction, or a Redis of its own for sessions)"
                + (", or idle_session_ttl_s=0" if policy.startswith("volatile-") else ""))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
