"""bench/agents.py's workload generator (the benchmark itself runs by hand: `make bench`)."""
import sys
from dataclasses import replace
from pathlib import Path

# bench/ for its imports, as when it runs; last, so that bench/trace.py does not shadow `trace`.
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
from agents import Sizing, WorkloadConfig, make_workload  # noqa: E402

CFG = WorkloadConfig(agents=12, rounds=5, fork_prob=0.5, seed=7)


def test_same_seed_gives_the_same_tokens_and_schedule():
    a, b = make_workload(CFG), make_workload(CFG)
    assert a == b
    assert make_workload(replace(CFG, seed=8)).system != a.system
    assert make_workload(replace(CFG, seed=8)).agents != a.agents


def test_first_agents_do_not_depend_on_the_number_of_agents():
    # A capacity sweep adds agents to the same ones: its points are comparable.
    assert make_workload(replace(CFG, agents=3)).agents == make_workload(CFG).agents[:3]


def test_schedule_shape():
    w = make_workload(CFG)
    starts = [a.start_s for a in w.agents]
    assert starts[0] == 0 and starts == sorted(starts) and len(set(starts)) == len(starts)
    forks = [a for a in w.agents if a.fork is not None]
    assert forks and len(forks) < len(w.agents)
    for a in w.agents:
        assert [t.round for t in a.turns] == list(range(CFG.rounds))
        assert a.turns[0].tool == () and all(t.tool for t in a.turns[1:])
        assert all(CFG.user_tokens // 2 <= len(t.user) <= CFG.user_tokens * 3 // 2 for t in a.turns)
        if a.fork is not None:
            assert [t.round for t in a.fork.turns] == list(range(a.fork_after + 1, CFG.rounds))
            assert a.fork.turns[0].user != a.turns[a.fork_after + 1].user  # the branches diverge
    assert w.num_turns == CFG.agents * CFG.rounds + sum(len(a.fork.turns) for a in forks)


def test_t0_holds_the_longest_prompt():
    tiny = replace(CFG, agents=1)
    s = Sizing.of(tiny, workers=2, t0_agents=0.1, t1_agents=0.1)
    longest = max(len(make_workload(tiny).system) + sum(len(t.tool) + len(t.user) + tiny.max_tokens for t in a.turns)
                  for a in make_workload(tiny).agents)
    assert s.t0_blocks * 16 > longest and s.t1_blocks >= s.t0_blocks
