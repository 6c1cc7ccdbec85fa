"""Eviction policies compared on the public Mooncake traces (../shared/traces), through the
cache manager alone (no model, no service).

Each trace request is a chain of 512-token prefix blocks (`hash_ids`; equal ids mean equal
prefixes). Here one trace block is one cache block of one token (its id), followed by one
question token, so a lookup may reuse every trace block. Requests are replayed in order, one
at a time, as an engine prefills: lookup, load, allocate the rest, commit, release.
`--through cache` (default): a `TieredKVCache` with a tiny KVSpec (copies are trivial), no
T2, write-back from T0 to T1 (so the tiers mostly hold different blocks and their sum is the
capacity), T0 a quarter of the total (at least the longest request) and T1 the rest; both
tiers use the policy under test. `--through index`: one `BlockIndex` of the whole capacity,
the same request logic (a block-level simulation, as in issue 14's figures).

Reported per trace and capacity (a share of the trace's distinct blocks): the block hit ratio
of each policy, of Belady's offline optimum (computed here: evict the block whose next use
is farthest, deepest first on ties; a request hits its longest cached prefix) and of an
unbounded cache, and each as a share of the unbounded ratio; a PNG plot of the shares.

Run:  .venv/bin/python bench/policies.py [--quick] [--through cache|index] [--trace conversation synthetic]
"""
from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from pathlib import Path

import torch
from common import header
from rich.console import Console
from rich.table import Table

from kvstore.block_index import DEFAULT_EVICTION, BlockIndex, BlockMeta, Eviction
from kvstore.cache import CacheConfig, TieredKVCache, WritePolicy
from kvstore.hashing import PrefixHasher
from kvstore.spec import KVSpec

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"  # ../shared/traces
SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float16, block_size=1, model_id="policies")
QUESTION = 0  # token after the trace blocks: the one a lookup leaves to compute


def load_requests(directory: Path, name: str, n: int | None) -> list[list[int]]:
    """The first ``n`` requests (all if None) of a trace, as their block id chains."""
    path = directory / f"{name}_trace.jsonl"
    if not path.exists():
        raise SystemExit(f"trace not found: {path} (expected the shared traces beside the project)")
    with path.open() as f:
        lines = f if n is None else (line for _, line in zip(range(n), f))
        return [json.loads(line)["hash_ids"] for line in lines]


def unbounded_hits(requests: list[list[int]]) -> int:
    """Blocks an unbounded cache serves: each request's leading blocks seen before."""
    seen: set[int] = set()
    hits = 0
    for ids in requests:
        k = 0
        while k < len(ids) and ids[k] in seen:
            k += 1
        hits += k
        seen.update(ids)
    return hits


def belady_hits(requests: list[list[int]], capacity: int) -> int:
    """Blocks served by Belady's offline optimum with ``capacity`` blocks: on a miss, evict
    the cached block (not in the running request) used again farthest in the future."""
    never = len(requests)
    next_use: dict[int, int] = {}
    uses: list[list[int]] = [[] for _ in requests]  # per request, next use of each of its blocks
    for i in range(len(requests) - 1, -1, -1):
        uses[i] = [next_use.get(b, never) for b in requests[i]]
        for b in requests[i]:
            next_use[b] = i
    cached: dict[int, int] = {}  # block -> its next use
    heap: list[tuple[int, int, int]] = []  # (-next use, -depth, block); stale when next use differs
    hits = 0
    for i, ids in enumerate(requests):
        k = 0
        while k < len(ids) and ids[k] in cached:
            k += 1
        hits += k
        running = set(ids)
        deferred = []  # popped blocks of the running request, back on the heap after it
        for b in ids[k:]:
            if b in cached:
                continue
            while len(cached) >= capacity:
                entry = heapq.heappop(heap)
                victim = entry[2]
                if cached.get(victim) != -entry[0]:
                    continue
                if victim in running:
                    deferred.append(entry)
                    continue
                del cached[victim]
            cached[b] = 0
        for depth, (b, nxt) in enumerate(zip(ids, uses[i])):
            if b in cached:
                cached[b] = nxt
                heapq.heappush(heap, (-nxt, -depth, b))
        for entry in deferred:
            if cached.get(entry[2]) == -entry[0]:
                heapq.heappush(heap, entry)
    return hits


def cache_hits(requests: list[list[int]], capacity: int, eviction: Eviction) -> int:
    """Blocks served from T0 or T1 of a ``TieredKVCache`` of ``capacity`` blocks in all."""
    t0 = max(capacity // 4, max(map(len, requests)))
    config = CacheConfig(t0_blocks=t0, t1_blocks=capacity - t0, t0_t1_policy=WritePolicy.WRITE_BACK, device="cpu",
                         eviction=eviction)
    hits = 0
    with TieredKVCache(SPEC, config) as cache:
        for ids in requests:
            prefix = PrefixHasher.for_namespace(SPEC.fingerprint, "trace", 1, [*ids, QUESTION])
            loaded = cache.load(prefix, cache.lookup(prefix))
            table = loaded.block_table + cache.allocate(len(ids) - loaded.num_blocks)
            for i in range(loaded.num_blocks, len(ids)):
                cache.commit(prefix, i, table[i])
            cache.release(table)
            hits += loaded.num_blocks
        cache.check_invariants()
    return hits


def index_hits(requests: list[list[int]], capacity: int, eviction: Eviction) -> int:
    """Blocks served by one ``BlockIndex`` of ``capacity`` blocks, with ``cache_hits``' request logic."""
    index = BlockIndex(capacity, "T", eviction=eviction)
    hits = 0
    for ids in requests:
        hashes = [b.to_bytes(8, "little") for b in ids]
        table = []
        while len(table) < len(ids) and (slot := index.find(hashes[len(table)])) is not None:
            index.acquire(slot)
            index.meta(slot).hits += 1  # type: ignore[union-attr]
            table.append(slot)
        hits += len(table)
        for i, slot in enumerate(index.allocate(len(ids) - len(table))[0], start=len(table)):
            index.publish(slot, BlockMeta(hashes[i], hashes[i - 1] if i else b"", (), "trace"))
            table.append(slot)
        for slot in table:
            index.release(slot)
    index.check()
    return hits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", nargs="+", choices=["conversation", "synthetic"], default=["conversation", "synthetic"])
    ap.add_argument("--trace-dir", type=Path, default=TRACES)
    ap.add_argument("--requests", type=int, default=None, help="first N requests of each trace (default: all)")
    ap.add_argument("--capacities", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                    help="capacity (T0+T1, or the one index) as a share of the trace's distinct blocks")
    ap.add_argument("--policies", nargs="+", type=Eviction, default=list(Eviction))
    ap.add_argument("--through", choices=["cache", "index"], default="cache")
    ap.add_argument("--quick", action="store_true", help="the first 3000 requests of each trace")
    ap.add_argument("--png", default=str(Path(__file__).parent / "results" / "policies.png"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.requests = 3000
    console = Console(width=max(Console().width, 120))
    console.print(header(), highlight=False)

    names = [p.value for p in args.policies] + ["belady"]
    results: dict[str, dict] = {}  # trace -> {"unbounded": ratio, "share": {name: {capacity: share of unbounded}}}
    for trace in args.trace:
        requests = load_requests(args.trace_dir, trace, args.requests)
        total = sum(map(len, requests))
        distinct = len({b for ids in requests for b in ids})
        unbounded = unbounded_hits(requests) / total
        console.print(f"{trace}: {len(requests)} requests, {total} blocks, {distinct} distinct, "
                      f"unbounded hit ratio {unbounded:.3f}", highlight=False)
        ratios: dict[str, dict[float, float]] = {name: {} for name in names}
        for cap in args.capacities:
            capacity = round(cap * distinct)
            for name in names:
                start = time.perf_counter()
                if name == "belady":
                    hits = belady_hits(requests, capacity)
                else:
                    hits = (cache_hits if args.through == "cache" else index_hits)(requests, capacity, Eviction(name))
                ratios[name][cap] = hits / total
                console.print(f"  capacity {cap:.0%} ({capacity} blocks) {name:>7}: hit ratio {hits / total:.3f} "
                              f"= {hits / total / unbounded:.1%} of unbounded ({time.perf_counter() - start:.1f} s)",
                              highlight=False)
        results[trace] = {"requests": len(requests), "distinct_blocks": distinct, "unbounded": unbounded, "ratio": ratios}

    where = "T0+T1 of TieredKVCache" if args.through == "cache" else "one BlockIndex"
    table = Table(title=f"Block hit ratio (share of the unbounded cache's) by eviction policy and capacity ({where})")
    for col in ("trace", "capacity", *(f"{n} (default)" if n == DEFAULT_EVICTION.value else n for n in names)):
        table.add_column(col, justify="right")
    for trace, r in results.items():
        for cap in args.capacities:
            lru = r["ratio"]["lru"].get(cap) if "lru" in r["ratio"] else None
            cells = []
            for name in names:
                v = r["ratio"][name][cap]
                mark = "[red]" if lru is not None and name != "belady" and v < lru else ""
                cells.append(f"{mark}{v:.3f} ({v / r['unbounded']:.0%})")
            table.add_row(trace, f"{cap:.0%}", *cells)
    console.print(table)
    console.print("red: below LRU. Capacity is a share of the trace's distinct blocks"
                  + ("; T0 a quarter of it (at least the longest request), T1 the rest, write-back T0->T1, no T2."
                     if args.through == "cache" else "."), highlight=False)
    default = DEFAULT_EVICTION.value
    targets = {"conversation": 0.85, "synthetic": 0.55}  # issue 14, at 10% capacity
    for trace, r in results.items():
        if default not in r["ratio"] or "lru" not in r["ratio"]:
            continue
        share = {c: r["ratio"][default][c] / r["unbounded"] for c in args.capacities}
        if 0.1 in share and trace in targets:
            ok = share[0.1] >= targets[trace]
            console.print(f"verdict: {'[green]PASS' if ok else '[red]FAIL'}[/] {trace}: {default} at 10% reaches "
                          f"{share[0.1]:.1%} of the unbounded hit ratio (target >= {targets[trace]:.0%})", highlight=False)
        below = [f"{c:.0%}" for c in args.capacities if r["ratio"][default][c] < r["ratio"]["lru"][c]]
        console.print(f"verdict: {'[red]FAIL' if below else '[green]PASS'}[/] {trace}: {default} is below LRU at "
                      f"{', '.join(below) or 'no capacity tested'}", highlight=False)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib not installed (pip install -e '.[bench]'): no plot")
    else:
        fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
        for ax, (trace, r) in zip(axes[0], results.items()):
            for name in names:
                ax.plot([c * 100 for c in args.capacities], [r["ratio"][name][c] / r["unbounded"] * 100 for c in args.capacities],
                        marker="o", linestyle="--" if name == "belady" else "-", label=name)
            ax.set(xlabel=f"capacity, {where} (% of distinct blocks)", ylabel="hit ratio (% of unbounded)",
                   title=f"{trace} ({r['requests']} requests, unbounded {r['unbounded']:.3f})", ylim=(0, 105))
            ax.grid(True, alpha=0.3)
            ax.legend()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=120, bbox_inches="tight")
        console.print(f"plot: {args.png}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
