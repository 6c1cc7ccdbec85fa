"""A Ray cluster started with `ray start` for tests: a token-authenticated head (and optional
worker nodes) in a short temporary directory, stopped with its processes."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from serveprocess import ROOT

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(env: dict[str, str], *flags: str) -> subprocess.Popen:
    """``ray start --block``: its Ray processes end with it (``ray stop`` would end every Ray here)."""
    proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *flags], env=env,
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


@contextlib.contextmanager
def ray_cluster(head_cpus: int = 1, worker_nodes: int = 0) -> Iterator[tuple[str, dict[str, str]]]:
    """Yields (the head's address, the environment that holds the cluster's token). Stopping the
    head ends every actor on it, detached ones included."""
    tmp = Path(tempfile.mkdtemp(prefix="kvray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(tmp / "home"), RAY_TMPDIR=str(tmp))
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    address = f"127.0.0.1:{free_port()}"
    nodes = [_ray_start(env, "--head", "--num-cpus", str(head_cpus), "--port", address.rsplit(":", 1)[1],
                        "--node-ip-address", "127.0.0.1", "--include-dashboard=false")]
    try:
        for _ in range(worker_nodes):  # Ray asks RAY_AUTH_MODE of a worker node
            nodes.append(_ray_start({**env, "RAY_AUTH_MODE": "token"}, "--num-cpus", "1", "--address", address))
        yield address, env
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(tmp, ignore_errors=True)
