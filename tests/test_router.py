"""Router decisions from block events: longest prefix (T0 over T1), load, stickiness, failover."""
import pytest

from workers.router import NoWorkerError, Router

H = [bytes([i]) * 16 for i in range(10)]


def stored(tier, hashes):
    return [(tier, True, h) for h in hashes]


def router(*workers):
    r = Router()
    for w in workers:
        r.add_worker(w)
    return r


def test_longest_cached_prefix_wins_and_t0_outweighs_t1():
    r = router("a", "b", "c")
    r.apply_events("a", stored(0, H[:3]))
    r.apply_events("b", stored(0, H[:5]))
    r.apply_events("c", stored(1, H[:6]))  # longer, but only in host memory
    # Blocks another worker holds count at the T2 weight: a 3 + 3 x 0.8, b 5 + 0.8, c 6 x 0.9.
    assert [r.prefix_score(w, H[:8]) for w in "abc"] == pytest.approx([5.4, 5.8, 5.4])
    assert r.choose(H[:8]) == "b"
    r.apply_events("b", [(0, False, H[1])])  # evicted: b's local prefix now ends after block 0
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
