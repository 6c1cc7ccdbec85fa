"""A worker process for the cross-process tests: prefill a prompt through a TieredKVCache
whose T2 is the real block store, or load it back and verify every block.

    python tests/t2_worker.py write|read ADDRESS TOKEN NAMESPACE N_TOKENS

Prints one JSON line: per-tier loaded blocks, blocks verified, T2 puts.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from kvhelpers import SPEC, prefill, prefix, t0_holds  # noqa: E402

from kvstore.blockstore_client import BlockStoreClient, BlockStoreClientConfig  # noqa: E402
from kvstore.cache import CacheConfig, TieredKVCache  # noqa: E402


def main() -> None:
    mode, address, token, namespace, n_tokens = sys.argv[1:6]
    p = prefix(range(int(n_tokens)), namespace=namespace)
    client = BlockStoreClient(BlockStoreClientConfig(address=address, token=token, timeout_s=10))
    # T1 write-through to T2 happens on spill, so give T0 room for the prompt only.
    n_blocks = -(-p.num_tokens // SPEC.block_size)
    cfg = CacheConfig(t0_blocks=n_blocks, t1_blocks=n_blocks)
    out: dict[str, object] = {}
    with TieredKVCache(SPEC, cfg, remote=client) as cache:
        if mode == "write":
            cache.release(prefill(cache, p))
            cache.release(cache.allocate(n_blocks))  # evict: spill to T1, write through to T2
            cache.flush()
        else:
            hit = cache.lookup(p)
            loaded = cache.load(p, hit)
            out["verified"] = sum(t0_holds(cache, s, p.hashes[i]) for i, s in enumerate(loaded.block_table))
            out["from_tier"] = loaded.from_tier
            cache.release(loaded.block_table)
        s = cache.stats()
        out.update(t2_put_blocks=s.t2_put_blocks, t2_errors=s.t2_errors, t2_corrupt=s.t2_corrupt)
    client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
