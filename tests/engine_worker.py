"""Second process for the cross-process decoding test: run a conversation's first turn on an
engine whose T2 is the block store, so its blocks land there.

    python tests/engine_worker.py ADDRESS PROMPT_SEED PROMPT_LEN
Prints the generated token ids as JSON.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from enginehelpers import GREEDY, make_engine, prompt  # noqa: E402

from kvstore.blockstore_client import BlockStoreClient, BlockStoreClientConfig  # noqa: E402

address, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with BlockStoreClient(BlockStoreClientConfig(address=address, timeout_s=10)) as client:
    engine = make_engine(remote=client)
    (seq,) = engine.generate([prompt(seed, n)], GREEDY)
    engine.cache.close()  # flushes the write-through to T2
    print(json.dumps(seq.output))
