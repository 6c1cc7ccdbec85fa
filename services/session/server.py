"""The session service's gRPC server: Sessions API, health (SERVING while Redis answers and a
worker is live), reflection, Prometheus metrics, graceful shutdown.

The worker pool and tokenizer are passed in: ``kvstore serve`` (services/cli/serve.py) builds
them, and tests restart a server over the same pool to show that sessions live in Redis.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio.cluster import RedisCluster

from kvstore.blockstore_client import BlockStoreClient, BlockStoreClientConfig
from kvstore.v1 import session_pb2_grpc as pb_grpc
from services.common.auth import TokenTable
from services.common.errors import ConfigError
from services.common.grpc_server import MetricsEndpoint, bind
from services.common.net import host_port, is_loopback
from services.session.metrics import SessionMetrics
from services.session.pool import WorkerPool
from services.session.service import SERVICE_NAME, SessionServicer
from services.session.state import SessionStore
from workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
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
    max_message_bytes: int = 64 << 20
    max_tokens: int = 4096  # per Generate
    default_max_tokens: int = 64
    max_input_tokens: int = 32768
    max_concurrent_generations: int = 64
    # The block store, for Pin (keeps a pinned session's blocks in the cold tier); empty: none.
    blockstore_address: str = ""
    blockstore_token: str = ""



def validate_config(config: SessionServiceConfig) -> TokenTable:
    for name in ("max_tokens", "default_max_tokens", "max_input_tokens", "max_concurrent_generations",
                 "max_message_bytes"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")
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
        self._healthy: bool | None = None
        self._metrics_http = None

    @property
    def address(self) -> str:
        return host_port(self.config.host, self.port)

    async def start(self) -> int:
        cfg = self.config
        try:
            self._redis = (RedisCluster.from_url(cfg.redis_url) if cfg.redis_cluster
                           else aioredis.Redis.from_url(cfg.redis_url, socket_timeout=5, socket_connect_timeout=2))
            if cfg.blockstore_address:
                self._blockstore = BlockStoreClient(BlockStoreClientConfig(
                    address=cfg.blockstore_address, token=cfg.blockstore_token))
            self._servicer = servicer = SessionServicer(SessionStore(self._redis), self.pool, self.tokenizer,
                                                        self._keys, self.metrics, cfg, self._blockstore)
            self._server = grpc.aio.server(options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ])
            pb_grpc.add_SessionsServicer_to_server(servicer, self._server)
            self._health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                                self._server)
            self.port = bind(self._server, cfg.host, cfg.port, cfg.tls_cert, cfg.tls_key)
            if cfg.metrics_port:
                self._metrics_http = MetricsEndpoint(cfg.host, cfg.metrics_port, self.metrics.registry)
            await self._check()
            await self._server.start()
            self._health_task = asyncio.create_task(self._health_loop(), name="session-health")
        except BaseException:
            await self.stop(grace=0)
            raise
        logger.info("session service on %s (auth %s)", self.address, "on" if self._keys.enabled else "off")
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones (then the work they left
        running, such as re-pins) finish within ``grace`` each."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        grace = self.config.grace_seconds if grace is None else grace
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
        if self._metrics_http is not None:
            await self._metrics_http.stop()
            self._metrics_http = None
        if self._redis is not None:
            await self._redis.aclose()
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

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await self._check()
            except Exception:  # noqa: BLE001
                logger.exception("health check failed")
