"""Two `kvstore serve --shared-workers` replicas on one Ray cluster (`ray start`), one session
Redis and one block store, as behind a load balancer: a conversation alternating between
them keeps its T0 hits on one worker with the outputs of a recomputation, a replica routes by
blocks the other's requests stored, and killing a replica mid-turn loses nothing: the workers
live on, and the retried turn is recorded once."""
from __future__ import annotations

import secrets
import signal
import time

import pytest
from raycluster import ray_cluster
from serveprocess import start_serve, stop_serve

from kvstore.client import SessionClient
from kvstore.v1 import session_pb2 as pb
from services.blockstore.server import ENV_PREFIX as BLOCKSTORE_ENV
from services.blockstore.server import start_blockstore_process
from services.common.auth import ANY_NAMESPACE
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig

pytestmark = pytest.mark.slow

SYSTEM = "You are a planner. " * 12  # a few blocks of shared prefix
SAMPLING = {"max_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The pieces the replicas share: a Ray cluster, a session Redis, a block Redis and a block store.
    Yields the environment a replica needs (with its secrets: never on a command line)."""
    sessions = EmbeddedRedis(EmbeddedRedisConfig(maxmemory_policy="noeviction", appendonly=True,
                                                 password=secrets.token_urlsafe(16))).start()
    blocks = EmbeddedRedis(EmbeddedRedisConfig(password=secrets.token_urlsafe(16))).start()
    token = secrets.token_urlsafe(16)
    store, store_address = start_blockstore_process(blocks.url, env={BLOCKSTORE_ENV + "TOKENS": f"{token}={ANY_NAMESPACE}"})
    try:
        with ray_cluster(head_cpus=2) as (address, env):
            yield {**env, "KVSTORE_SERVE_RAY_ADDRESS": address, "KVSTORE_SERVE_REDIS_URL": sessions.url,
                   "KVSTORE_SERVE_BLOCKSTORE_ADDRESS": store_address, "KVSTORE_SERVE_BLOCKSTORE_TOKEN": token,
                   "KVSTORE_SERVE_SHARED_WORKERS": "true"}
    finally:
        store.terminate()
        store.wait(30)
        blocks.stop()
        sessions.stop()


def _replica(tmp_path, name: str, env: dict[str, str]):
    # Configured by the environment, as in a container; the same flags for every replica.
    (tmp_path / name).mkdir()
    return start_serve(tmp_path / name, "--workers", "2", env=env)


def _turn(kv: SessionClient, session_id: str, text: str, **kw):
    return kv.generate(session_id, messages=[{"role": "user", "content": text}], **SAMPLING, **kw).result()


def _held_in_t0(kv: SessionClient) -> set[tuple[str, tuple[int, ...]]]:
    """(worker, a block's tokens) of every block in T0, from the snapshot a new subscriber gets."""
    stream = kv.subscribe_kv_events()
    held = set()
    try:
        for _, batch in zip(range(2), stream):  # a snapshot batch per worker holding blocks
            assert batch.snapshot
            held |= {(e.worker_id, tuple(e.token_ids)) for e in batch.events if e.medium == pb.MEDIUM_T0}
    finally:
        stream.cancel()
    return held


def test_replicas_share_workers_routing_and_sessions_and_one_can_die(shared, tmp_path):
    a = _replica(tmp_path, "a", shared)
    b = _replica(tmp_path, "b", shared)
    try:
        with SessionClient(a.address) as ka, SessionClient(b.address) as kb:
            sid = ka.create_session(system_prompt=SYSTEM).session_id
            ref = ka.create_session(system_prompt=SYSTEM).session_id  # the same turns, recomputed
            worker, length = None, 0
            for i, kv in enumerate([ka, kb, ka, kb]):
                g = _turn(kv, sid, f"step {i}: what next?")
                r = _turn(ka, ref, f"step {i}: what next?", skip_cache=True)
                assert g.ids == r.ids, i  # reuse from whichever replica gives what recomputing gives
                u = g.usage
                if worker is not None:
                    # The other replica's turn left the session's KV on one worker: this one goes
                    # there and reuses it from T0 (every full block of the history before this turn).
                    assert u.worker_id == worker, (i, u)
                    assert u.cached_tokens_t0 >= length // 16 * 16 - 16, (i, u, length)
                worker, length = u.worker_id, u.num_tokens
            # Blocks that A's requests stored, on either worker, are in B's picture too: each
            # replica reads every worker's block events with its own cursor.
            placed = {}
            for worker_id in ("w0", "w1"):
                session = ka.create_session(system_prompt=f"What only {worker_id} holds. " * 8).session_id
                _turn(ka, session, "go", worker_id=worker_id)
                tokens = list(ka.get_session(session, include_tokens=True).token_ids)
                placed[worker_id] = tuple(tokens[64:80])  # its 5th block: no other session has it
            time.sleep(0.5)  # B polls the workers every 100 ms
            assert _held_in_t0(kb) >= {(w, t) for w, t in placed.items()}

            # A dies in the middle of a turn; its client retries on B with the same request id.
            stream = ka.generate(sid, messages=[{"role": "user", "content": "a long answer"}], max_tokens=400,
                                 ignore_eos=True, request_id="turn-5")
            next(iter(stream))
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(30)
            start = time.monotonic()
            retried = kb.generate(sid, messages=[{"role": "user", "content": "a long answer"}], max_tokens=400,
                                  ignore_eos=True, request_id="turn-5").result()
            assert time.monotonic() - start < 60
            assert len(retried.ids) == 400 and retried.usage.num_tokens > length + 400
            again = kb.generate(sid, messages=[{"role": "user", "content": "a long answer"}], max_tokens=400,
                                ignore_eos=True, request_id="turn-5").result()
            assert again.ids == retried.ids and again.usage.num_tokens == retried.usage.num_tokens  # recorded once
            assert kb.get_session(sid).num_tokens == retried.usage.num_tokens
            # The workers outlived A (detached): both still serve B, with what they cached.
            assert sorted((w.worker_id, w.alive) for w in kb.get_stats().workers) == [("w0", True), ("w1", True)]
            last = _turn(kb, sid, "and then?")
            assert last.usage.cached_tokens_t0 + last.usage.cached_tokens_t1 >= retried.usage.num_tokens // 16 * 16 - 16
    finally:
        if a.proc.poll() is None:
            stop_serve(a)
        stop_serve(b)  # leaves the shared workers running: stopping the cluster ends them
