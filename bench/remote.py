"""Benchmark the cold tier (T2) end to end against raw Redis and raw lz4, in one run.

Full path, as the tiered cache uses it, in batches of ``--batch`` blocks:
  store   = encode_block (codec) -> BlockStoreClient.put -> gRPC -> block store -> Redis
  restore = BlockStoreClient.get_iter <- gRPC <- block store <- Redis -> decode_block into T1 slots
            (blocks decoded as they arrive, as TieredKVCache._fetch_remote does)
The block store runs as its own process (``kvstore blockstore serve``), as in production,
on an embedded redis-server; client, service and Redis share this machine's cores.
Baselines on the same bytes: redis-py pipelined SET / GET of the raw blocks (same batches,
same Redis), and lz4.frame compress / decompress of the raw blocks.
The lossy codecs (int8, fp8) store the same KV under their own ``KVSpec(kv_codec=...)`` and
restore into their own T1 pool, checked against a local decode of the same encoded blocks.
GB/s are of raw KV bytes (before compression or quantization); GB = 1e9 bytes. Each figure is the median
of ``--reps`` passes; restore passes of the baselines and of the full path take turns, so
that a drifting machine or Redis moves all of them alike.

Run:  .venv/bin/python bench/remote.py [--quick] [--mib N] [--codec lz4|raw|int8|fp8] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable

import lz4.frame
import numpy as np
import redis
import torch
from common import blockstore_process, cpu_seconds, header, median_time
from rich.console import Console
from rich.table import Table

from kvstore.allocator import keep_freed_memory
from kvstore.blockstore_client import BlockStoreClient, BlockStoreClientConfig
from kvstore.codec import decode_block, encode_block, tensor_bytes
from kvstore.pools import HostPool
from kvstore.spec import KVSpec

SPEC = KVSpec(24, 2, 64, torch.bfloat16, 16, model_id="Qwen/Qwen2.5-0.5B")  # 192 KiB blocks
NAMESPACE = "bench"
CODECS = ("lz4", "raw", "int8", "fp8")
LOSSY = ("int8", "fp8")
INT8_TARGET = 1.2  # issue 13: int8 restore >= 1.2x the raw codec's, in raw-KV GB/s
CPU_TARGET = 1.5  # issue 13: CPU of all processes per restored byte (raw, lz4) <= 1.5x raw redis-py GET's


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB, 3 passes")
    parser.add_argument("--mib", type=int, default=256, help="KV data per pass (default 256 MiB)")
    parser.add_argument("--batch", type=int, default=64, help="blocks per call (a prefix load)")
    parser.add_argument("--codec", choices=CODECS, action="append", help="default: all")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    mib, reps = (32, 3) if args.quick else (args.mib, args.reps)
    codecs = args.codec or list(CODECS)
    specs = {c: dataclasses.replace(SPEC, kv_codec=c) if c in LOSSY else SPEC for c in codecs}

    n = max(args.batch, (mib << 20) // SPEC.bytes_per_block // args.batch * args.batch)
    nbytes = n * SPEC.bytes_per_block
    data = torch.randn((n, *SPEC.block_shape)).to(SPEC.dtype)
    blocks = [tensor_bytes(data[i]) for i in range(n)]
    raw = [b.tobytes() for b in blocks]
    batches = [range(i, min(i + args.batch, n)) for i in range(0, n, args.batch)]
    t1 = {c: HostPool(specs[c], n, pin=False) for c in codecs}  # a lossy codec's slots hold its own output
    console = Console() if sys.stdout.isatty() else Console(width=140)
    title = header(f"{n} blocks of {SPEC.bytes_per_block} B ({nbytes / 2**20:.0f} MiB) per pass",
                   f"batches of {args.batch}", f"median of {reps}")
    console.print(title, highlight=False)

    results: dict[str, float] = {}
    restore_cpu: dict[str, dict[str, float]] = {}  # path -> process -> CPU seconds per pass
    pids: dict[str, int] = {}
    # The client tunes glibc's allocator for the whole process (kvstore.allocator); apply it
    # first, so that the redis-py baselines run under it too (it makes them faster, not slower).
    keep_freed_memory()
    with blockstore_process(pids=pids) as (address, redis_url):
        r = redis.Redis.from_url(redis_url)
        client = BlockStoreClient(BlockStoreClientConfig(address=address, timeout_s=60))
        keys = [f"raw:{i}".encode() for i in range(n)]
        hashes = {codec: [secrets.token_bytes(16) for _ in range(n)] for codec in codecs}
        enc: dict[str, list[bytes]] = {codec: [] for codec in codecs}

        def raw_set() -> None:
            for b in batches:
                pipe = r.pipeline(transaction=False)
                for i in b:
                    pipe.set(keys[i], raw[i])
                pipe.execute()

        def raw_get() -> None:
            for b in batches:
                pipe = r.pipeline(transaction=False)
                for i in b:
                    pipe.get(keys[i])
                for i, v in zip(b, pipe.execute()):
                    if len(v) != len(raw[i]):
                        raise RuntimeError("raw GET returned the wrong value")

        def store(codec: str) -> None:
            enc[codec].clear()
            for b in batches:
                chunk = [encode_block(blocks[i], dtype=SPEC.dtype, shape=SPEC.block_shape,
                                      fingerprint=specs[codec].fingerprint, block_hash=hashes[codec][i],
                                      parent_hash=hashes[codec][i], token_ids=range(16), codec=codec)
                         for i in b]
                client.put(NAMESPACE, [(hashes[codec][i], c) for i, c in zip(b, chunk)])
                enc[codec].extend(chunk)

        def restore(codec: str) -> None:
            for b in batches:
                got = 0
                for k, blob in client.get_iter(NAMESPACE, [hashes[codec][i] for i in b]):
                    decode_block(blob, out=t1[codec].block_bytes(b[k]), expect_hash=hashes[codec][b[k]])
                    got += 1
                if got != len(b):
                    raise RuntimeError("block store lost a block")

        # Stores: each pass writes into an emptied keyspace.
        results["redis SET"] = median_time(raw_set, reps, before=lambda: r.delete(*keys))
        frames = [lz4.frame.compress(b) for b in raw]
        results["lz4 compress"] = median_time(lambda: [lz4.frame.compress(b) for b in raw], reps)
        for codec in codecs:
            results[f"{codec} store"] = median_time(lambda c=codec: store(c), reps,
                                                    before=lambda c=codec: client.delete(NAMESPACE, hashes[c]))
            results[f"{codec} ratio"] = nbytes / sum(map(len, enc[codec]))

        # Restores: the baselines and the full path take turns, one pass each, in an order
        # that rotates every round, so that all of them see the same Redis (whose speed
        # drifts with its memory state) and the same moments of this noisy machine.
        paths: dict[str, Callable[[], None]] = {
            "redis GET": raw_get,
            "lz4 decompress": lambda: [lz4.frame.decompress(f) for f in frames],
            **{f"{codec} restore": (lambda c=codec: restore(c)) for codec in codecs},
        }
        times: dict[str, list[float]] = {k: [] for k in paths}
        cpu: dict[str, dict[str, float]] = {k: {} for k in paths}
        names = list(paths)
        for rnd in range(reps + 1):  # round 0 warms up
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                before = {"client": time.process_time(), **{k: cpu_seconds(p) for k, p in pids.items()}}
                t = time.perf_counter()
                paths[name]()
                elapsed = time.perf_counter() - t
                after = {"client": time.process_time(), **{k: cpu_seconds(p) for k, p in pids.items()}}
                if rnd:
                    times[name].append(elapsed)
                    for k in before:
                        if before[k] is not None and after[k] is not None:
                            cpu[name][k] = cpu[name].get(k, 0.0) + (after[k] - before[k]) / reps
        results.update({k: statistics.median(v) for k, v in times.items()})
        restore_cpu = {k: cpu[k] for k in ("redis GET", *(f"{c} restore" for c in codecs))}
        for codec in codecs:
            want = (np.concatenate([decode_block(e)[1] for e in enc[codec]]) if codec in LOSSY
                    else data.view(torch.uint8).numpy().reshape(-1))
            if not np.array_equal(t1[codec].kv.view(torch.uint8).numpy().reshape(-1), want):
                raise RuntimeError(f"restored KV differs from what was stored (codec {codec})")
        client.close()

    gbs = {k: nbytes / v / 1e9 for k, v in results.items() if not k.endswith("ratio")}
    slower_restore_base = min(gbs["redis GET"], gbs["lz4 decompress"])
    table = Table(title="T2 store / restore, full path vs raw baselines (GB/s of raw KV bytes)", title_justify="left")
    for col in ("path", "store GB/s", "restore GB/s", "bytes stored / raw", "restore vs slower baseline"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for codec in codecs:
        table.add_row(f"kvstore, codec {codec}", f"{gbs[f'{codec} store']:.2f}", f"{gbs[f'{codec} restore']:.2f}",
                      f"{1 / results[f'{codec} ratio']:.3f}", f"{gbs[f'{codec} restore'] / slower_restore_base:.0%}")
    table.add_row("raw redis-py pipelined SET / GET", f"{gbs['redis SET']:.2f}", f"{gbs['redis GET']:.2f}", "1.000", "")
    table.add_row("raw lz4.frame compress / decompress", f"{gbs['lz4 compress']:.2f}", f"{gbs['lz4 decompress']:.2f}",
                  f"{sum(map(len, frames)) / nbytes:.3f}", "")
    console.print(table)
    for codec in codecs:
        pct = gbs[f"{codec} restore"] / slower_restore_base
        console.print(f"verdict: {'[green]PASS' if pct >= 0.5 else '[red]FAIL'}[/] restore with codec {codec} reaches "
                      f"{pct:.0%} of the slower of raw redis GET and raw lz4 decompress (target >= 50%)", highlight=False)
    if "int8" in codecs and "raw" in codecs:
        x = gbs["int8 restore"] / gbs["raw restore"]
        console.print(f"verdict: {'[green]PASS' if x >= INT8_TARGET else '[red]FAIL'}[/] restore with codec int8 runs "
                      f"{x:.2f}x the raw codec's, in raw-KV GB/s (target >= {INT8_TARGET}x)", highlight=False)
    for path, use in restore_cpu.items():
        console.print(f"CPU per pass, {path} (mean of {reps}): "
                      + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in use.items())
                      + f"; total {sum(use.values()) * 1000:.0f} ms against {results[path] * 1000:.0f} ms "
                      f"of wall time on {os.cpu_count()} CPUs", highlight=False)
    for codec in ("raw", "lz4"):
        if codec in codecs:
            x = sum(restore_cpu[f"{codec} restore"].values()) / sum(restore_cpu["redis GET"].values())
            console.print(f"verdict: {'[green]PASS' if x <= CPU_TARGET else '[red]FAIL'}[/] restore with codec {codec} "
                          f"takes {x:.2f}x the CPU (all processes) of raw redis GET per pass (target <= {CPU_TARGET}x)",
                          highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": title, "seconds": results, "gbs": gbs, "restore_cpu_seconds": restore_cpu},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
