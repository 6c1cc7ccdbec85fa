"""Admin calls against a real `kvstore serve` (3 workers, Ray, Redis, the block store):
flushing a namespace's blocks from every tier, draining workers, and who may do either."""
import re
import threading

import grpc
import pytest
from serveprocess import start_serve, stop_serve
from servicehelpers import wait_for
from test_cli import cli

from kvstore.client import SessionAPIError, SessionClient

KEYS = "sk-admin=*;sk-a=tenant-a;sk-b=tenant-b"
PROMPT = "Shared instructions that both tenants send, long enough for many blocks. " * 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = start_serve(tmp_path_factory.mktemp("admin"), "--workers", "3", api_keys=KEYS, always_load=True)
    yield served
    stop_serve(served)


def client(served, key: str) -> SessionClient:
    return SessionClient(served.address, api_key=key)


def turn(kv: SessionClient, worker: str, max_tokens: int = 1):
    session = kv.create_session(system_prompt=PROMPT).session_id
    return kv.generate(session, tokens=[1], max_tokens=max_tokens, ignore_eos=True, worker_id=worker).result()


def test_admin_calls_need_an_admin_key(served):
    with client(served, "sk-a") as tenant:
        for call in (lambda: tenant.flush_namespace("tenant-b"), lambda: tenant.drain_worker("w1")):
            with pytest.raises(SessionAPIError) as e:
                call()
            assert e.value.code is grpc.StatusCode.PERMISSION_DENIED and "admin API key" in e.value.message
    refused = cli("admin", "flush", "tenant-b", "--address", served.address, "--api-key", "sk-a")
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    with client(served, "sk-admin") as admin:
        with pytest.raises(SessionAPIError) as e:
            admin.drain_worker("w9")
        assert e.value.code is grpc.StatusCode.NOT_FOUND and "w0, w1, w2" in e.value.message
        with pytest.raises(SessionAPIError) as e:
            admin.flush_namespace("bad namespace!")
        assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_flush_forgets_a_namespace_in_every_tier_and_only_that_one(served):
    with client(served, "sk-a") as a, client(served, "sk-b") as b, client(served, "sk-admin") as admin:
        stored = admin.get_stats().blocks_stored
        turn(a, "w0")
        turn(b, "w0")
        blocks = len(PROMPT) // 16
        assert wait_for(lambda: admin.get_stats().blocks_stored >= stored + 2 * blocks, 30)
        assert turn(a, "w1").usage.cached_tokens_t2 >= (blocks - 1) * 16  # tenant-a's blocks on a second worker
        flushed = cli("admin", "flush", "tenant-a", "--address", served.address, "--api-key", "sk-admin")
        assert flushed.returncode == 0, flushed.stderr
        t0, t1, t2 = (int(re.search(rf"(\d+) {t}\b", flushed.stdout)[1]) for t in ("T0", "T1", "T2"))
        assert t0 >= 2 * (blocks - 1) and t2 >= blocks - 1, flushed.stdout  # on w0 and w1; in T2 once
        usage = turn(a, "w2").usage  # T2 no longer has them (w2 never held them itself)
        assert (usage.cached_tokens_t0, usage.cached_tokens_t1, usage.cached_tokens_t2) == (0, 0, 0), usage
        for worker in ("w0", "w1"):  # nor do the workers that did; what they find now is what w2 just stored
            usage = turn(a, worker).usage
            assert (usage.cached_tokens_t0, usage.cached_tokens_t1) == (0, 0) and usage.cached_tokens_t2, usage
        assert turn(b, "w0").usage.cached_tokens_t0 >= (blocks - 1) * 16  # tenant-b keeps its blocks
        assert turn(b, "w2").usage.cached_tokens_t2 >= (blocks - 1) * 16


def test_drain_moves_what_outlasts_its_deadline_and_finishes_the_rest(served):
    """w2 is drained with a deadline shorter than its generation: the generation resumes on
    another worker with the same tokens. w1 is drained with time to spare: its generation
    finishes there. The last worker cannot be drained."""
    with client(served, "sk-a") as a, client(served, "sk-admin") as admin:
        reference = turn(a, "w0", max_tokens=1500).ids
        for worker, deadline, moved in (("w2", 0.2, 1), ("w1", 120.0, 0)):
            session = a.create_session(system_prompt=PROMPT).session_id
            gen = a.generate(session, tokens=[1], max_tokens=1500, ignore_eos=True, worker_id=worker)
            chunks = iter(gen)
            next(chunks)  # it is running on the worker
            drained: list = []
            drainer = threading.Thread(target=lambda w=worker, d=deadline: drained.append(admin.drain_worker(w, d)))
            drainer.start()
            for _ in chunks:
                pass
            drainer.join(timeout=180)
            assert gen.ids == reference
            assert drained and drained[0].worker_id == worker and drained[0].moved_generations == moved, drained
            assert (gen.usage.worker_id != worker) == bool(moved), gen.usage
            assert worker not in {w.worker_id for w in admin.get_stats().workers}
            assert turn(a, "").usage.worker_id != worker  # nothing new goes to a drained worker
            with pytest.raises(SessionAPIError) as e:  # not even when asked for: it is gone
                turn(a, worker)
            assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert f"unknown worker_id '{worker}'" in e.value.message
        with pytest.raises(SessionAPIError) as e:
            admin.drain_worker("w0")
        assert e.value.code is grpc.StatusCode.FAILED_PRECONDITION and "last live worker" in e.value.message
