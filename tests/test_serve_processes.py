"""`kvstore serve` as a real process tree (Redis x2, block store, Ray, session service): what
a local process without its secrets can reach, where it listens, and how it recovers when its
own processes die. Two `kvstore serve` runs for the whole module (each ~10 s to start)."""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2
from redis.backoff import NoBackoff
from redis.retry import Retry
from serveprocess import start_serve, stop_serve

from kvstore.client import SessionAPIError, SessionClient
from kvstore.v1 import blockstore_pb2 as bpb
from kvstore.v1 import blockstore_pb2_grpc as bpb_grpc
from services.common.embedded_redis import find_redis_binary

PROMPT = list(range(1, 41))  # two full 16-token blocks reach the block store
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Listener:
    pid: int
    name: str
    host: str
    port: int


def _environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)


def listeners(pids) -> list[Listener]:
    """TCP listeners of these processes, from `ss -ltnp`."""
    assert shutil.which("ss"), "the test needs `ss` (iproute2)"
    found = []
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines():
        local = line.split()[3]
        host, port = local.rsplit(":", 1)
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                found.append(Listener(int(pid), name, host.strip("[]"), int(port)))
    return found


def loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # "*": every address
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
    return value


# ---- a default `kvstore serve` (no API keys: loopback only) ---------------------------------

@pytest.fixture(scope="module")
def open_serve(tmp_path_factory):
    served = start_serve(tmp_path_factory.mktemp("open"))
    yield served
    stop_serve(served)


def test_no_process_of_serve_listens_beyond_loopback(open_serve):
    tree = open_serve.tree()
    found = listeners(set(tree))
    beyond = [(listener, tree[listener.pid][:120]) for listener in found if not loopback(listener.host)]
    assert not beyond, beyond
    names = [listener.name for listener in found]
    # All of them were seen: the session service and block store (python), both Redis, Ray's own.
    assert names.count("redis-server") == 2 and {"python", "gcs_server", "raylet"} <= set(names), found


def test_session_redis_killed_mid_workload_loses_no_acknowledged_turn(open_serve):
    """Four sessions take turns (appends, some generations), each retried with its request id
    until acknowledged; Redis is killed -9 in the middle and comes back by itself."""
    with SessionClient(open_serve.address, timeout_s=30) as kv:
        sessions = [kv.create_session(system_prompt=f"agent {i}").session_id for i in range(4)]
    acked: dict[str, list[tuple[int, list[int]]]] = {s: [] for s in sessions}  # (history length, tokens)
    after_kill: dict[str, int] = dict.fromkeys(sessions, 0)
    killed, stop, errors = threading.Event(), threading.Event(), []

    def acknowledged(call) -> int:
        deadline = time.monotonic() + 90
        while True:
            try:
                return call()
            except SessionAPIError as e:  # Redis away: UNAVAILABLE; retried with the same id
                assert e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
                assert time.monotonic() < deadline, f"no recovery: {e}"
                time.sleep(0.05)

    def agent(i: int, session: str) -> None:
        try:
            with SessionClient(open_serve.address, timeout_s=30) as kv:
                for turn in range(10_000):
                    if stop.is_set():
                        return
                    rid, tokens = uuid.uuid4().hex, [turn % 200 + 1, i + 1]
                    if turn % 4 == 3:
                        acknowledged(lambda t=tokens, r=rid: kv.generate(
                            session, tokens=t, max_tokens=2, ignore_eos=True, request_id=r).result())
                    else:
                        n = acknowledged(lambda t=tokens, r=rid: kv.append(session, tokens=t, request_id=r))
                        acked[session].append((n, tokens))
                    if killed.is_set():
                        after_kill[session] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(i, s)) for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(len(a) >= 3 for a in acked.values()) or errors, 60, "turns before the kill")
        old = open_serve.session_redis()
        os.kill(old, signal.SIGKILL)
        killed.set()
        wait_for(lambda: all(n >= 4 for n in after_kill.values()) or errors, 90, "turns after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert open_serve.session_redis() != old and "session Redis restarted" in open_serve.log.read_text()
    with SessionClient(open_serve.address, timeout_s=30) as kv:
        for session, turns in acked.items():
            history = list(kv.get_session(session, include_tokens=True).token_ids)
            for n, tokens in turns:  # each acknowledged append, once, where it was acknowledged
                assert history[n - len(tokens):n] == tokens, (session, n, tokens)
            assert len(history) >= turns[-1][0]
            kv.generate(session, tokens=[7, 8], max_tokens=2).result()  # and the session goes on


def test_block_store_and_its_redis_killed_come_back_and_health_follows(open_serve):
    with SessionClient(open_serve.address, timeout_s=30) as kv:
        session = kv.create_session().session_id
        kv.generate(session, tokens=PROMPT, max_tokens=2, ignore_eos=True).result()
        assert open_serve.health() == SERVING
        port = open_serve.blockstore.rsplit(":", 1)[1]
        for name, pid_of in (("block store", open_serve.blockstore_pid), ("block Redis", open_serve.blocks_redis)):
            old = pid_of()
            os.kill(old, signal.SIGKILL)
            kv.generate(session, tokens=[9, 10], max_tokens=2).result()  # the cold tier is optional to a turn
            if name == "block store":  # (a Redis is back within the health check's period)
                wait_for(lambda: open_serve.health() == NOT_SERVING, 20, f"NOT_SERVING without the {name}")
            wait_for(lambda n=name: f"{n} restarted" in open_serve.log.read_text(), 60, f"the {name} restarted")
            wait_for(lambda: open_serve.health() == SERVING, 30, f"SERVING again after the {name} restarted")
            assert pid_of() != old
            kv.generate(session, tokens=[11, 12], max_tokens=2).result()
        assert any(listener.port == int(port) for listener in listeners({open_serve.blockstore_pid()}))


# ---- `kvstore serve` with API keys from a file and the environment -------------------------

KEY_FILE_PLAIN, KEY_FILE_HASHED, KEY_ENV = "key-from-file-4a1b", "key-hashed-7c2d", "key-from-env-9e3f"


@pytest.fixture(scope="module")
def keyed_serve(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keyed")
    keys = tmp / "keys"
    keys.write_text(f"{KEY_FILE_PLAIN}=tenant-a\nsha256:{hashlib.sha256(KEY_FILE_HASHED.encode()).hexdigest()}=tenant-b\n")
    served = start_serve(tmp, "--api-keys-file", str(keys), api_keys=f"{KEY_ENV}=tenant-c")
    yield served
    stop_serve(served)


def test_api_keys_from_a_file_or_the_environment_work_and_reach_no_command_line(keyed_serve):
    for key, namespace in ((KEY_FILE_PLAIN, "tenant-a"), (KEY_FILE_HASHED, "tenant-b"), (KEY_ENV, "tenant-c")):
        with SessionClient(keyed_serve.address, api_key=key) as kv:
            assert kv.create_session().namespace == namespace
    for wrong in ("", "nope", "sha256:" + hashlib.sha256(KEY_FILE_HASHED.encode()).hexdigest()):
        with SessionClient(keyed_serve.address, api_key=wrong) as kv, pytest.raises(SessionAPIError) as e:
            kv.create_session()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    tree = keyed_serve.tree()
    assert len(tree) > 5  # serve, two Redis, the block store, Ray's processes and workers
    for pid, cmdline in tree.items():
        assert not any(key in cmdline for key in (KEY_FILE_PLAIN, KEY_FILE_HASHED, KEY_ENV)), cmdline
        if pid != keyed_serve.proc.pid:
            assert KEY_ENV not in str(_environ(pid)), f"{cmdline[:100]} inherited the keys"


def test_a_local_process_without_the_secrets_reaches_neither_redis_nor_the_block_store(keyed_serve):
    with SessionClient(keyed_serve.address, api_key=KEY_FILE_PLAIN) as kv:
        session = kv.create_session(system_prompt="secret plans").session_id
        kv.generate(session, tokens=PROMPT, max_tokens=2, ignore_eos=True).result()
    # What serve gave its block store: the Redis password and the token, in its environment only.
    secrets = _environ(keyed_serve.blockstore_pid())
    blocks_url, token = secrets["KVSTORE_BLOCKSTORE_REDIS_URL"], secrets["KVSTORE_BLOCKSTORE_TOKENS"].split("=")[0]
    assert urlsplit(blocks_url).password and token
    for cmdline in keyed_serve.tree().values():
        assert urlsplit(blocks_url).password not in cmdline and token not in cmdline
    wait_for(lambda: redis.Redis.from_url(blocks_url).dbsize() > 0, 10, "blocks in the block Redis")

    once = {"retry": Retry(NoBackoff(), 0), "socket_timeout": 5}  # redis-py retries auth errors for seconds
    for pid in (keyed_serve.session_redis(), keyed_serve.blocks_redis()):
        (port,) = {listener.port for listener in listeners({pid})}
        for client in (redis.Redis(port=port, **once), redis.Redis(port=port, password="guess", **once)):
            for command in (lambda c: c.keys("*"), lambda c: c.get("x"), lambda c: c.set("x", b"poison"),
                            lambda c: c.config_set("requirepass", "")):
                with pytest.raises(redis.AuthenticationError):
                    command(client)
        cli = subprocess.run([find_redis_binary("redis-cli"), "-p", str(port), "KEYS", "*"],
                             capture_output=True, text=True, timeout=10, check=False)
        assert "NOAUTH" in cli.stdout + cli.stderr

    hashes = [bytes(16)]
    with grpc.insecure_channel(keyed_serve.blockstore) as channel:
        stub = bpb_grpc.BlockStoreStub(channel)
        calls = {
            "Lookup": lambda md: stub.Lookup(bpb.LookupRequest(namespace="tenant-a", hashes=hashes), metadata=md),
            "Get": lambda md: list(stub.Get(bpb.GetRequest(namespace="tenant-a", hashes=hashes), metadata=md)),
            "Put": lambda md: stub.Put(bpb.PutRequest(namespace="tenant-a", blocks=[
                bpb.Block(hash=hashes[0], data=b"poison")]), metadata=md),
            "Delete": lambda md: stub.Delete(bpb.DeleteRequest(namespace="tenant-a", hashes=hashes), metadata=md),
            "Stats": lambda md: stub.Stats(bpb.StatsRequest(), metadata=md),
        }
        for metadata in ((), (("authorization", "Bearer guess"),), (("authorization", f"Bearer {KEY_FILE_PLAIN}"),)):
            for method, call in calls.items():
                with pytest.raises(grpc.RpcError) as e:
                    call(metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, metadata)
        assert stub.Stats(bpb.StatsRequest(), metadata=(("authorization", f"Bearer {token}"),)).redis_keys > 0
