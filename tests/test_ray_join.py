"""`kvstore serve --ray-address` joins a Ray cluster started with `ray start`: a head and a
worker node (two raylets on this machine) with Ray's token authentication on, as `ray start`
turns it on when a token exists. Serve finds the token where Ray keeps it, with RAY_AUTH_MODE
unset; without the token it exits with a message saying what to give it."""
from __future__ import annotations

import subprocess
import sys

import pytest
from raycluster import ray_cluster
from serveprocess import ROOT, start_serve, stop_serve

from kvstore.client import SessionClient


@pytest.fixture(scope="module")
def cluster():
    """A token-authenticated two-node cluster; yields (its address, the environment that holds its token)."""
    with ray_cluster(head_cpus=1, worker_nodes=1) as found:
        yield found


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
