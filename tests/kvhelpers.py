"""Shared test helpers: a tiny KV spec and KV content derived from a block's hash, so that any
copy of a block can be checked against what was committed under that hash."""
from __future__ import annotations

import torch
from fakes import MemoryRemote

from kvstore.cache import CacheConfig, TieredKVCache
from kvstore.hashing import PrefixHasher
from kvstore.spec import KVSpec

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_size=4, model_id="test")


def content(block_hash: bytes, spec: KVSpec = SPEC) -> torch.Tensor:
    """Deterministic KV of a block, [layers, 2, block_size, heads, head_dim]."""
    g = torch.Generator().manual_seed(int.from_bytes(block_hash[:8], "little"))
    return torch.randn(spec.block_shape, generator=g).to(spec.dtype)


def write_block(cache: TieredKVCache, slot: int, block_hash: bytes) -> None:
    cache.t0.kv[:, :, slot] = content(block_hash, cache.spec)


def t0_holds(cache: TieredKVCache, slot: int, block_hash: bytes) -> bool:
    return torch.equal(cache.t0.kv[:, :, slot].view(torch.int16), content(block_hash, cache.spec).view(torch.int16))


def t1_holds(cache: TieredKVCache, slot: int, block_hash: bytes) -> bool:
    return torch.equal(cache.t1.kv[slot].view(torch.int16), content(block_hash, cache.spec).view(torch.int16))


def prefix(tokens, namespace: str = "tenant", spec: KVSpec = SPEC) -> PrefixHasher:
    p = PrefixHasher.for_namespace(spec.fingerprint, namespace, spec.block_size)
    p.extend(tokens)
    return p


def prefill(cache: TieredKVCache, p: PrefixHasher) -> list[int]:
    """What an engine does for a new sequence: load the cached prefix, allocate the rest,
    write KV for the computed blocks, commit the full ones. Returns the pinned block table."""
    hit = cache.lookup(p)
    loaded = cache.load(p, hit)
    n_blocks = -(-p.num_tokens // cache.spec.block_size)
    table = loaded.block_table + cache.allocate(n_blocks - loaded.num_blocks)
    for i in range(loaded.num_blocks, n_blocks):
        if i < p.num_full_blocks:
            write_block(cache, table[i], p.hashes[i])
            cache.commit(p, i, table[i])
    return table


def make(t0=8, t1=16, remote=None, **kw) -> TieredKVCache:
    kw.setdefault("t0_t1_policy", "write_back")  # spills are explicit in these tests
    return TieredKVCache(SPEC, CacheConfig(t0_blocks=t0, t1_blocks=t1, **kw), remote=remote)


def evict_all_t0(cache: TieredKVCache) -> None:
    slots = cache.allocate(cache.config.t0_blocks)
    cache.release(slots)


def seed_remote(remote: MemoryRemote, p) -> None:
    """Another worker computes ``p`` and its blocks reach T2 (spill to T1, write-through)."""
    with make(t0=p.num_full_blocks + 1, t1=p.num_full_blocks, remote=remote) as other:
        other.release(prefill(other, p))
        evict_all_t0(other)
        other.flush()
        assert other.stats().t2_put_blocks == p.num_full_blocks
