"""``kvstore demo``: a scripted agent workload against the session service.

Several agent sessions share a long system prompt and take turns, interleaved: a user
question, a tool result appended without generating plus a follow-up, another question; one
session forks and its branch runs on the other worker. Every turn runs twice: once normally
(reusing cached KV from whichever tier holds it) and once with ``skip_cache`` on a fork of the
same history on the same worker (computing everything). The table shows the prompt tokens,
the cached tokens per tier, both TTFTs, and whether both runs produced the same tokens.

With no ``--address`` it starts the whole service on embedded defaults (``kvstore serve``),
runs the workload and shuts everything down.
"""
from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from kvstore.cache import CacheConfig
from kvstore.client import SessionClient
from services.cli.serve import BackgroundService, ServeConfig
from services.session.server import SessionServiceConfig

TOPICS = ("a trip to Kyoto", "a database migration", "a birthday party", "a marathon plan", "a garden")


@dataclass(slots=True)
class DemoConfig:
    address: str = ""  # a running session service; empty: start one on embedded defaults
    api_key: str = ""
    sessions: int = 3
    rounds: int = 3
    max_tokens: int = 16
    system_prompt_repeat: int = 12  # ~100 tokens each with the built-in byte tokenizer
    # Only for the embedded service:
    model: str = "small"
    workers: int = 2
    t0_blocks: int = 160  # small, so blocks spill to T1 while the demo runs
    t1_blocks: int = 4096

    def __post_init__(self) -> None:
        for name in ("sessions", "rounds", "max_tokens", "system_prompt_repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class Row:
    label: str
    worker: str
    prompt: int
    cached: tuple[int, int, int]
    ttft: float
    ttft_recompute: float
    same: bool


def round_messages(agent: int, round_: int) -> tuple[list[dict], list[dict]]:
    """Agent ``agent``'s messages in round ``round_`` (from 0) of the scripted workload: the
    tool results, appended without generating, then the user turn that generates."""
    topic = TOPICS[agent % len(TOPICS)]
    if round_ == 0:
        return [], [{"role": "user", "content": f"Help me plan {topic}."}]
    if round_ == 1:
        return ([{"role": "tool", "content": f'{{"search": "{topic}", "results": 3}}'}],
                [{"role": "user", "content": "Use the tool result and continue."}])
    return [], [{"role": "user", "content": f"Round {round_ + 1}: what is the next step?"}]


def system_prompt(repeat: int) -> str:
    rule = ("You are a planning agent. Break the goal into steps, call a tool when a fact is missing, "
            "and answer briefly. ")
    return "".join(f"Rule {i + 1}: {rule}" for i in range(repeat))


class _Workload:
    def __init__(self, kv: SessionClient, cfg: DemoConfig, console: Console, worker_ids: Sequence[str] = ()) -> None:
        self.kv, self.cfg, self.console = kv, cfg, console
        self.rows: list[Row] = []
        # Workers to place the fork on: the embedded pool's, else the ids turns report (the
        # session API has no call listing workers).
        self.workers = list(worker_ids)

    def turn(self, label: str, session_id: str, messages: list[dict], worker_id: str = "") -> Row:
        baseline = self.kv.fork(session_id, metadata={"demo": "recompute baseline"})
        g = self.kv.generate(session_id, messages, max_tokens=self.cfg.max_tokens, ignore_eos=True,
                             worker_id=worker_id).result()
        b = self.kv.generate(baseline.session_id, messages, max_tokens=self.cfg.max_tokens, ignore_eos=True,
                             worker_id=g.usage.worker_id, skip_cache=True).result()
        self.kv.close_session(baseline.session_id)
        u = g.usage
        if u.worker_id not in self.workers:
            self.workers.append(u.worker_id)
        row = Row(label, u.worker_id, u.prompt_tokens, (u.cached_tokens_t0, u.cached_tokens_t1, u.cached_tokens_t2),
                  u.ttft_seconds, b.usage.ttft_seconds, g.ids == b.ids)
        self.rows.append(row)
        self.console.log(f"{label}: {u.prompt_tokens} prompt tokens, cached T0/T1/T2 {row.cached}, "
                         f"TTFT {1e3 * row.ttft:.0f} ms vs {1e3 * row.ttft_recompute:.0f} ms")
        return row

    def run(self) -> None:
        cfg, kv = self.cfg, self.kv
        system = system_prompt(cfg.system_prompt_repeat)
        sessions = [kv.create_session(system_prompt=system, metadata={"agent": f"agent-{i}"}).session_id
                    for i in range(cfg.sessions)]
        last_worker: dict[str, str] = {}
        for r in range(cfg.rounds):
            for i, sid in enumerate(sessions):
                tool, msgs = round_messages(i, r)
                if tool:
                    kv.append(sid, tool)
                last_worker[sid] = self.turn(f"agent {i} round {r + 1}", sid, msgs).worker
            if r == 0 and sessions:
                # A branch of agent 0 explores an alternative on the other worker: it finds the
                # shared history in T2, written there by agent 0's worker.
                branch = kv.fork(sessions[0], metadata={"branch": "alternative"}).session_id
                # No other worker known (one worker, or all turns so far on one): the router picks.
                other = next((w for w in self.workers if w != last_worker[sessions[0]]), "")
                self.turn("fork of agent 0", branch, [{"role": "user", "content": "Try a cheaper alternative."}],
                          worker_id=other)


def turns_table(rows: list[Row]) -> Table:
    table = Table(title="Agent turns: cached KV by tier and time to first token with and without reuse")
    for col in ("turn", "worker", "prompt", "T0", "T1", "T2", "TTFT ms", "no reuse ms", "speedup", "same tokens"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.label, r.worker, str(r.prompt), *(str(c) for c in r.cached), f"{1e3 * r.ttft:.1f}",
                      f"{1e3 * r.ttft_recompute:.1f}", f"{r.ttft_recompute / r.ttft:.1f}x" if r.ttft else "-",
                      "yes" if r.same else "NO")
    return table


def summarize(rows: list[Row]) -> dict:
    cached = [sum(r.cached[t] for r in rows) for t in range(3)]
    prompt = sum(r.prompt for r in rows)
    return {"turns": len(rows), "prompt": prompt, "t0": cached[0], "t1": cached[1], "t2": cached[2],
            "same": all(r.same for r in rows),
            "median_speedup": statistics.median(r.ttft_recompute / r.ttft for r in rows if r.ttft) if rows else 0.0}


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    """Run the workload (starting the service if no address); print the table; return totals."""
    console = console or Console(width=max(Console().width, 120))
    if cfg.address:
        return _run_against(cfg.address, cfg, console)
    data = tempfile.TemporaryDirectory(prefix="kvstore-demo-")  # the demo's sessions are not kept
    serve_cfg = ServeConfig(SessionServiceConfig(port=0), CacheConfig(t0_blocks=cfg.t0_blocks, t1_blocks=cfg.t1_blocks),
                            model=cfg.model, workers=cfg.workers, data_dir=data.name)
    try:
        with console.status("starting the service: embedded Redis, block store, Ray and decode workers..."):
            service = BackgroundService(serve_cfg).start()
    except BaseException:
        data.cleanup()
        raise
    console.print(f"service on {service.address} ({cfg.workers} workers, model {cfg.model}, block store "
                  f"{service.service.blockstore_address}); the built-in models have random weights, so their "
                  "text is noise: the table compares token ids")
    try:
        return _run_against(service.address, cfg, console, service.service.pool.worker_ids)
    finally:
        with console.status("shutting down..."):
            service.stop()
        data.cleanup()
        console.print("service stopped")


def _run_against(address: str, cfg: DemoConfig, console: Console, worker_ids: Sequence[str] = ()) -> dict:
    with SessionClient(address, api_key=cfg.api_key) as kv:
        workload = _Workload(kv, cfg, console, worker_ids)
        workload.run()
    console.print(turns_table(workload.rows))
    totals = summarize(workload.rows)
    console.print(f"{totals['turns']} turns, {totals['prompt']} prompt tokens: reused {totals['t0']} from T0, "
                  f"{totals['t1']} from T1, {totals['t2']} from T2; median TTFT speedup "
                  f"{totals['median_speedup']:.1f}x; outputs with and without reuse "
                  f"{'identical' if totals['same'] else 'DIFFERENT'}")
    return totals

