"""Router decisions by estimated TTFT from each worker's rates and block events (T0 over T1
over T2 over recompute, queues), stickiness, failover; and the pool's failover over fake
worker handles."""
import asyncio
from types import SimpleNamespace

import pytest
from ray.exceptions import RayActorError

from kvstore.cache import BlockEvent, Tier
from services.session.pool import PoolConfig, WorkerPool, _Worker
from services.session.router import Affinity, NoWorkerError, Route, Router
from workers.actor import GenerateEnd, GenerateRequest, WorkerInfo
from workers.engine import FinishReason, Usage
from workers.loadcost import LoadRates
from workers.sampling import SamplingParams

H = [bytes([i]) * 16 for i in range(10)]
BS, BPB = 16, 1_000_000  # tokens and bytes per block
N = 8 * BS + 1  # a prompt of H[:8] and one more token


def stored(tier, hashes):
    return [BlockEvent(Tier(tier), True, h) for h in hashes]


def rates(prefill=1000.0, t1=1e9, t2=1e8):
    """1000 tokens/s: a block recomputed takes 16 ms, loaded from T1 1 ms, from T2 11 ms."""
    return LoadRates(t1, t2, prefill)


def router(*workers, max_seqs: int = 16):
    r = Router()
    r.block_size, r.bytes_per_block = BS, BPB
    for w in workers:
        r.add_worker(w, max_seqs, incarnation="1")
        r.apply_events(w, [], rates())
    return r


def after(worker_id: str, num_tokens: int, incarnation: str = "1") -> Affinity:
    """A session whose last turn ran on ``worker_id`` and left it ``num_tokens`` long."""
    return Affinity(worker_id, incarnation, num_tokens)


def busy(r, worker_id, seconds):
    route = Route(worker_id, seconds)
    r.started(route)
    return route


def test_ttft_estimate_t0_then_t1_then_t2_then_recompute():
    r = router("a", "b", "c")
    r.apply_events("a", stored(0, H[:8]))
    r.apply_events("b", stored(1, H[:8]))
    # a: 1 token to prefill; b: 8 T1 loads + 1 token; c: 8 T2 loads (a holds them, so they are in T2) + 1 token.
    assert [r.estimate(w, H[:8], N).work_s for w in "abc"] == pytest.approx([0.001, 0.009, 0.089])
    assert r.estimate("c", H[:8] + H[9:], N + BS).work_s == pytest.approx(0.089 + 0.016)  # nobody holds H[9]: recomputed
    assert r.choose(H[:8], N).worker_id == "a"
    r.apply_events("a", [BlockEvent(Tier.T0, False, H[1])])  # evicted: a must get block 1 from T2
    assert r.estimate("a", H[:8], N).work_s == pytest.approx(0.012)
    assert r.choose(H[:8], N).worker_id == "b"
    r.remove_worker("a")
    r.remove_worker("b")  # nobody holds the prefix: c recomputes it all
    assert r.estimate("c", H[:8], N).work_s == pytest.approx(N / 1000)


def test_a_slow_t2_loses_to_recomputing_on_a_faster_worker():
    r = router("hot", "slow", "fast")
    r.apply_events("hot", stored(0, H[:8]))
    r.apply_events("slow", [], rates(prefill=100, t2=1e6))  # 1 s per T2 block, 10 ms per token
    r.apply_events("fast", [], rates(prefill=2000, t2=1e6))
    busy(r, "hot", 5.0)
    # slow would recompute (1.29 s < 8 s of T2 loads) and fast too, in 64 ms: fast wins.
    assert r.estimate("slow", H[:8], N).work_s == pytest.approx(N / 100)
    assert r.choose(H[:8], N) == Route("fast", pytest.approx(N / 2000))
    r.apply_events("slow", [], rates(prefill=100, t2=1e9))  # its T2 got fast: 8 x 2 ms + 10 ms
    assert r.choose(H[:8], N) == Route("slow", pytest.approx(0.026))


def test_a_queue_sends_a_shared_prefix_to_an_idle_worker_through_t2():
    r = router("a", "b")
    r.apply_events("a", stored(0, H[:8]))
    assert r.choose(H[:8], N).worker_id == "a"
    queued = busy(r, "a", 0.5)  # a request ahead of it on a, 0.5 s of prefill > b's 89 ms of T2 loads
    assert r.choose(H[:8], N).worker_id == "b"
    r.prefilled(queued)  # its first token came: a is free again (still running it)
    assert r.choose(H[:8], N).worker_id == "a"
    r.finished(queued)  # and finishing does not take its work off twice
    assert r.choose(H[:8], N).worker_id == "a"


def test_running_sequences_count_as_queue():
    r = router("a", "b")
    r.apply_events("a", stored(0, H[:8]))
    for _ in range(10):  # each decoding sequence costs 8 tokens of prefill (8 ms) per new request
        r.prefilled(busy(r, "a", 0.1))
    assert r.choose(H[:8], N).worker_id == "a"  # 80 + 1 ms < b's 89 ms of T2 loads
    for _ in range(2):
        r.prefilled(busy(r, "a", 0.1))
    assert r.choose(H[:8], N).worker_id == "b"  # 96 + 1 ms > 89 ms


def test_load_spreads_requests_without_a_cached_prefix():
    r = router("a", "b")
    first = r.choose([H[9]], BS + 1)
    r.started(first)
    second = r.choose([H[9]], BS + 1)
    assert {first.worker_id, second.worker_id} == {"a", "b"}
    r.started(second)
    r.finished(first)
    assert r.choose([H[9]], BS + 1).worker_id == first.worker_id


def test_ties_go_round_robin_when_requests_come_one_at_a_time():
    r = router("a", "b", "c")
    picks = []
    for i in range(6):  # each finishes before the next arrives: no load to tell them apart
        route = r.choose([H[i]], BS + 1)
        r.started(route)
        r.finished(route)
        picks.append(route.worker_id)
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]
    r.apply_events("c", stored(0, H[:1]))
    assert r.choose(H[:2], 2 * BS + 1).worker_id == "c"  # a cached prefix still wins over the rotation


def test_sessions_stick_unless_clearly_slower_and_move_when_their_worker_dies():
    r = router("a", "b")
    r.apply_events("a", stored(0, H[:8]))
    r.apply_events("b", stored(0, H[:8]))
    # Sticky without a look at the prefix; the turn's work is its new tokens, at a's prefill rate.
    assert r.sticky(after("a", N), N + BS) == Route("a", pytest.approx(BS / 1000))
    assert r.sticky(after("b", N), N + BS).worker_id == "b"
    busy(r, "a", 0.01)  # a little queued on a: a (10 + 1 ms) is not clearly slower than b (1 ms)
    assert r.sticky(after("a", N), N + 1) is None
    assert r.choose(H[:8], N + 1, after("a", N)).worker_id == "a"
    assert r.choose(H[:8], N + 1).worker_id == "b"  # without the affinity: the faster one
    busy(r, "a", 0.1)  # now it is clearly slower: the session moves to b
    assert r.choose(H[:8], N + 1, after("a", N)).worker_id == "b"
    r.remove_worker("b")
    assert r.sticky(after("b", N), N + 2) is None
    assert r.choose(H[:8], N + 2, after("b", N)).worker_id == "a"
    r.remove_worker("a")
    with pytest.raises(NoWorkerError):
        r.choose(H[:1], BS)


def test_an_affinity_to_an_earlier_incarnation_or_a_malformed_one_does_not_count():
    r = router("a", "b")
    r.apply_events("b", stored(0, H[:8]))
    r.add_worker("a", 16, incarnation="2")  # a restarted: its caches are empty
    assert r.sticky(after("a", N, incarnation="1"), N + 1) is None
    assert r.choose(H[:8], N + 1, after("a", N, incarnation="1")).worker_id == "b"
    assert r.sticky(after("a", N, incarnation="2"), N + 1).worker_id == "a"
    assert Affinity.decode(after("a", N, "2").encode()) == after("a", N, "2")
    for bad in ("", "a", "a/2", "a/2/x", "/2/5", "a//5"):
        assert Affinity.decode(bad) is None, bad


def test_the_load_a_worker_reports_from_other_replicas_counts_against_its_room():
    r = router("a", "b", max_seqs=2)
    r.apply_events("a", stored(0, H[:8]), load=2)  # full of another replica's sequences
    assert r.sticky(after("a", N), N + 1) is None
    assert r.choose(H[:8], N + 1, after("a", N)).worker_id == "b"
    r.apply_events("a", [], load=0)
    assert r.choose(H[:8], N + 1).worker_id == "a"
    # Reports a poll old show both full, but this router's own counts leave room on b only: b.
    r.apply_events("a", [], load=2)
    r.apply_events("b", [], load=2)
    busy(r, "a", 0.0), busy(r, "a", 0.0)
    assert r.choose(H[:8], N + 1).worker_id == "b"


def test_a_snapshot_replaces_what_the_router_knew_of_a_worker():
    r = router("a", "b")
    r.apply_events("a", stored(0, H[:8]))
    r.apply_events("a", stored(1, H[:2]), snapshot=True)  # a now holds only two blocks, in T1
    fresh = router("a", "b")
    fresh.apply_events("a", stored(1, H[:2]))
    assert r.estimate("a", H[:8], N) == fresh.estimate("a", H[:8], N) != router("a").estimate("a", H[:8], N)


def test_an_unmeasured_worker_is_assumed_as_fast_as_a_measured_peer():
    r = router("a", "b")
    r.apply_events("a", [], LoadRates(1e9, 1e8, 2000, {8: 20_000.0}))
    r.apply_events("b", [], LoadRates(1e9, 1e8, 2000))  # b's seeds: 10x slower than what a measured
    assert r.estimate("b", [], 200).work_s == pytest.approx(0.01)
    r.apply_events("b", [], LoadRates(1e9, 1e8, 2000, {8: 4000.0}))  # once b measures, its own rates
    assert r.estimate("b", [], 200).work_s == pytest.approx(0.05)


def test_restart_clears_stale_index():
    r = router("a", "b")
    r.apply_events("a", stored(0, H[:6]), rates(prefill=500))
    r.add_worker("a", 16, incarnation="1")  # the same incarnation again: nothing changes
    assert r.estimate("a", H[:6], 6 * BS).work_s < 6 * BS / 2000
    r.add_worker("a", 16, incarnation="2")
    assert r.estimate("a", H[:6], 6 * BS).work_s == pytest.approx(6 * BS / 2000) and r.workers == ["a", "b"]  # seed rates
    r.apply_events("zombie", stored(0, H[:6]))  # events of an unknown worker are ignored
    assert "zombie" not in r.workers



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
            yield asyncio.sleep(0, GenerateEnd(FinishReason.LENGTH, self.worker_id, usage, incarnation="1"))

        return stream()


def fake_pool(*workers: FakeWorker) -> WorkerPool:
    pool = WorkerPool(PoolConfig(num_workers=len(workers)))
    pool.info = WorkerInfo("w0", "1", "m", b"f" * 16, 4, 512, 1024, (), 16, 1024)
    for w in workers:
        pool._workers[w.worker_id] = _Worker(w.worker_id, w, max_seqs=16, incarnation="1", live=True)
        pool.router.add_worker(w.worker_id, 16, incarnation="1")
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
    tokens, done = run_generate(pool, [1, 2, 3], 4, worker_id="w0", affinity=Affinity("w0", "1", 3))
    assert tokens == [10, 11, 12, 13] and w1.calls == []
    assert (done.finish_reason, done.worker_id, done.usage.cached_tokens, done.failovers) == ("length", "w0", [0, 0, 0], 1)
    assert pool.live_worker_ids == ["w1"]


def test_a_sessions_affinity_routes_it_to_a_busy_worker_and_without_one_the_idle_one_wins():
    pool = fake_pool(FakeWorker("w0", [5]), FakeWorker("w1", [6]))
    done = run_generate(pool, [1, 2, 3, 4], 1)[1]
    first = Affinity(done.worker_id, done.incarnation, 5)
    pool.router.started(Route(first.worker_id, 0.0))  # busy: only the session's affinity would send it there again
    assert run_generate(pool, [1, 2, 3, 4], 1, affinity=first)[1].worker_id == first.worker_id
    assert run_generate(pool, [1, 2, 3, 4], 1)[1].worker_id != first.worker_id


def test_a_sticky_session_is_routed_without_hashing_its_history():
    pool = fake_pool(FakeWorker("w0", [5]), FakeWorker("w1", [6]))
    hashed = []
    block_hashes = pool.block_hashes
    pool.block_hashes = lambda tokens, namespace: hashed.append(len(tokens)) or block_hashes(tokens, namespace)
    done = run_generate(pool, [1] * 8, 1)[1]
    affinity = Affinity(done.worker_id, done.incarnation, 9)
    assert run_generate(pool, [1] * 9, 1, affinity=affinity)[1].worker_id == done.worker_id
    assert run_generate(pool, [1] * 10, 1)[1].worker_id  # no session: routed by prefix
    assert hashed == [8, 10]


def test_a_full_worker_yields_its_sessions_and_new_requests_to_one_with_room():
    r = router("a", "b", max_seqs=2)
    r.apply_events("a", stored(0, H[:8]))
    assert r.choose(H[:8], N).worker_id == "a"
    first, _ = busy(r, "a", 0.0), busy(r, "a", 0.0)  # a runs as many sequences as it batches
    assert r.sticky(after("a", N), N) is None  # the session's next turn goes elsewhere (its prefix comes from T2)
    assert r.choose(H[:8], N, after("a", N)).worker_id == "b"
    assert r.choose(H[:8], N).worker_id == "b"  # and so does a request that a's cache would otherwise win
    busy(r, "b", 0.0)
    busy(r, "b", 0.0)
    assert r.choose(H[:8], N).worker_id in {"a", "b"}  # everyone full: no worker is excluded
    r.finished(first)
    assert r.choose(H[:8], N, after("b", N)).worker_id == "a"  # b is full: its affinity does not count
