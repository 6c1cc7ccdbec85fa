"""Replay a public Mooncake trace (../shared/traces) through the whole service.

Each request of the trace is a chain of 512-token prefix blocks (`hash_ids`); equal ids mean
equal prompt prefixes. Scaled down here: every trace block becomes `--tokens-per-block`
synthetic token ids derived from its id (equal ids give equal tokens), plus one question
token (so every full trace block can be reused: a lookup leaves the last prompt token to be
computed), and outputs are capped at `--max-tokens`. Each request is a
session on `kvstore serve` (embedded Redis, block store process, local Ray, N decode
workers, session API) driven over gRPC with `SessionClient`.

Reported, in one run:
  - prompt tokens served from T0 / T1 / T2 of the workers, against the hit ratio an
    unbounded cache would reach on the same requests (computed from the hash ids);
  - TTFT with reuse, and for every `--baseline-every`-th request the same prompt again on the
    same worker with `skip_cache` (computing everything): the paired speedup.

Run:  .venv/bin/python bench/trace.py [--trace conversation|synthetic] [--requests 300] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from kvstore.cache import CacheConfig
from kvstore.client import SessionClient
from services.cli.serve import BackgroundService, ServeConfig
from services.session.server import SessionServiceConfig

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"  # ../shared/traces


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", choices=["conversation", "synthetic"], default="conversation")
    ap.add_argument("--trace-dir", type=Path, default=TRACES)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--tokens-per-block", type=int, default=32, help="tokens per 512-token trace block")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--max-blocks", type=int, default=100, help="trace blocks kept per request (context limit)")
    ap.add_argument("--model", default="small")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--t0-blocks", type=int, default=1024, help="per worker, 16-token blocks")
    ap.add_argument("--t1-blocks", type=int, default=4096)
    ap.add_argument("--baseline-every", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="60 requests")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.requests = 60
    console = Console(width=max(Console().width, 120))
    console.print(f"$ {shlex.join([os.path.relpath(sys.executable), *sys.argv])} | {platform.platform()}, "
                  f"{os.cpu_count()} CPUs")
    requests = load_trace(args.trace_dir, args.trace, args.requests)
    for r in requests:  # long prompts keep their first blocks, so prefix sharing is unchanged
        r["hash_ids"] = r["hash_ids"][:args.max_blocks]
    tpb = args.tokens_per_block
    prompts = [[t for h in r["hash_ids"] for t in block_tokens(h, tpb)] + [256 + i % 8] for i, r in enumerate(requests)]
    unbounded = unbounded_hit_tokens(requests, tpb)

    cfg = ServeConfig(SessionServiceConfig(port=0, max_concurrent_generations=8),
                      CacheConfig(t0_blocks=args.t0_blocks, t1_blocks=args.t1_blocks), model=args.model,
                      workers=args.workers, data_dir=tempfile.mkdtemp(prefix="kvstore-trace-"))
    with console.status("starting the service..."):
        service = BackgroundService(cfg).start()
    rows, paired = [], []
    start = time.perf_counter()
    try:
        with SessionClient(service.address) as kv:
            for i, prompt in enumerate(prompts):
                s = kv.create_session().session_id
                g = kv.generate(s, tokens=prompt, max_tokens=args.max_tokens, ignore_eos=True).result()
                u = g.usage
                rows.append((u.prompt_tokens, u.cached_tokens_t0, u.cached_tokens_t1, u.cached_tokens_t2,
                             u.ttft_seconds, u.worker_id))
                if args.baseline_every and i % args.baseline_every == 0 and sum(rows[-1][1:4]):
                    b = kv.create_session().session_id
                    base = kv.generate(b, tokens=prompt, max_tokens=args.max_tokens, ignore_eos=True,
                                       worker_id=u.worker_id, skip_cache=True).result()
                    assert base.ids == g.ids, f"request {i}: outputs differ with and without reuse"
                    paired.append((u.ttft_seconds, base.usage.ttft_seconds))
                if (i + 1) % 50 == 0:
                    console.log(f"{i + 1}/{len(prompts)} requests")
    finally:
        with console.status("stopping the service..."):
            service.stop()
    elapsed = time.perf_counter() - start

    prompt_tokens = sum(r[0] for r in rows)
    cached = [sum(r[t] for r in rows) for t in (1, 2, 3)]
    reachable = sum(unbounded)
    table = Table(title=f"{args.trace} trace, first {len(rows)} requests, {tpb} tokens per trace block, "
                        f"{args.workers} workers ({args.model}), T0 {args.t0_blocks} / T1 {args.t1_blocks} blocks each")
    for col in ("measure", "value"):
        table.add_column(col, justify="right")
    table.add_row("prompt tokens", str(prompt_tokens))
    for tier, n in zip(("T0", "T1", "T2"), cached):
        table.add_row(f"reused from {tier}", f"{n} ({n / prompt_tokens:.1%})")
    table.add_row("hit ratio (all tiers)", f"{sum(cached) / prompt_tokens:.1%}")
    table.add_row("hit ratio of an unbounded cache", f"{reachable / prompt_tokens:.1%}")
    table.add_row("reached / unbounded", f"{sum(cached) / reachable:.1%}" if reachable else "-")
    ttfts = sorted(r[4] for r in rows)
    table.add_row("TTFT median / p90 (ms)", f"{1e3 * statistics.median(ttfts):.1f} / {1e3 * ttfts[int(0.9 * len(ttfts))]:.1f}")
    if paired:
        ratio = statistics.median(b / a for a, b in paired)
        table.add_row(f"paired TTFT, reuse vs skip_cache ({len(paired)} requests, ms)",
                      f"{1e3 * statistics.median(a for a, _ in paired):.1f} vs "
                      f"{1e3 * statistics.median(b for _, b in paired):.1f}: {ratio:.1f}x")
    table.add_row("requests per worker", ", ".join(f"{w}: {sum(r[5] == w for r in rows)}"
                                                  for w in sorted({r[5] for r in rows})))
    table.add_row("wall time (s)", f"{elapsed:.1f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "paired": paired, "unbounded": unbounded}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
