"""Engines over the built-in tiny model for the decoding-with-cache tests, their reference
runs, and clients of a block store for T2."""
from __future__ import annotations

import torch

from kvstore.blockstore_client import BlockStoreClient, BlockStoreClientConfig
from kvstore.cache import CacheConfig, TieredKVCache
from workers.engine import Engine, EngineConfig, Status
from workers.loader import builtin_model, kv_spec
from workers.sampling import SamplingParams

BLOCK = 4
ATOL = 1e-4
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
_MODEL = None


def tiny():
    """The seeded tiny model in float32 (deterministic across processes), built once."""
    global _MODEL
    if _MODEL is None:
        _MODEL = builtin_model("tiny", seed=0, dtype=torch.float32)
    return _MODEL


def make_engine(remote=None, t0: int = 64, t1: int = 64, engine: EngineConfig | None = None, **cache_kw) -> Engine:
    config, model, digest = tiny()
    spec = kv_spec(config, "builtin-tiny", digest, block_size=BLOCK)
    cache = TieredKVCache(spec, CacheConfig(t0_blocks=t0, t1_blocks=t1, **cache_kw), remote=remote)
    return Engine(model, cache, engine or EngineConfig(keep_logits=True))


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def run(engine, tokens, params=GREEDY):
    (seq,) = engine.generate([tokens], params)
    assert seq.status is Status.FINISHED and seq.error is None
    return seq


def assert_same(seq, ref):
    assert seq.output == ref.output
    assert len(seq.logits) == len(ref.logits)
    for a, b in zip(seq.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def conversation(seed=1, n1=37, n_user=11):
    """Turn 1's prompt, and a function making turn 2's prompt from turn 1's output."""
    p1 = prompt(seed, n1)
    user = prompt(seed + 100, n_user)
    return p1, lambda out1: p1 + out1 + user


def reference(tokens, params=GREEDY):
    """No reuse: a fresh engine computes everything."""
    return run(make_engine(), tokens, params)


def client(store) -> BlockStoreClient:
    return BlockStoreClient(BlockStoreClientConfig(address=store.address, timeout_s=10))
