"""Router decisions from block events: longest prefix (T0 over T1), load, stickiness, failover;
and the pool's failover over fake worker handles."""
import asyncio
from types import SimpleNamespace

import pytest
from ray.exceptions import RayActorError

from kvstore.cache import BlockEvent, Tier
from services.session.pool import PoolConfig, WorkerPool, _Worker
from services.session.router import NoWorkerError, Router
from workers.actor import GenerateEnd, GenerateRequest, WorkerInfo
from workers.engine import FinishReason, Usage
from workers.sampling import SamplingParams

H = [bytes([i]) * 16 for i in range(10)]


def stored(tier, hashes):
    return [BlockEvent(Tier(tier), True, h) for h in hashes]


def router(*workers, max_seqs: int = 16):
    r = Router()
    for w in workers:
        r.add_worker(w, max_seqs)
    return r


def test_longest_cached_prefix_wins_and_t0_outweighs_t1():
    r = router("a", "b", "c")
    r.apply_events("a", stored(0, H[:3]))
    r.apply_events("b", stored(0, H[:5]))
    r.apply_events("c", stored(1, H[:6]))  # longer, but only in host memory
    # Blocks another worker holds count at the T2 weight: a 3 + 3 x 0.8, b 5 + 0.8, c 6 x 0.9.
    assert [r.prefix_score(w, H[:8]) for w in "abc"] == pytest.approx([5.4, 5.8, 5.4])
    assert r.choose(H[:8]) == "b"
    r.apply_events("b", [BlockEvent(Tier.T0, False, H[1])])  # evicted: b's local prefix now ends after block 0
    assert r.prefix_score("b", H[:8]) == pytest.approx(1 + 5 * 0.8)
    r.apply_events("a", stored(0, H[3:4]))  # a: 4 + 2 x 0.8 = 5.6 > c's 5.4
    assert r.choose(H[:8]) == "a"
    assert r.prefix_score("a", [H[0], H[9], H[1]]) == 1.0  # a block nobody holds ends the prefix


def test_a_loaded_worker_hands_a_shared_prefix_to_an_idle_one_through_t2():
    r = router("a", "b")
    r.apply_events("a", stored(0, H[:10]))  # a holds a long shared prefix; b could fetch it from T2
    assert r.choose(H[:10]) == "a"
    r.started("a")
    assert r.choose(H[:10]) == "b"  # 10 - 4 (one queued) < 10 x 0.8


def test_load_spreads_requests_without_a_cached_prefix():
    r = router("a", "b")
    first = r.choose([H[9]])
    r.started(first)
    second = r.choose([H[9]])
    assert {first, second} == {"a", "b"}
    r.started(second)
    r.finished(first)
    assert r.choose([H[9]]) == first


def test_ties_go_round_robin_when_requests_come_one_at_a_time():
    r = router("a", "b", "c")
    picks = []
    for i in range(6):  # each finishes before the next arrives: no load to tell them apart
        w = r.choose([H[i]])
        r.started(w)
        r.finished(w)
        picks.append(w)
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]
    r.apply_events("c", stored(0, H[:1]))
    assert r.choose(H[:2]) == "c"  # a cached prefix still wins over the rotation


def test_a_queue_outweighs_a_short_prefix():
    r = router("a", "b")
    r.apply_events("a", stored(0, H[:2]))
    for _ in range(3):
        r.started("a")
    assert r.choose(H[:4]) == "b"  # 2 blocks cached < 3 queued requests x 4


def test_sessions_stick_and_move_when_their_worker_dies():
    r = router("a", "b")
    r.apply_events("a", stored(0, H[:4]))
    assert r.choose(H[:4], session_id="s1") == "a"
    r.apply_events("b", stored(0, H[:8]))
    assert r.choose(H[:8], session_id="s1") == "a"  # sticky, even though b holds more now
    assert r.remove_worker("a") == ["s1"]
    assert r.choose(H[:8], session_id="s1") == "b"
    r.remove_worker("b")
    with pytest.raises(NoWorkerError):
        r.choose(H[:1])


def test_restart_clears_stale_index():
    r = router("a", "b")
    r.apply_events("a", stored(0, H[:6]))
    r.choose(H[:6], session_id="s")
    r.reset_worker("a")
    assert r.prefix_score("a", H[:6]) == 0 and r.workers == ["a", "b"]
    r.apply_events("zombie", stored(0, H[:6]))  # events of an unknown worker are ignored
    assert "zombie" not in r.workers


def test_forget_drops_a_sessions_affinity():
    r = router("a", "b")
    r.apply_events("a", stored(0, H[:4]))
    assert r.choose(H[:4], session_id="s1") == "a"
    r.forget("s1")
    r.forget("never-seen")  # unknown ids are a no-op
    r.apply_events("b", stored(0, H[:8]))
    assert r.choose(H[:8], session_id="s1") == "b"  # routed by prefix again, not stuck to a
    assert r.remove_worker("a") == []


# ---- WorkerPool over fake worker handles (no Ray) ----------------------------------------------


class FakeWorker:
    """A ``DecodeWorker`` handle: ``generate`` streams ``tokens`` (up to max_tokens), then its
    final record, or dies (``RayActorError``) before it when ``dies``."""

    def __init__(self, worker_id: str, tokens: list[int], dies: bool = False) -> None:
        self.worker_id, self.tokens, self.dies = worker_id, tokens, dies
        self.calls: list[GenerateRequest] = []
        self.generate = SimpleNamespace(remote=self._generate)

    def _generate(self, request: GenerateRequest):
        self.calls.append(request)

        async def stream():
            for t in self.tokens[:request.sampling.max_tokens]:
                yield asyncio.sleep(0, t)  # an awaitable, like an ObjectRef
            if self.dies:
                raise RayActorError()
            usage = Usage(len(request.prompt), cached_tokens=[8, 0, 0])
            yield asyncio.sleep(0, GenerateEnd(FinishReason.LENGTH, self.worker_id, usage))

        return stream()


def fake_pool(*workers: FakeWorker) -> WorkerPool:
    pool = WorkerPool(PoolConfig(num_workers=len(workers)))
    pool.info = WorkerInfo("w0", "1", "m", b"f" * 16, 4, 512, 1024, (), 16)
    for w in workers:
        pool._workers[w.worker_id] = _Worker(w.worker_id, w, max_seqs=16, live=True)
        pool.router.add_worker(w.worker_id, 16)
    return pool


def run_generate(pool: WorkerPool, prompt: list[int], max_tokens: int, **kw) -> tuple[list[int], GenerateEnd]:
    async def collect():
        request = GenerateRequest(prompt, SamplingParams(max_tokens=max_tokens))
        items = [item async for item in pool.generate(request, **kw)]
        return items[:-1], items[-1]

    return asyncio.run(collect())


def test_a_generation_resumes_on_another_worker_from_the_streamed_tokens():
    w0, w1 = FakeWorker("w0", [10, 11, 12], dies=True), FakeWorker("w1", [13, 14, 15, 16])
    tokens, done = run_generate(fake_pool(w0, w1), [1, 2, 3], 6, worker_id="w0")
    assert tokens == [10, 11, 12, 13, 14, 15]
    assert w1.calls == [GenerateRequest([1, 2, 3, 10, 11, 12], SamplingParams(max_tokens=3))]
    assert (done.finish_reason, done.worker_id, done.usage.cached_tokens, done.failovers) == ("length", "w1", [8, 0, 0], 1)


def test_a_worker_dying_after_the_last_token_ends_the_generation_without_a_retry():
    w0, w1 = FakeWorker("w0", [10, 11, 12, 13], dies=True), FakeWorker("w1", [99])
    pool = fake_pool(w0, w1)
    tokens, done = run_generate(pool, [1, 2, 3], 4, worker_id="w0", session_id="s")
    assert tokens == [10, 11, 12, 13] and w1.calls == []
    assert (done.finish_reason, done.worker_id, done.usage.cached_tokens, done.failovers) == ("length", "w0", [0, 0, 0], 1)
    assert pool.live_worker_ids == ["w1"]


def test_pool_forget_drops_the_routers_affinity():
    pool = fake_pool(FakeWorker("w0", [5]), FakeWorker("w1", [6]))
    first = run_generate(pool, [1, 2, 3, 4], 1, session_id="s")[1].worker_id
    pool.router.started(first)  # busy: only the session's affinity would send it there again
    assert run_generate(pool, [1, 2, 3, 4], 1, session_id="s")[1].worker_id == first
    pool.forget("s")
    pool.forget("unknown")
    assert run_generate(pool, [1, 2, 3, 4], 1, session_id="s")[1].worker_id != first


def test_a_sticky_session_is_routed_without_hashing_its_history():
    pool = fake_pool(FakeWorker("w0", [5]), FakeWorker("w1", [6]))
    hashed = []
    block_hashes = pool.block_hashes
    pool.block_hashes = lambda tokens, namespace: hashed.append(len(tokens)) or block_hashes(tokens, namespace)
    first = run_generate(pool, [1] * 8, 1, session_id="s")[1].worker_id
    assert run_generate(pool, [1] * 9, 1, session_id="s")[1].worker_id == first
    assert run_generate(pool, [1] * 10, 1)[1].worker_id  # no session: routed by prefix
    assert hashed == [8, 10]
    assert pool.router.sticky("s") == first and pool.router.sticky("other") is None and pool.router.sticky(None) is None


def test_a_full_worker_yields_its_sessions_and_new_requests_to_one_with_room():
    r = router("a", "b", max_seqs=2)
    r.apply_events("a", stored(0, H[:8]))
    assert r.choose(H[:8], session_id="s1") == "a"
    r.started("a")
    r.started("a")  # a runs as many sequences as it batches
    assert r.sticky("s1") is None  # the session's next turn goes elsewhere (its prefix comes from T2)
    assert r.choose(H[:8], session_id="s1") == "b"
    assert r.choose(H[:8]) == "b"  # and so does a request that a's cache would otherwise win
    r.started("b")
    r.started("b")
    assert r.choose(H[:8]) in {"a", "b"}  # everyone full: no worker is excluded
    r.finished("a")
    assert r.choose(H[:8], session_id="s2") == "a"
