"""`kvstore serve --ray-address` joins a Ray cluster started with `ray start`: a head and a
worker node (two raylets on this machine) with Ray's token authentication on, as `ray start`
turns it on when a token exists. Serve finds the token where Ray keeps it, with RAY_AUTH_MODE
unset; without the token it exits with a message saying what to give it."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from serveprocess import ROOT, start_serve, stop_serve

from kvstore.client import SessionClient

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(env: dict[str, str], *flags: str) -> subprocess.Popen:
    """``ray start --block``: its Ray processes end with it (``ray stop`` would end every Ray here)."""
    proc = subprocess.Popen([RAY, "start", "--block", "--num-cpus", "1", "--disable-usage-stats", *flags], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "block forever" in line:
            return proc
    proc.wait()
    raise AssertionError("ray start failed:\n" + "".join(lines[-30:]))


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def cluster():
    """A token-authenticated two-node cluster; yields (its address, the environment that holds its token)."""
    tmp = Path(tempfile.mkdtemp(prefix="kvray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(tmp / "home"), RAY_TMPDIR=str(tmp))
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    address = f"127.0.0.1:{_free_port()}"
    head = _ray_start(env, "--head", "--port", address.rsplit(":", 1)[1], "--node-ip-address", "127.0.0.1",
                      "--include-dashboard=false")
    try:
        worker = _ray_start({**env, "RAY_AUTH_MODE": "token"}, "--address", address)  # Ray asks it of a worker node
        try:
            yield address, env
        finally:
            _stop(worker)
    finally:
        _stop(head)
        shutil.rmtree(tmp, ignore_errors=True)


def test_serve_joins_a_ray_start_cluster_with_its_token(cluster, tmp_path):
    address, env = cluster
    served = start_serve(tmp_path, "--ray-address", address, "--workers", "2", env=env)
    try:
        with SessionClient(served.address) as kv:
            sid = kv.create_session(system_prompt="a cluster of two nodes").session_id
            fork = kv.fork(sid).session_id
            a = kv.generate(sid, tokens=[1, 2, 3], max_tokens=6, ignore_eos=True, worker_id="w0").result()
            b = kv.generate(fork, tokens=[1, 2, 3], max_tokens=6, ignore_eos=True, worker_id="w1",
                            skip_cache=True).result()
    finally:
        stop_serve(served)
    assert (a.usage.worker_id, b.usage.worker_id) == ("w0", "w1")
    assert a.ids == b.ids and len(a.ids) == 6


def test_serve_without_the_token_says_what_to_give_it(cluster, tmp_path):
    address, env = cluster
    r = subprocess.run([sys.executable, "-m", "services.cli.main", "serve", "--ray-address", address, "--model", "tiny",
                        "--workers", "1", "--port", "0", "--data-dir", str(tmp_path / "data")],
                       env={**env, "HOME": str(tmp_path)}, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "refused this process's credentials" in r.stderr and "RAY_AUTH_MODE=token" in r.stderr, r.stderr[-2000:]
