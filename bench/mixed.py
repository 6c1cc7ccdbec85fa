"""Decoding while long prompts arrive: do running sequences keep their speed?

N sequences decode at a given context (their prompts of ``--context`` tokens). After a
baseline window, one request arrives whose prompt is ``--hist`` history tokens + 32 new:
  T2 hit     the history was computed by another worker and is in T2 (the block store, its
             own process, over an embedded Redis): the engine loads it in the background
  uncached   nothing cached: the engine prefills it in chunks between decode steps
T2 hits arrive ``--arrivals`` times, one after another (each a different history): a single
load spans only a few decode steps. Reported per model and arrival kind: the decoders' tokens/s
in the baseline window, during the arrivals' loads (T2 hit) and from each arrival to its first
token (summed over the arrivals), the ratios, the arrivals' median TTFT, and the longest time any
decoder waited for its next token (baseline, during).

Run:  .venv/bin/python bench/mixed.py [--quick] [--model small,qwen2.5-0.5b-shape] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
from common import blockstore_process, header
from rich.console import Console
from rich.table import Table

from kvstore.blockstore_client import BlockStoreClient, BlockStoreClientConfig
from kvstore.cache import CacheConfig, TieredKVCache
from workers.engine import Engine, EngineConfig, Sequence
from workers.loader import builtin_model, kv_spec
from workers.sampling import SamplingParams

TURN = 32  # new tokens after the arrival's history


@dataclass(slots=True)
class Window:
    """The decoders' progress over a span of steps."""

    tokens: int = 0
    start: float = 0.0
    end: float = 0.0
    max_wait_s: float = 0.0  # longest gap between two tokens of a decoder

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.end - self.start) if self.end > self.start else 0.0


@dataclass(slots=True)
class Row:
    model: str
    arrival: str
    decoders: int
    context: int
    hist: int
    arrivals: int
    baseline_tps: float
    load_tps: float | None  # over the steps that started during the arrivals' loads (T2 hit)
    arrival_tps: float  # from each arrival to its first token
    ttft_s: float  # median over the arrivals
    load_s: float  # median over the arrivals
    baseline_wait_s: float
    arrival_wait_s: float
    cached: list[int]


def step_until(engine: Engine, decoders: list[Sequence], done, window: Window) -> list[tuple[float, float, int]]:
    """Step until ``done()``; counts the decoders' tokens; returns (start, end, tokens) per step."""
    last = {s.id: window.start for s in decoders}
    trace = []
    while not done():
        start = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        n = 0
        for out in outs:
            if out.seq.id in last:
                window.max_wait_s = max(window.max_wait_s, now - last[out.seq.id])
                last[out.seq.id] = now
                n += 1
        window.tokens += n
        trace.append((start, now, n))
    window.end = time.perf_counter()
    return trace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="model small, 4 decoders at 256, history 1024")
    parser.add_argument("--model", default="small,qwen2.5-0.5b-shape", help="built-in models, comma-separated")
    parser.add_argument("--decoders", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens of each decoder")
    parser.add_argument("--hist", type=int, default=4096, help="history tokens of the arriving request")
    parser.add_argument("--baseline-steps", type=int, default=20)
    parser.add_argument("--arrivals", type=int, default=4, help="T2 hits arriving one after another")
    parser.add_argument("--budget", type=int, default=EngineConfig().max_num_batched_tokens,
                        help="EngineConfig.max_num_batched_tokens")
    parser.add_argument("--loader-niceness", type=int, default=CacheConfig().loader_niceness)
    parser.add_argument("--min-decode-share", type=float, default=EngineConfig().min_decode_share,
                        help="EngineConfig.min_decode_share (0: the token budget alone)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.decoders, args.context, args.hist, args.baseline_steps, args.arrivals = "small", 4, 256, 1024, 8, 2

    console = Console() if sys.stdout.isatty() else Console(width=160)
    title = header(f"token budget {args.budget}", f"min decode share {args.min_decode_share:g}",
                   f"loader niceness {args.loader_niceness}")
    console.print(title, highlight=False)
    rows: list[Row] = []
    with blockstore_process() as (address, _), \
            BlockStoreClient(BlockStoreClientConfig(address=address, timeout_s=60)) as client:
        for name in args.model.split(","):
            config, model, digest = builtin_model(name)
            spec = kv_spec(config, f"builtin-{name}", digest, block_size=16)
            gen = args.baseline_steps + 1024  # the decoders never run out during the arrival
            blocks = args.decoders * -(-(args.context + gen) // 16) + 2 * -(-(args.hist + TURN) // 16) + 16

            def engine(remote=None) -> Engine:
                cache = TieredKVCache(spec, CacheConfig(t0_blocks=blocks, t1_blocks=blocks,
                                                        loader_niceness=args.loader_niceness), remote=remote)
                return Engine(model, cache, EngineConfig(max_num_seqs=max(16, args.decoders + 1),
                                                         max_num_batched_tokens=args.budget,
                                                         min_decode_share=args.min_decode_share))

            def tokens(seed: int, n: int) -> list[int]:
                return torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()

            hists = [tokens(100 + a, args.hist) for a in range(args.arrivals)]
            writer = engine(remote=client)  # another worker: its histories reach T2
            writer.generate(hists, SamplingParams(max_tokens=1, ignore_eos=True))
            writer.cache.close()
            arrivals = {"T2 hit": [h + tokens(2, TURN) for h in hists], "uncached": [tokens(3, args.hist + TURN)]}
            for kind, prompts in arrivals.items():
                e = engine(remote=client)
                e.generate([tokens(4, 64)], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
                decoders = [e.add_request(tokens(10 + i, args.context), SamplingParams(max_tokens=gen, ignore_eos=True))
                            for i in range(args.decoders)]
                while any(s.first_token_at is None for s in decoders):
                    e.step()
                base = Window(start=time.perf_counter())
                steps = iter(range(args.baseline_steps))
                step_until(e, decoders, lambda: next(steps, None) is None, base)
                during, in_load, arrived = Window(), [], []
                for prompt in prompts:
                    window = Window(start=time.perf_counter())
                    arrival = e.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
                    trace = step_until(e, decoders, lambda: arrival.first_token_at is not None, window)
                    if (kind == "T2 hit") != bool(arrival.usage.cached_tokens[2]):
                        console.print(f"[red]warning[/]: the T2 hit was not loaded, or a miss was ({arrival.usage})")
                    # The load's window: the steps that started while it was in flight.
                    load = [(end, n) for start, end, n in trace if start < window.start + arrival.usage.load_s]
                    if load:
                        in_load.append((load[-1][0] - window.start, sum(n for _, n in load)))
                    during.tokens += window.tokens
                    during.end += window.end - window.start
                    during.max_wait_s = max(during.max_wait_s, window.max_wait_s)
                    arrived.append(arrival)
                    gap = iter(range(2))  # two plain decode steps between arrivals
                    step_until(e, decoders, lambda: next(gap, None) is None, Window(start=time.perf_counter()))
                if any(s.finish_reason is not None for s in decoders):
                    console.print("[red]warning[/]: decoders finished early")
                load_tps = (sum(n for _, n in in_load) / sum(t for t, _ in in_load)
                            if kind == "T2 hit" and in_load else None)
                median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
                rows.append(Row(name, kind, args.decoders, args.context, args.hist, len(prompts), base.tokens_per_s,
                                load_tps, during.tokens_per_s, median([a.usage.ttft_s for a in arrived]),
                                median([a.usage.load_s for a in arrived]), base.max_wait_s, during.max_wait_s,
                                [sum(a.usage.cached_tokens[t] for a in arrived) // len(arrived) for t in range(3)]))
                for s in decoders:
                    e.abort(s)
                e.cache.close()
                r = rows[-1]
                console.print(f"{name} {kind}: baseline {r.baseline_tps:.1f} tok/s, during {r.arrival_tps:.1f}, "
                              f"TTFT {r.ttft_s * 1e3:.0f} ms, cached {r.cached}", highlight=False)

    table = Table(title=f"Decoders' tokens/s while a request of {args.hist} + {TURN} tokens arrives",
                  title_justify="left")
    for col in ("model", "arrivals", "decoders x context", "baseline tok/s", "during load", "arrival -> 1st token",
                "TTFT ms (median)", "load ms (median)", "max wait ms (baseline / during)", "cached T0/T1/T2"):
        table.add_column(col, justify="right")
    for r in rows:
        pct = lambda v: "-" if v is None else f"{v:.1f} ({v / r.baseline_tps:.0%})"  # noqa: E731
        table.add_row(r.model, f"{r.arrivals} x {r.arrival}", f"{r.decoders} x {r.context}", f"{r.baseline_tps:.1f}", pct(r.load_tps),
                      pct(r.arrival_tps), f"{r.ttft_s * 1e3:.0f}", f"{r.load_s * 1e3:.0f}",
                      f"{r.baseline_wait_s * 1e3:.0f} / {r.arrival_wait_s * 1e3:.0f}", "/".join(map(str, r.cached)))
    console.print(table)
    for r in rows:
        if r.arrival == "T2 hit" and r.load_tps is not None:
            ok, what, target = r.load_tps >= 0.6 * r.baseline_tps, f"{r.load_tps / r.baseline_tps:.0%} during the T2 load", 0.6
        elif r.arrival == "uncached":
            ok, what, target = (r.arrival_tps >= 0.4 * r.baseline_tps,
                                f"{r.arrival_tps / r.baseline_tps:.0%} during the uncached prefill", 0.4)
        else:
            continue
        console.print(f"verdict: {'[green]PASS' if ok else '[red]FAIL'}[/] {r.model}: decoders keep {what} "
                      f"(target >= {target:.0%})", highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": title, "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
