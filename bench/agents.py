"""An agent workload against the whole service over gRPC (in the spirit of LMCache's
multi-round QA benchmark): how much time to first token the tiers buy as agents outgrow T0.

U agents arrive at a Poisson rate and each runs R rounds on its own session. All share one
system prompt and tool spec (`--system-tokens`); each round appends a tool result without
generating (after a think time: the tool call, exponential), then generates a reply to a
user message, so every agent's history grows. Some agents fork once after a round and
both branches continue. Token ids are synthetic and drawn from `--seed`; sampling is greedy.

The same workload runs on three services started one after another:
  (a) all tiers: T0, T1 (write-through) and T2 (the block store on Redis);
  (b) T0 only: nothing is copied below T0 (what an engine without offload keeps);
  (c) no reuse: the service of (b) with `skip_cache` on every turn (every prompt is computed).
T0 is sized to hold `--t0-agents` agents' histories (besides the system prompt), T1
`--t1-agents`. Outputs must be identical across (a), (b) and (c): the exit status is 1 if not.

Run:  .venv/bin/python bench/agents.py [--quick] [--agents 16] [--sweep 2,4,8,16]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import numpy as np
import ray
from common import embedded_service, header
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvstore.cache import CacheConfig, WritePolicy
from kvstore.client import SessionClient
from services.cli.serve import ServeConfig, start_local_ray
from services.session.server import SessionServiceConfig

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 16  # tokens per block (ServeConfig's default)


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    agents: int = 16
    rounds: int = 8
    system_tokens: int = 1024  # shared system prompt and tool spec
    user_tokens: int = 32  # mean per user message (uniform, +-50%)
    tool_tokens: int = 128  # mean per tool result (uniform, +-50%)
    max_tokens: int = 32  # generated per turn (greedy, EOS ignored)
    think_s: float = 6.0  # mean think time before a tool result (exponential)
    arrival_rate: float = 1.0  # agents per second (Poisson)
    fork_prob: float = 0.25  # chance that an agent forks once, after a random round
    vocab: int = 256
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Turn:
    round: int
    think_s: float  # before the tool result is appended
    tool: tuple[int, ...]  # appended without generation (none before an agent's first turn)
    user: tuple[int, ...]  # then generated from


@dataclass(frozen=True, slots=True)
class Branch:
    """An agent's session, or a fork of one (which starts once its parent's `fork_after`
    round is generated)."""

    name: str
    start_s: float  # arrival, from the start of the run (roots)
    turns: tuple[Turn, ...]
    fork_after: int = -1  # the round after which `fork` branches off; -1: none
    fork: Branch | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    system: tuple[int, ...]
    agents: tuple[Branch, ...]

    @property
    def num_turns(self) -> int:
        return sum(len(a.turns) + (len(a.fork.turns) if a.fork else 0) for a in self.agents)


def _tokens(rng: np.random.Generator, mean: int, vocab: int) -> tuple[int, ...]:
    n = int(rng.integers(max(1, mean // 2), mean + mean // 2 + 1))
    return tuple(rng.integers(0, vocab, n).tolist())


def _turns(rng: np.random.Generator, cfg: WorkloadConfig, first: int) -> tuple[Turn, ...]:
    return tuple(Turn(r, float(rng.exponential(cfg.think_s)) if r else 0.0,
                      _tokens(rng, cfg.tool_tokens, cfg.vocab) if r else (), _tokens(rng, cfg.user_tokens, cfg.vocab))
                 for r in range(first, cfg.rounds))


def make_workload(cfg: WorkloadConfig) -> Workload:
    """Agent i's tokens, fork and arrival gap come from (seed, i) alone: the first k agents are
    the same whatever the number of agents."""
    system = tuple(np.random.default_rng([cfg.seed]).integers(0, cfg.vocab, cfg.system_tokens).tolist())
    agents, start = [], 0.0
    for i in range(cfg.agents):
        rng = np.random.default_rng([cfg.seed, i + 1])
        start += float(rng.exponential(1 / cfg.arrival_rate)) if i else 0.0
        turns = _turns(rng, cfg, 0)
        fork_after, fork = -1, None
        if cfg.rounds > 1 and rng.random() < cfg.fork_prob:
            fork_after = int(rng.integers(0, cfg.rounds - 1))
            fork = Branch(f"agent {i} fork", 0.0, _turns(rng, cfg, fork_after + 1))
        agents.append(Branch(f"agent {i}", start, turns, fork_after, fork))
    return Workload(system, tuple(agents))


class Mode(Enum):
    ALL_TIERS = "(a) all tiers"
    T0_ONLY = "(b) T0 only"
    NO_REUSE = "(c) no reuse"


@dataclass(frozen=True, slots=True)
class Record:
    """One generated turn, as the client saw it."""

    branch: str
    round: int
    ttft_s: float  # from the call to the first streamed token (includes queueing)
    e2e_s: float  # from the call to the last token
    end_s: float  # from the start of the run
    prompt_tokens: int
    cached: tuple[int, int, int]  # prompt tokens reused from T0, T1, T2
    completion_tokens: int
    worker: str
    output: tuple[int, ...]


@dataclass(slots=True)
class RunResult:
    mode: Mode
    records: list[Record] = field(default_factory=list)
    wall_s: float = 0.0

    def ttft(self, q: float) -> float:
        return float(np.quantile([r.ttft_s for r in self.records], q))

    def hit_ratio(self, tier: int | None = None) -> float:
        prompt = sum(r.prompt_tokens for r in self.records)
        return sum(sum(r.cached) if tier is None else r.cached[tier] for r in self.records) / prompt

    def outputs(self) -> dict[tuple[str, int], tuple[int, ...]]:
        return {(r.branch, r.round): r.output for r in self.records}


class Runner:
    """Runs a workload's agents on threads (one per branch) against one service."""

    def __init__(self, kv: SessionClient, workload: Workload, cfg: WorkloadConfig, skip_cache: bool,
                 on_turn: Callable[[], None]) -> None:
        self.kv, self.workload, self.cfg, self.skip_cache, self.on_turn = kv, workload, cfg, skip_cache, on_turn
        self.records: list[Record] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._start = 0.0

    def run(self) -> float:
        """Runs everything; returns the wall time in seconds."""
        self._start = time.perf_counter()
        for agent in self.workload.agents:
            self._spawn(agent, None)
        while True:  # forks add threads while others run
            with self._lock:
                pending = [t for t in self._threads if t.is_alive()]
            if not pending:
                break
            pending[0].join()
        if self.errors:
            raise self.errors[0]
        return time.perf_counter() - self._start

    def _spawn(self, branch: Branch, session_id: str | None) -> None:
        t = threading.Thread(target=self._guarded, args=(branch, session_id), name=branch.name, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _guarded(self, branch: Branch, session_id: str | None) -> None:
        try:
            self._branch(branch, session_id)
        except BaseException as e:  # reported by run()
            self.errors.append(e)

    def _branch(self, branch: Branch, session_id: str | None) -> None:
        if session_id is None:
            time.sleep(max(0.0, self._start + branch.start_s - time.perf_counter()))
            session_id = self.kv.create_session().session_id
        for turn in branch.turns:
            time.sleep(turn.think_s)
            if turn.tool:
                self.kv.append(session_id, tokens=turn.tool)
            prompt = (self.workload.system if turn.round == 0 else ()) + turn.user
            self._generate(branch, turn, session_id, prompt)
            if turn.round == branch.fork_after:
                self._spawn(branch.fork, self.kv.fork(session_id).session_id)

    def _generate(self, branch: Branch, turn: Turn, session_id: str, prompt: tuple[int, ...]) -> None:
        t = time.perf_counter()
        g = self.kv.generate(session_id, tokens=prompt, max_tokens=self.cfg.max_tokens, ignore_eos=True,
                             skip_cache=self.skip_cache)
        first = None
        for _ in g:
            first = first or time.perf_counter()
        end = time.perf_counter()
        u = g.usage
        record = Record(branch.name, turn.round, first - t, end - t, end - self._start, u.prompt_tokens,
                        (u.cached_tokens_t0, u.cached_tokens_t1, u.cached_tokens_t2), u.completion_tokens,
                        u.worker_id, tuple(g.ids))
        with self._lock:
            self.records.append(record)
        self.on_turn()


@dataclass(frozen=True, slots=True)
class Sizing:
    """T0 and T1 blocks per worker, from how many agents' histories each should hold."""

    system_blocks: int
    agent_blocks: int  # an agent's history at its last round, besides the system prompt
    t0_blocks: int
    t1_blocks: int

    @staticmethod
    def of(cfg: WorkloadConfig, workers: int, t0_agents: float, t1_agents: float) -> Sizing:
        system = math.ceil(cfg.system_tokens / BLOCK)
        largest = cfg.rounds * (cfg.user_tokens * 3 // 2 + cfg.tool_tokens * 3 // 2 + cfg.max_tokens)
        agent = math.ceil(cfg.rounds * (cfg.user_tokens + cfg.tool_tokens + cfg.max_tokens) / BLOCK)
        # T0 also holds the running prompts: at least the longest one must fit.
        t0 = max(system + math.ceil(t0_agents * agent / workers), math.ceil((cfg.system_tokens + largest) / BLOCK) + 1)
        return Sizing(system, agent, t0, max(t0, system + math.ceil(t1_agents * agent / workers)))

    def agents_held(self, blocks: int, workers: int) -> float:
        return workers * (blocks - self.system_blocks) / self.agent_blocks


def serve_config(mode: Mode, args: argparse.Namespace, sizing: Sizing) -> ServeConfig:
    if mode is Mode.ALL_TIERS:
        cache = CacheConfig(t0_blocks=sizing.t0_blocks, t1_blocks=sizing.t1_blocks)
    else:  # T1 unused (one block); nothing reaches T1, so nothing reaches T2 either
        cache = CacheConfig(t0_blocks=sizing.t0_blocks, t1_blocks=1, t0_t1_policy=WritePolicy.OFF,
                            t1_t2_policy=WritePolicy.OFF)
    return ServeConfig(SessionServiceConfig(port=0, queue_timeout_s=3600, max_queued_generations=1024),
                       cache, model=args.model, workers=args.workers)


def run_mode(mode: Mode, args: argparse.Namespace, cfg: WorkloadConfig, sizing: Sizing,
             console: Console) -> RunResult:
    workload = make_workload(cfg)
    with embedded_service(serve_config(mode, args, sizing), console) as service, \
            SessionClient(service.address, timeout_s=None) as kv, Progress(console=console) as progress:
        task = progress.add_task(f"{mode.value}, {cfg.agents} agents", total=workload.num_turns)
        runner = Runner(kv, workload, cfg, mode is Mode.NO_REUSE, lambda: progress.advance(task))
        wall = runner.run()
    result = RunResult(mode, sorted(runner.records, key=lambda r: r.end_s), wall)
    console.log(f"{mode.value}, {cfg.agents} agents: TTFT p50 {_ms(result.ttft(0.5))} ms, hit ratio "
                f"{result.hit_ratio():.1%}, {wall:.0f} s")
    return result


def _ms(s: float) -> str:
    return f"{1e3 * s:.0f}"


def report(results: list[RunResult], title: str) -> Table:
    table = Table(title=title)
    for col in ("config", "turns", "TTFT p50 / p90 / p99 (ms)", "e2e p50 / p99 (ms)", "output tok/s",
                "cached T0 / T1 / T2 (share of prompt tokens)", "hit ratio", "requests per worker", "wall (s)"):
        table.add_column(col, justify="right")
    for res in results:
        e2e = [r.e2e_s for r in res.records]
        workers = sorted({r.worker for r in res.records})
        table.add_row(
            res.mode.value, str(len(res.records)), " / ".join(_ms(res.ttft(q)) for q in (0.5, 0.9, 0.99)),
            f"{_ms(float(np.quantile(e2e, 0.5)))} / {_ms(float(np.quantile(e2e, 0.99)))}",
            f"{sum(r.completion_tokens for r in res.records) / res.wall_s:.1f}",
            " / ".join(f"{res.hit_ratio(t):.1%}" for t in range(3)), f"{res.hit_ratio():.1%}",
            ", ".join(f"{w}: {sum(r.worker == w for r in res.records)}" for w in workers), f"{res.wall_s:.0f}")
    return table


def compare(results: list[RunResult], console: Console) -> bool:
    """Prints the TTFT p50 ratios to (a) and whether outputs match; True if they all do."""
    by_mode = {r.mode: r for r in results}
    a = by_mode[Mode.ALL_TIERS].ttft(0.5)
    console.print("TTFT p50: " + ", ".join(f"{m.value} / (a) = {r.ttft(0.5) / a:.1f}x"
                                           for m, r in by_mode.items() if m is not Mode.ALL_TIERS))
    reference = results[0].outputs()
    differ = [(r.mode.value, k) for r in results[1:] for k, out in r.outputs().items() if reference.get(k) != out]
    if differ:
        console.print(f"[red]outputs DIFFER from {results[0].mode.value} in {len(differ)} turns, e.g. {differ[:3]}")
    else:
        console.print(f"outputs identical across {', '.join(r.mode.value for r in results)} "
                      f"({len(reference)} greedy turns each)")
    return not differ


def plot(points: list[tuple[int, list[RunResult]]], sizing: Sizing, workers: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    agents = [n for n, _ in points]
    for i, mode in enumerate(Mode):
        res = [next(r for r in results if r.mode is mode) for _, results in points]
        ax1.plot(agents, [1e3 * r.ttft(0.5) for r in res], "o-", label=mode.value)
        ax2.plot(agents, [100 * r.hit_ratio() for r in res], "o-", label=mode.value)
    t0, t1 = (sizing.agents_held(blocks, workers) for blocks in (sizing.t0_blocks, sizing.t1_blocks))
    full = {t0: "T0 full", t1: "T1 full"} if t1 != t0 else {t0: "T0 and T1 full"}
    for ax in (ax1, ax2):
        for x, name in full.items():
            ax.axvline(x, ls="--", c="grey")
            ax.text(x, 0.97, f" {name}", c="grey", va="top", transform=ax.get_xaxis_transform())
        ax.set_xscale("log", base=2)
        ax.set_xticks(agents, [str(n) for n in agents])
        ax.set_xlabel("agents")
        ax.legend()
    ax1.set_yscale("log")
    ax1.set_ylabel("TTFT p50 (ms)")
    ax2.set_ylabel("prompt tokens reused (%)")
    ax2.set_ylim(0, 100)
    fig.suptitle("Agent workload: TTFT and reuse vs active agents")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    d = WorkloadConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=d.agents)
    ap.add_argument("--rounds", type=int, default=d.rounds)
    ap.add_argument("--system-tokens", type=int, default=d.system_tokens)
    ap.add_argument("--user-tokens", type=int, default=d.user_tokens)
    ap.add_argument("--tool-tokens", type=int, default=d.tool_tokens)
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens)
    ap.add_argument("--think-s", type=float, default=d.think_s, help="mean think time (the tool call)")
    ap.add_argument("--arrival-rate", type=float, default=d.arrival_rate, help="agents per second")
    ap.add_argument("--fork-prob", type=float, default=d.fork_prob)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--model", default="small")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--t0-agents", type=float, default=4, help="agents' histories T0 holds (all workers)")
    ap.add_argument("--t1-agents", type=float, default=8, help="agents' histories T1 holds (all workers)")
    ap.add_argument("--sweep", default="", help="agent counts, e.g. 2,4,8,16: a capacity curve (PNG)")
    ap.add_argument("--plot", type=Path, default=RESULTS / "agents.png")
    ap.add_argument("--quick", action="store_true",
                    help="4 agents x 3 rounds, short prompts, the tiny model (a sweep: 1,2,4 agents)")
    args = ap.parse_args()
    if args.quick:
        args.model, args.t0_agents, args.t1_agents = "tiny", 1, 2
        args.agents, args.rounds, args.system_tokens, args.user_tokens = 4, 3, 256, 16
        args.tool_tokens, args.max_tokens, args.think_s, args.arrival_rate = 32, 8, 0.1, 8.0
        args.sweep = args.sweep and "1,2,4"
    cfg = WorkloadConfig(args.agents, args.rounds, args.system_tokens, args.user_tokens, args.tool_tokens,
                         args.max_tokens, args.think_s, args.arrival_rate, args.fork_prob, seed=args.seed)
    console = Console(width=max(Console().width, 160))
    console.print(header(), highlight=False)
    sizing = Sizing.of(cfg, args.workers, args.t0_agents, args.t1_agents)
    console.print(
        f"{args.workers} workers ({args.model}); blocks of {BLOCK} tokens: system prompt {sizing.system_blocks}, an "
        f"agent's history at its last round ~{sizing.agent_blocks}; per worker T0 {sizing.t0_blocks} blocks, T1 "
        f"{sizing.t1_blocks} (all tiers only): T0 holds ~{sizing.agents_held(sizing.t0_blocks, args.workers):.1f} "
        f"agents, T1 ~{sizing.agents_held(sizing.t1_blocks, args.workers):.1f} (all workers)")
    start_local_ray(num_cpus=max(os.cpu_count() or 1, args.workers), include_dashboard=False, log_to_driver=False)
    try:
        return run_points(args, cfg, sizing, console)
    finally:
        ray.shutdown()


def run_points(args: argparse.Namespace, cfg: WorkloadConfig, sizing: Sizing, console: Console) -> int:
    ok = True
    counts = [int(n) for n in args.sweep.split(",")] if args.sweep else [cfg.agents]
    points = []
    for n in counts:
        point = replace(cfg, agents=n)
        w = make_workload(point)
        title = (f"{n} agents x {cfg.rounds} rounds ({w.num_turns} turns, {sum(a.fork is not None for a in w.agents)} "
                 f"forks), system prompt {cfg.system_tokens} tokens, {cfg.max_tokens} generated per turn, think "
                 f"{cfg.think_s} s, {cfg.arrival_rate} agents/s, seed {cfg.seed}")
        results = [run_mode(mode, args, point, sizing, console) for mode in Mode]
        console.print(report(results, title))
        ok = compare(results, console) and ok
        points.append((n, results))
    if len(points) > 1:
        table = Table(title="capacity curve: TTFT p50 (ms) and hit ratio per number of agents")
        table.add_column("agents", justify="right")
        for mode in Mode:
            table.add_column(mode.value, justify="right")
        for n, results in points:
            table.add_row(str(n), *(f"{_ms(r.ttft(0.5))} ms, {r.hit_ratio():.1%}" for r in results))
        console.print(table)
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(points, sizing, args.workers, args.plot)
        console.print(f"capacity curve: {args.plot}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
