"""Replay a public Mooncake trace (../shared/traces) through the whole service.

Each request of the trace is a chain of 512-token prefix blocks (`hash_ids`); equal ids mean
equal prompt prefixes. Scaled down here: every trace block becomes `--tokens-per-block`
synthetic token ids derived from its id (equal ids give equal tokens), plus one question
token (so every full trace block can be reused: a lookup leaves the last prompt token to be
computed), and outputs are capped at `--max-tokens`. Each request is a
session on `kvstore serve` (embedded Redis, block store process, local Ray, N decode
workers, session API) driven over gRPC with `SessionClient`.

Requests are issued at the trace's own times, scaled by `--speed` (2: twice as fast), by a
dispatcher handing them to `--concurrency` client threads, so they overlap as in the trace
and the router's choices (prefix, rates, queues) and the spread over workers are exercised.
The block store's Redis (T2) gets `--redis-maxmemory`, by default enough for the working set
(every distinct block of the replayed requests); the report states both.

Reported, in one run:
  - prompt tokens served from T0 / T1 / T2 of the workers, against the hit ratio an
    unbounded cache would reach on the same requests (computed from the hash ids);
  - TTFT percentiles (arrival at the service to first token, so admission queueing counts);
  - requests and hit ratio per worker; how late the dispatcher issued requests (a backlog of
    the client threads, if any).
No skip_cache baseline: with requests overlapping, a paired recompute would load the
workers and its TTFT would measure the queue it met as much as the prefill (bench/ttft.py
measures the speedup of reuse in isolation).

Run:  .venv/bin/python bench/trace.py [--trace conversation|synthetic] [--requests 3000] [--speed 2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from common import embedded_service, header
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvstore.cache import CacheConfig
from kvstore.client import SessionClient
from services.cli.serve import ServeConfig
from services.session.server import SessionServiceConfig
from workers.loader import builtin_config, kv_spec

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"  # ../shared/traces
BLOCK_SIZE = 16  # tokens per block of the service (ServeConfig.block_size)


def load_trace(directory: Path, name: str, n: int) -> list[dict]:
    path = directory / f"{name}_trace.jsonl"
    if not path.exists():
        raise SystemExit(f"trace not found: {path} (expected the shared traces beside the project)")
    with path.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def block_tokens(hash_id: int, n: int, vocab: int = 256) -> list[int]:
    """Synthetic token ids of one trace block: a function of its id only."""
    return np.random.default_rng(hash_id).integers(0, vocab, n).tolist()


def unbounded_hit_tokens(requests: list[dict], tpb: int) -> list[int]:
    """Per request, the prompt tokens an unbounded cache would hold (leading blocks seen before)."""
    seen: set[int] = set()
    hits = []
    for r in requests:
        k = 0
        for h in r["hash_ids"]:
            if h not in seen:
                break
            k += 1
        hits.append(k * tpb)
        seen.update(r["hash_ids"])
    return hits


@dataclass(slots=True)
class Replayed:
    """One request of the trace, as served."""

    prompt_tokens: int
    cached: list[int]  # prompt tokens reused from T0, T1, T2
    ttft_s: float
    worker_id: str
    late_s: float  # issued this long after its scaled timestamp


def replay(address: str, prompts: list[list[int]], due_s: list[float], concurrency: int, max_tokens: int,
           console: Console) -> list[Replayed]:
    """Issue each prompt (a session of its own) at ``due_s`` after the start, at most
    ``concurrency`` at once; returns what each request got, in trace order."""
    results: list[Replayed | None] = [None] * len(prompts)
    lock = threading.Lock()
    with SessionClient(address, timeout_s=600) as kv, ThreadPoolExecutor(concurrency) as threads, \
            Progress(console=console, transient=True) as progress:
        task = progress.add_task("replaying", total=len(prompts))
        start = time.perf_counter()

        def one(i: int) -> None:
            late = time.perf_counter() - start - due_s[i]
            session = kv.create_session().session_id
            u = kv.generate(session, tokens=prompts[i], max_tokens=max_tokens, ignore_eos=True).result().usage
            results[i] = Replayed(u.prompt_tokens, [u.cached_tokens_t0, u.cached_tokens_t1, u.cached_tokens_t2],
                                  u.ttft_seconds, u.worker_id, late)
            with lock:
                progress.advance(task)

        futures = []
        for i, due in enumerate(due_s):
            time.sleep(max(0.0, start + due - time.perf_counter()))
            futures.append(threads.submit(one, i))
        for f in futures:
            f.result()  # raises what a request raised
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", choices=["conversation", "synthetic"], default="conversation")
    ap.add_argument("--trace-dir", type=Path, default=TRACES)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--speed", type=float, default=1.0, help="trace time / replay time (2: twice as fast)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight at most (client threads)")
    ap.add_argument("--tokens-per-block", type=int, default=32, help="tokens per 512-token trace block")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--max-blocks", type=int, default=100, help="trace blocks kept per request (context limit)")
    ap.add_argument("--model", default="small")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--t0-blocks", type=int, default=1024, help="per worker, 16-token blocks")
    ap.add_argument("--t1-blocks", type=int, default=4096)
    ap.add_argument("--redis-maxmemory", default="", help="of the block store's Redis (T2); empty: the working "
                                                           "set x 1.25 + 64 MB")
    ap.add_argument("--quick", action="store_true", help="60 requests")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path, help="plot: cumulative hit ratio per tier against unbounded, TTFT per worker")
    args = ap.parse_args()
    if args.quick:
        args.requests = 60
    if args.tokens_per_block % BLOCK_SIZE:
        raise SystemExit(f"--tokens-per-block must be a multiple of {BLOCK_SIZE}")
    console = Console(width=max(Console().width, 120))
    console.print(header(), highlight=False)
    requests = load_trace(args.trace_dir, args.trace, args.requests)
    for r in requests:  # long prompts keep their first blocks, so prefix sharing is unchanged
        r["hash_ids"] = r["hash_ids"][:args.max_blocks]
    tpb = args.tokens_per_block
    prompts = [[t for h in r["hash_ids"] for t in block_tokens(h, tpb)] + [256 + i % 8] for i, r in enumerate(requests)]
    unbounded = unbounded_hit_tokens(requests, tpb)
    due_s = [(r["timestamp"] - requests[0]["timestamp"]) / 1e3 / args.speed for r in requests]
    bytes_per_block = kv_spec(builtin_config(args.model), args.model, "", BLOCK_SIZE).bytes_per_block
    working_set = len({h for r in requests for h in r["hash_ids"]}) * (tpb // BLOCK_SIZE) * bytes_per_block
    maxmemory = args.redis_maxmemory or f"{math.ceil(working_set * 1.25 / 2**20) + 64}mb"

    cfg = ServeConfig(SessionServiceConfig(port=0), CacheConfig(t0_blocks=args.t0_blocks, t1_blocks=args.t1_blocks),
                      model=args.model, workers=args.workers, block_size=BLOCK_SIZE, redis_maxmemory=maxmemory)
    with embedded_service(cfg, console) as service:
        start = time.perf_counter()
        rows = replay(service.address, prompts, due_s, args.concurrency, args.max_tokens, console)
        elapsed = time.perf_counter() - start

    def hit(rs: list[Replayed]) -> str:
        return f"{sum(sum(r.cached) for r in rs) / max(1, sum(r.prompt_tokens for r in rs)):.1%}"

    prompt_tokens = sum(r.prompt_tokens for r in rows)
    cached = [sum(r.cached[t] for r in rows) for t in range(3)]
    reachable = sum(unbounded)
    table = Table(title=f"{args.trace} trace, first {len(rows)} requests ({due_s[-1] * args.speed:.0f} s of trace at "
                        f"{args.speed:g}x), {tpb} tokens per trace block, {args.workers} workers ({args.model}), "
                        f"T0 {args.t0_blocks} / T1 {args.t1_blocks} blocks each")
    for col in ("measure", "value"):
        table.add_column(col, justify="right")
    table.add_row("prompt tokens", str(prompt_tokens))
    for tier, n in zip(("T0", "T1", "T2"), cached):
        table.add_row(f"reused from {tier}", f"{n} ({n / prompt_tokens:.1%})")
    table.add_row("hit ratio (all tiers)", hit(rows))
    table.add_row("hit ratio of an unbounded cache", f"{reachable / prompt_tokens:.1%}")
    table.add_row("reached / unbounded", f"{sum(cached) / reachable:.1%}" if reachable else "-")
    ttfts = [r.ttft_s for r in rows]
    table.add_row("TTFT p50 / p90 / p99 (ms)", " / ".join(f"{1e3 * np.percentile(ttfts, q):.1f}" for q in (50, 90, 99)))
    for w in sorted({r.worker_id for r in rows}):
        mine = [r for r in rows if r.worker_id == w]
        table.add_row(f"worker {w}: requests, hit ratio", f"{len(mine)} ({len(mine) / len(rows):.1%}), {hit(mine)}")
    late = [r.late_s for r in rows]
    table.add_row("issued late p50 / max (s)", f"{np.percentile(late, 50):.2f} / {max(late):.2f}")
    table.add_row("T2 Redis maxmemory / working set",
                  f"{maxmemory} / {working_set / 2**20:.0f} MiB ({working_set // bytes_per_block} blocks x "
                  f"{bytes_per_block} B)")
    table.add_row("wall time (s)", f"{elapsed:.1f}")
    console.print(table)
    if args.png:
        plot(rows, unbounded, table.title, args.png, console)
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "unbounded": unbounded,
                                         "redis_maxmemory": maxmemory, "working_set_bytes": working_set}))
    return 0


def plot(rows: list[Replayed], unbounded: list[int], title: str, path: Path, console: Console) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    prompt = np.cumsum([r.prompt_tokens for r in rows])
    n = np.arange(1, len(rows) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    tiers = [np.cumsum([r.cached[t] for r in rows]) / prompt * 100 for t in range(3)]
    left.stackplot(n, *tiers, labels=["T0", "T1", "T2"], alpha=0.8)
    left.plot(n, np.cumsum(unbounded) / prompt * 100, "k--", label="unbounded cache")
    left.set(xlabel="requests replayed", ylabel="prompt tokens reused, cumulative (%)")
    left.legend(loc="lower right")
    left.grid(True, alpha=0.3)
    for w in sorted({r.worker_id for r in rows}):
        ttft = np.sort([r.ttft_s for r in rows if r.worker_id == w])
        right.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft) * 100, label=f"{w} ({len(ttft)} requests)")
    right.set(xscale="log", xlabel="TTFT (s, from arrival at the service)", ylabel="requests (%)")
    right.legend(loc="upper left")
    right.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    console.print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
