"""A/B restores through two block store processes on one Redis, passes taking turns.

For tuning the restore path on a noisy machine: two ``kvstore blockstore serve`` processes
(A and B: each from its own source tree and/or with its own KVSTORE_BLOCKSTORE_* settings)
serve the same blocks from one embedded Redis; a client restores all of them through A, then
through B, alternating (ABBA...) for ``--rounds`` rounds, so that both see the same machine
and the same Redis. Prints GB/s of raw KV bytes (median, min, max) and CPU per pass of the
client, the block store and Redis.

Run:  .venv/bin/python bench/remote_ab.py --env-b KVSTORE_BLOCKSTORE_REDIS_WINDOW_BYTES=524288
      .venv/bin/python bench/remote_ab.py --tree-a /path/to/old/checkout   # old code vs this one
"""
from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time

import torch
from common import cpu_seconds

from kvstore.blockstore_client import BlockStoreClient, BlockStoreClientConfig
from kvstore.codec import decode_block, encode_block, tensor_bytes
from kvstore.pools import HostPool
from kvstore.spec import KVSpec
from services.blockstore.server import start_blockstore_process
from services.common.embedded_redis import EmbeddedRedis, EmbeddedRedisConfig

SPEC = KVSpec(24, 2, 64, torch.bfloat16, 16, model_id="Qwen/Qwen2.5-0.5B")  # 192 KiB blocks
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_pairs(items: list[str]) -> dict[str, str]:
    pairs = dict(item.split("=", 1) for item in items if "=" in item)
    if len(pairs) != len(items):
        raise SystemExit(f"--env-a/--env-b take KEY=VALUE, got {items}")
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree-a", default=ROOT, help="source tree of block store A (default: this one)")
    parser.add_argument("--tree-b", default=ROOT, help="source tree of block store B (default: this one)")
    parser.add_argument("--env-a", action="append", default=[], metavar="KEY=VALUE", help="environment of A")
    parser.add_argument("--env-b", action="append", default=[], metavar="KEY=VALUE", help="environment of B")
    parser.add_argument("--mib", type=int, default=128, help="KV data per pass")
    parser.add_argument("--batch", type=int, default=64, help="blocks per Get (a prefix load)")
    parser.add_argument("--codec", choices=["lz4", "raw"], default="lz4")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of one A and one B pass (after a warm-up)")
    args = parser.parse_args(argv)
    envs = {"A": env_pairs(args.env_a), "B": env_pairs(args.env_b)}
    trees = {"A": os.path.abspath(args.tree_a), "B": os.path.abspath(args.tree_b)}

    n = max(args.batch, (args.mib << 20) // SPEC.bytes_per_block // args.batch * args.batch)
    data = torch.randn((n, *SPEC.block_shape)).to(SPEC.dtype)
    hashes = [secrets.token_bytes(16) for _ in range(n)]
    t1 = HostPool(SPEC, n, pin=False)
    print(f"$ {' '.join(sys.orig_argv)}\n{n} blocks of {SPEC.bytes_per_block} B per pass, batches of {args.batch}, "
          f"codec {args.codec}; A: {trees['A']} {envs['A']}; B: {trees['B']} {envs['B']}", flush=True)
    with EmbeddedRedis(EmbeddedRedisConfig(maxmemory="4gb")) as red:
        # Each runs the code of its tree: PYTHONPATH and the working directory come first.
        servers = {k: start_blockstore_process(red.url, env={"PYTHONPATH": trees[k], **envs[k]}, cwd=trees[k])
                   for k in "AB"}
        try:
            clients = {k: BlockStoreClient(BlockStoreClientConfig(address=servers[k][1], timeout_s=60)) for k in "AB"}
            blocks = [encode_block(tensor_bytes(data[i]), dtype=SPEC.dtype, shape=SPEC.block_shape,
                                   fingerprint=SPEC.fingerprint, block_hash=hashes[i], parent_hash=hashes[i],
                                   token_ids=range(16), codec=args.codec) for i in range(n)]
            for s in range(0, n, args.batch):
                clients["A"].put("bench", [(hashes[i], blocks[i]) for i in range(s, min(n, s + args.batch))])

            def restore(client: BlockStoreClient) -> None:
                for s in range(0, n, args.batch):
                    batch = hashes[s:s + args.batch]
                    got = 0
                    for k, blob in client.get_iter("bench", batch):
                        decode_block(blob, out=t1.block_bytes(s + k), expect_hash=batch[k])
                        got += 1
                    if got != len(batch):
                        raise RuntimeError("a block went missing")

            seconds: dict[str, list[float]] = {"A": [], "B": []}
            cpu: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
            for rnd in range(args.rounds + 1):  # round 0 warms up
                for k in ("AB" if rnd % 2 == 0 else "BA"):
                    pid = servers[k][0].pid
                    before = (time.process_time(), cpu_seconds(pid) or 0.0, cpu_seconds(red.pid) or 0.0)
                    t = time.perf_counter()
                    restore(clients[k])
                    elapsed = time.perf_counter() - t
                    after = (time.process_time(), cpu_seconds(pid) or 0.0, cpu_seconds(red.pid) or 0.0)
                    if rnd:
                        seconds[k].append(elapsed)
                        cpu[k].append(tuple(b - a for a, b in zip(before, after)))  # type: ignore[arg-type]
            if not torch.equal(t1.kv.view(torch.uint8).reshape(n, -1), data.view(torch.uint8).reshape(n, -1)):
                raise RuntimeError("restored KV differs from what was stored")
            nbytes = n * SPEC.bytes_per_block
            for k in "AB":
                use = [statistics.mean(c[i] for c in cpu[k]) * 1e3 for i in range(3)]
                print(f"{k}: restore {nbytes / statistics.median(seconds[k]) / 1e9:.3f} GB/s "
                      f"(min {nbytes / max(seconds[k]) / 1e9:.3f}, max {nbytes / min(seconds[k]) / 1e9:.3f}); "
                      f"CPU per pass: client {use[0]:.0f} ms, block store {use[1]:.0f} ms, redis {use[2]:.0f} ms")
            for c in clients.values():
                c.close()
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
