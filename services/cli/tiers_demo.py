"""A demonstration of the tiers: multi-turn sessions sharing a system prompt, served by two
workers, each with a ``TieredKVCache`` whose T0 is too small for all sessions. Sessions move
between the workers from turn to turn, so their history comes back from T0 (same worker, still
hot), T1 (same worker, spilled) or T2 (the other worker's blocks, through the block store
service and an embedded Redis).

No model runs here: "prefill" writes synthetic KV derived from each block's hash, and every
reused block is checked byte for byte against what was committed under its hash
(``kvstore demo`` runs the real engine).
"""
from __future__ import annotations

import random
import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from kvstore.blockstore_client import BlockStoreClient, BlockStoreClientConfig
from kvstore.cache import CacheConfig, Tier, TieredKVCache
from kvstore.hashing import PrefixHasher
from kvstore.spec import KVSpec
from services.blockstore.server import BlockStoreConfig, BlockStoreThread

# The KV shape of Qwen2.5-0.5B: 24 layers, 2 KV heads of 64, bf16; 16-token blocks (192 KiB).
DEMO_SPEC = KVSpec(24, 2, 64, torch.bfloat16, 16, model_id="demo-qwen2.5-0.5b-shape")


@dataclass(slots=True)
class DemoConfig:
    sessions: int = 4
    turns: int = 4
    system_prompt_tokens: int = 384
    user_tokens: int = 48
    reply_tokens: int = 64
    t0_blocks: int = 64
    t1_blocks: int = 512
    workers: int = 2
    t2: bool = True  # start the block store (embedded Redis) as the shared cold tier
    seed: int = 0


def _kv_for(block_hash: bytes) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(block_hash[:8], "little"))
    return torch.randn(DEMO_SPEC.block_shape, generator=g).to(DEMO_SPEC.dtype)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict[str, int]:
    """Run the demo, print a table per turn and a summary; return the totals."""
    console = console or Console(width=max(Console().width, 110))
    rng = random.Random(cfg.seed)
    spec = DEMO_SPEC
    system = [rng.randrange(32000) for _ in range(cfg.system_prompt_tokens)]
    histories = [PrefixHasher.for_namespace(spec.fingerprint, "demo", spec.block_size) for _ in range(cfg.sessions)]
    for h in histories:
        h.extend(system)
    table = Table(title=f"{cfg.sessions} sessions x {cfg.turns} turns on {cfg.workers} workers; "
                        f"per worker T0 {cfg.t0_blocks} blocks, T1 {cfg.t1_blocks} blocks")
    for col in ("turn", "session", "worker", "prompt tok", "T0 hit", "T1 hit", "T2 hit", "computed", "T1->T0 MiB", "T2->T1 MiB"):
        table.add_column(col, justify="right")
    totals = {"prompt": 0, "t0": 0, "t1": 0, "t2": 0, "computed": 0, "verified_blocks": 0}
    mib = 1 << 20
    start = time.perf_counter()
    cache_cfg = CacheConfig(t0_blocks=cfg.t0_blocks, t1_blocks=cfg.t1_blocks)
    with ExitStack() as stack:
        address = None
        if cfg.t2:
            server = stack.enter_context(BlockStoreThread(BlockStoreConfig(port=0, embedded_maxmemory="512mb")))
            address = server.address
            console.print(f"T2: block store on {address}, embedded Redis at {server.server.redis_url}")
        workers = []
        for _ in range(cfg.workers):
            client = stack.enter_context(BlockStoreClient(BlockStoreClientConfig(address=address))) if address else None
            workers.append(stack.enter_context(TieredKVCache(spec, cache_cfg, remote=client)))
        for turn in range(cfg.turns):
            for s, seq in enumerate(histories):
                w = (s + turn) % len(workers)  # sessions move between workers each turn
                cache = workers[w]
                seq.extend(rng.randrange(32000) for _ in range(cfg.user_tokens))
                before = cache.stats()
                loaded = cache.load(seq, cache.lookup(seq))
                for i, slot in enumerate(loaded.block_table):  # reuse must be exact
                    if not torch.equal(cache.t0.block(slot).view(torch.int16), _kv_for(seq.hashes[i]).view(torch.int16)):
                        raise RuntimeError(f"block {i} of session {s} came back different")
                totals["verified_blocks"] += loaded.num_blocks
                # "Generate" the reply, then prefill the whole new tail as the next turn would.
                seq.extend(rng.randrange(32000) for _ in range(cfg.reply_tokens))
                n_blocks = -(-seq.num_tokens // spec.block_size)
                block_table = loaded.block_table + cache.allocate(n_blocks - loaded.num_blocks)
                for i in range(loaded.num_blocks, seq.num_full_blocks):
                    cache.t0.kv[:, :, block_table[i]] = _kv_for(seq.hashes[i])
                    cache.commit(seq, i, block_table[i])
                cache.release(block_table)
                after = cache.stats()
                prompt = seq.num_tokens - cfg.reply_tokens
                hits = [loaded.from_tier[t] * spec.block_size for t in Tier]
                computed = prompt - sum(hits)
                for key, value in zip(("t0", "t1", "t2"), hits):
                    totals[key] += value
                totals["prompt"] += prompt
                totals["computed"] += computed
                table.add_row(
                    str(turn + 1), str(s), str(w), str(prompt), *map(str, hits), str(computed),
                    f"{(after.promoted_bytes - before.promoted_bytes) / mib:.1f}",
                    f"{(after.t2_get_bytes - before.t2_get_bytes) / mib:.1f}",
                )
            for cache in workers:  # time passes between turns: background writes land
                cache.flush()
        stats = [cache.stats() for cache in workers]
    elapsed = time.perf_counter() - start
    console.print(table)
    reused = totals["t0"] + totals["t1"] + totals["t2"]
    console.print(
        f"reused {reused} of {totals['prompt']} prompt tokens ({reused / totals['prompt']:.0%}): "
        f"T0 {totals['t0']}, T1 {totals['t1']}, T2 {totals['t2']}; "
        f"{totals['verified_blocks']} reused blocks verified byte-exact"
    )
    console.print(
        f"moved T0->T1 {sum(s.spilled_bytes for s in stats) / mib:.1f} MiB, "
        f"T1->T0 {sum(s.promoted_bytes for s in stats) / mib:.1f} MiB, "
        f"T1->T2 {sum(s.t2_put_bytes for s in stats) / mib:.1f} MiB (encoded), "
        f"T2->T1 {sum(s.t2_get_bytes for s in stats) / mib:.1f} MiB (encoded); "
        f"evictions T0 {sum(s.evicted_t0 for s in stats)}, T1 {sum(s.evicted_t1 for s in stats)}; {elapsed:.2f} s"
    )
    return totals
