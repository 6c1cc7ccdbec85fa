"""Shared test helpers: a tiny KV spec and KV content derived from a block's hash, so that any
copy of a block can be checked against what was committed under that hash."""
from __future__ import annotations

import torch

from kvstore.cache import TieredKVCache
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
