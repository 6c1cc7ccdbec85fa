"""Benchmark the cold tier (T2) end to end against raw Redis and raw lz4, in one run.

Full path, as the tiered cache uses it, in batches of ``--batch`` blocks:
  store   = encode_block (codec) -> BlockStoreClient.put -> gRPC -> block store -> Redis
  restore = BlockStoreClient.get_iter <- gRPC <- block store <- Redis -> decode_block into T1 slots
            (blocks decoded as they arrive, as TieredKVCache._fetch_remote does)
The block store runs as its own process (``kvstore blockstore serve``), as in production,
on an embedded redis-server; client, service and Redis share this machine's cores.
Baselines on the same bytes: redis-py pipelined SET / GET of the raw blocks (same batches,
same Redis), and lz4.frame compress / decompress of the raw blocks.
GB/s are of raw KV bytes (before compression); GB = 1e9 bytes. Each figure is the median
of ``--reps`` passes.

Run:  .venv/bin/python bench/remote.py [--quick] [--mib N] [--codec lz4|raw] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import sys
import time

import lz4.frame
import numpy as np
import redis
import torch
from rich.console import Console
from rich.table import Table

from kvstore.blockstore_client import BlockStoreClient
from kvstore.codec import decode_block, encode_block, tensor_bytes
from kvstore.config import BlockStoreClientConfig
from kvstore.pools import HostPool
from kvstore.spec import KVSpec
from common import blockstore_process, cpu_seconds, median_time

SPEC = KVSpec(24, 2, 64, torch.bfloat16, 16, model_id="Qwen/Qwen2.5-0.5B")  # 192 KiB blocks
NAMESPACE = "bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB, 3 passes")
    parser.add_argument("--mib", type=int, default=256, help="KV data per pass (default 256 MiB)")
    parser.add_argument("--batch", type=int, default=64, help="blocks per call (a prefix load)")
    parser.add_argument("--codec", choices=["lz4", "raw"], action="append", help="default: both")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    mib, reps = (32, 3) if args.quick else (args.mib, args.reps)
    codecs = args.codec or ["lz4", "raw"]

    n = max(args.batch, (mib << 20) // SPEC.bytes_per_block // args.batch * args.batch)
    nbytes = n * SPEC.bytes_per_block
    data = torch.randn((n, *SPEC.block_shape)).to(SPEC.dtype)
    blocks = [tensor_bytes(data[i]) for i in range(n)]
    raw = [b.tobytes() for b in blocks]
    batches = [range(i, min(i + args.batch, n)) for i in range(0, n, args.batch)]
    t1 = HostPool(SPEC, n, pin=False)
    console = Console() if sys.stdout.isatty() else Console(width=140)
    header = (f"$ {shlex.join(sys.orig_argv)} | {platform.platform()}, {os.cpu_count()} CPUs, "
              f"{n} blocks of {SPEC.bytes_per_block} B ({nbytes / 2**20:.0f} MiB) per pass, "
              f"batches of {args.batch}, median of {reps}")
    console.print(header, highlight=False)

    results: dict[str, float] = {}
    restore_cpu: dict[str, dict[str, float]] = {}  # codec -> process -> CPU seconds per restore pass
    pids: dict[str, int] = {}
    with blockstore_process(pids=pids) as (address, redis_url):
        r = redis.Redis.from_url(redis_url)
        keys = [f"raw:{i}".encode() for i in range(n)]

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

        # An extra row: GET with glibc's default malloc, before the client tunes it for the
        # whole process (kvstore.allocator). Everything below, the baselines included, runs
        # under the client's settings.
        raw_set()
        results["redis GET, default malloc"] = median_time(raw_get, reps)
        client = BlockStoreClient(BlockStoreClientConfig(address=address, timeout_s=60))
        results["redis SET"] = median_time(raw_set, reps)
        results["redis GET"] = median_time(raw_get, reps)
        r.delete(*keys)
        frames = [lz4.frame.compress(b) for b in raw]
        results["lz4 compress"] = median_time(lambda: [lz4.frame.compress(b) for b in raw], reps)
        results["lz4 decompress"] = median_time(lambda: [lz4.frame.decompress(f) for f in frames], reps)

        for codec in codecs:
            hashes = [secrets.token_bytes(16) for _ in range(n)]
            enc: list[bytes] = []

            def store() -> None:
                enc.clear()
                for b in batches:
                    chunk = [encode_block(blocks[i], dtype=SPEC.dtype, shape=SPEC.block_shape,
                                          fingerprint=SPEC.fingerprint, block_hash=hashes[i],
                                          parent_hash=hashes[i], token_ids=range(16), codec=codec)
                             for i in b]
                    client.put(NAMESPACE, [(hashes[i], c) for i, c in zip(b, chunk)])
                    enc.extend(chunk)

            def restore() -> None:
                for b in batches:
                    got = 0
                    for k, blob in client.get_iter(NAMESPACE, [hashes[i] for i in b]):
                        decode_block(blob, out=t1.block_bytes(b[k]), expect_hash=hashes[b[k]])
                        got += 1
                    if got != len(b):
                        raise RuntimeError("block store lost a block")

            def clear() -> None:
                client.delete(NAMESPACE, hashes)

            results[f"{codec} store"] = median_time(store, reps, before=clear)
            store()
            results[f"{codec} restore"] = median_time(restore, reps)
            # CPU of each process over extra restore passes: the path shares this machine's
            # cores, so where the CPU goes bounds what it can reach.
            before = {"client": time.process_time(), **{k: cpu_seconds(p) for k, p in pids.items()}}
            for _ in range(reps):
                restore()
            after = {"client": time.process_time(), **{k: cpu_seconds(p) for k, p in pids.items()}}
            restore_cpu[codec] = {k: (after[k] - before[k]) / reps for k in before
                                  if before[k] is not None and after[k] is not None}
            if not np.array_equal(t1.kv.view(torch.uint8).numpy(), data.view(torch.uint8).numpy()):
                raise RuntimeError("restored KV differs from what was stored")
            results[f"{codec} ratio"] = nbytes / sum(map(len, enc))
            clear()
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
    untuned_base = min(gbs["redis GET, default malloc"], gbs["lz4 decompress"])
    vs_untuned = ", ".join(f"{c} {gbs[f'{c} restore'] / untuned_base:.0%}" for c in codecs)
    table.add_row("  GET with glibc's default malloc", "", f"{gbs['redis GET, default malloc']:.2f}", "1.000",
                  f"(kvstore vs this: {vs_untuned})")
    table.add_row("raw lz4.frame compress / decompress", f"{gbs['lz4 compress']:.2f}", f"{gbs['lz4 decompress']:.2f}",
                  f"{sum(map(len, frames)) / nbytes:.3f}", "")
    console.print(table)
    for codec in codecs:
        pct = gbs[f"{codec} restore"] / slower_restore_base
        console.print(f"verdict: {'[green]PASS' if pct >= 0.5 else '[red]FAIL'}[/] restore with codec {codec} reaches "
                      f"{pct:.0%} of the slower of raw redis GET and raw lz4 decompress (target >= 50%)", highlight=False)
    for codec, cpu in restore_cpu.items():
        console.print(f"CPU per restore pass, codec {codec} (mean of {reps}): "
                      + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in cpu.items())
                      + f"; total {sum(cpu.values()) * 1000:.0f} ms against {results[f'{codec} restore'] * 1000:.0f} ms "
                      f"of wall time on {os.cpu_count()} CPUs", highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "seconds": results, "gbs": gbs, "restore_cpu_seconds": restore_cpu},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
