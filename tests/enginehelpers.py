"""Engines over the built-in tiny model for the decoding-with-cache tests."""
from __future__ import annotations

import torch

from kvstore.cache import CacheConfig, TieredKVCache
from workers.engine import Engine, EngineConfig
from workers.loader import builtin_model, kv_spec
from workers.sampling import SamplingParams

BLOCK = 4
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
_MODEL = None


def tiny():
    """The seeded tiny model in float32 (deterministic across processes), built once."""
    global _MODEL
    if _MODEL is None:
        _MODEL = builtin_model("tiny", seed=0, dtype=torch.float32)
    return _MODEL


def make_engine(remote=None, t0: int = 64, t1: int = 64, **cache_kw) -> Engine:
    config, model, digest = tiny()
    spec = kv_spec(config, "builtin-tiny", digest, block_size=BLOCK)
    cache = TieredKVCache(spec, CacheConfig(t0_blocks=t0, t1_blocks=t1, **cache_kw), remote=remote)
    return Engine(model, cache, EngineConfig(keep_logits=True))


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()
