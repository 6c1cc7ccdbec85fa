"""Block identity: chained prefix hashes (kvstore.hashing).

Covers: determinism across processes (different PYTHONHASHSEED), separation by namespace,
model fingerprint, token order, chaining and block boundaries, full-blocks-only hashing,
incremental == one-shot hashing, fork semantics, and input validation.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.hashing import HASH_SIZE, MAX_TOKEN_ID, PrefixHasher, block_hash, root_hash, token_bytes
from kvstore.spec import KVSpec

REPO = Path(__file__).resolve().parents[1]

BASE_SPEC = KVSpec(
    num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, block_size=8,
    model_id="org/model-7b", weights_digest="sha256:abc123", tp_rank=0, tp_size=2,
)
FP = BASE_SPEC.fingerprint
NS = "tenant-a"
NON_ASCII_NS = "t\u00e9nant-\u00fc\u00df-\u6771\u4eac-\U0001f600"  # é ü ß 東京 😀

# Token stream used by the cross-process test: includes 0 and the largest valid id.
DET_TOKENS = [0, 1, 2, 3, MAX_TOKEN_ID, 65535, 65536, 7] + list(range(1000, 1020)) + [5, 6, 7]


def chain_hashes(root: bytes, tokens, block_size: int) -> list[bytes]:
    """Hashes of every full block of ``tokens`` after ``root``."""
    prefix = PrefixHasher(root, block_size)
    prefix.extend(tokens)
    return prefix.hashes


def _chain_hex(fingerprint: bytes, namespace: str, tokens: list[int], block_size: int) -> list[str]:
    return [h.hex() for h in chain_hashes(root_hash(fingerprint, namespace), tokens, block_size)]


# --------------------------------------------------------------------------------------
# Determinism across processes
# --------------------------------------------------------------------------------------

_CHILD_CODE = """
import sys
import torch
from kvstore.hashing import PrefixHasher, root_hash
from kvstore.spec import KVSpec
def chain_hashes(root, tokens, block_size):
    prefix = PrefixHasher(root, block_size)
    prefix.extend(tokens)
    return prefix.hashes
spec = KVSpec(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, block_size=8,
              model_id="org/model-7b", weights_digest="sha256:abc123", tp_rank=0, tp_size=2)
tokens = {tokens!r}
for ns in {namespaces}:
    root = root_hash(spec.fingerprint, ns)
    print(spec.fingerprint.hex(), root.hex(), *[h.hex() for h in chain_hashes(root, tokens, 8)])
    print(*[h.hex() for h in chain_hashes(root, tokens, 4)])
"""


def _expected_child_output(namespaces: list[str]) -> str:
    lines = []
    for ns in namespaces:
        root = root_hash(FP, ns)
        lines.append(" ".join([FP.hex(), root.hex(), *_chain_hex(FP, ns, DET_TOKENS, 8)]))
        lines.append(" ".join(_chain_hex(FP, ns, DET_TOKENS, 4)))
    return "\n".join(lines) + "\n"


def test_hashes_identical_across_processes_with_different_hash_seeds():
    namespaces = [NS, NON_ASCII_NS]
    # ascii() keeps the child's source pure ASCII, so the locale cannot alter the namespace.
    code = _CHILD_CODE.format(tokens=DET_TOKENS, namespaces=ascii(namespaces))
    procs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
        ))
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1]
    assert outputs[0] == _expected_child_output(namespaces)
    # Sanity: the output is what we think it is (4 + 8 lines' worth of hashes, not empty).
    first = outputs[0].splitlines()[0].split()
    assert len(first) == 2 + len(DET_TOKENS) // 8
    assert all(len(h) == 2 * HASH_SIZE for h in first)


def test_hashes_follow_documented_definition():
    """root and block hashes are exactly the blake2b constructions the module documents."""
    root = root_hash(b"\x00" * 16, "ns")
    hashes = chain_hashes(root, list(range(8)), 4)
    # Recompute by hand from the documented definition to pin the scheme.
    import hashlib

    h = hashlib.blake2b(digest_size=16, person=b"kvstore-root")
    h.update((1).to_bytes(2, "little") + (16).to_bytes(2, "little") + b"\x00" * 16 + b"ns")
    assert root == h.digest()
    parent = root
    for i in range(2):
        b = hashlib.blake2b(parent, digest_size=16, person=b"kvstore-block")
        b.update(np.arange(4 * i, 4 * i + 4, dtype="<u4").tobytes())
        parent = b.digest()
        assert hashes[i] == parent


# --------------------------------------------------------------------------------------
# Separation
# --------------------------------------------------------------------------------------

def test_different_namespaces_give_different_roots_and_hashes():
    tokens = list(range(32))
    namespaces = [NS, "tenant-b", "Tenant-a", "tenant-a ", NON_ASCII_NS, "shared"]
    roots = [root_hash(FP, ns) for ns in namespaces]
    assert len(set(roots)) == len(namespaces)
    chains = [chain_hashes(r, tokens, 8) for r in roots]
    all_hashes = [h for c in chains for h in c]
    assert len(set(all_hashes)) == len(all_hashes) == 4 * len(namespaces)


# Each variant differs from BASE_SPEC in exactly one field.
SPEC_VARIANTS = {
    "model_id": {"model_id": "org/model-8b"},
    "weights_digest": {"weights_digest": "sha256:abc124"},
    "dtype": {"dtype": torch.float16},
    "dtype_f32": {"dtype": torch.float32},
    "num_layers": {"num_layers": 5},
    "num_kv_heads": {"num_kv_heads": 4},
    "head_dim": {"head_dim": 32},
    "block_size": {"block_size": 16},
    "tp_rank": {"tp_rank": 1},
    "tp_size": {"tp_size": 4},
    "layout_version": {"layout_version": BASE_SPEC.layout_version + 1},
}


@pytest.mark.parametrize("field", sorted(SPEC_VARIANTS))
def test_spec_differing_in_one_field_gives_different_roots_and_hashes(field):
    other = dataclasses.replace(BASE_SPEC, **SPEC_VARIANTS[field])
    assert other != BASE_SPEC
    assert other.fingerprint != BASE_SPEC.fingerprint
    tokens = list(range(16))
    r1, r2 = root_hash(BASE_SPEC.fingerprint, NS), root_hash(other.fingerprint, NS)
    assert r1 != r2
    h1, h2 = chain_hashes(r1, tokens, 8), chain_hashes(r2, tokens, 8)
    assert len(h1) == len(h2) == 2
    assert not set(h1) & set(h2)


def test_all_spec_variants_have_pairwise_distinct_fingerprints():
    specs = [BASE_SPEC] + [dataclasses.replace(BASE_SPEC, **kw) for kw in SPEC_VARIANTS.values()]
    fps = [s.fingerprint for s in specs]
    assert len(set(fps)) == len(fps)


def test_token_order_within_block_matters():
    root = root_hash(FP, NS)
    a = [1, 2, 3, 4, 5, 6, 7, 8] * 2
    b = [2, 1, 3, 4, 5, 6, 7, 8] + [1, 2, 3, 4, 5, 6, 7, 8]
    ha, hb = chain_hashes(root, a, 8), chain_hashes(root, b, 8)
    assert ha[0] != hb[0]
    # The difference propagates down the chain even though block 2's tokens are equal.
    assert ha[1] != hb[1]
    # Swapping the last two tokens of a block also changes it.
    c = [1, 2, 3, 4, 5, 6, 8, 7]
    assert block_hash(root, a[:8]) != block_hash(root, c)


def test_same_tokens_after_a_different_parent_block_hash_differently():
    root = root_hash(FP, NS)
    shared = [100, 101, 102, 103]
    ha = chain_hashes(root, [1, 2, 3, 4] + shared, 4)
    hb = chain_hashes(root, [1, 2, 3, 5] + shared, 4)
    assert ha[0] != hb[0]
    assert ha[1] != hb[1]
    assert block_hash(ha[0], shared) != block_hash(hb[0], shared)
    # And the chain really is block_hash(parent, tokens).
    assert ha[1] == block_hash(ha[0], shared)
    assert ha[0] == block_hash(root, [1, 2, 3, 4])
    # A block at position 0 vs the same tokens at position 1 differ too.
    assert chain_hashes(root, shared, 4)[0] != ha[1]


def test_different_block_boundaries_give_different_hash_lists():
    root = root_hash(FP, NS)
    tokens = list(range(24))
    h4, h8 = chain_hashes(root, tokens, 4), chain_hashes(root, tokens, 8)
    assert len(h4) == 6 and len(h8) == 3
    assert not set(h4) & set(h8)


def test_equal_inputs_give_equal_hashes_and_accept_numpy_and_list_alike():
    root = root_hash(FP, NS)
    tokens = [5, 9, 2**31, MAX_TOKEN_ID, 0, 1, 2, 3]
    expected = chain_hashes(root, tokens, 4)
    assert chain_hashes(root_hash(FP, NS), list(tokens), 4) == expected
    for dt in (np.int64, np.uint32, np.uint64):
        assert chain_hashes(root, np.array(tokens, dtype=dt), 4) == expected
    assert all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in expected)
    assert token_bytes(tokens) == np.array(tokens, dtype="<u4").tobytes()


# --------------------------------------------------------------------------------------
# Full blocks only; incremental hashing; fork
# --------------------------------------------------------------------------------------

def test_only_full_blocks_are_hashed():
    root = root_hash(FP, NS)
    assert len(chain_hashes(root, list(range(17)), 8)) == 2
    assert len(chain_hashes(root, list(range(16)), 8)) == 2
    assert len(chain_hashes(root, list(range(15)), 8)) == 1
    assert len(chain_hashes(root, list(range(7)), 8)) == 0
    assert chain_hashes(root, [], 8) == []
    # The partial tail does not influence the full blocks' hashes.
    assert chain_hashes(root, list(range(17)), 8) == chain_hashes(root, list(range(16)), 8)
    hasher = PrefixHasher(root, 8)
    hasher.extend(range(17))
    assert hasher.num_tokens == 17 and hasher.num_full_blocks == 2
    assert hasher.block_tokens(1) == list(range(8, 16))
    assert hasher.block_tokens(2) == [16]


token_lists = st.lists(st.integers(min_value=0, max_value=MAX_TOKEN_ID), max_size=70)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=token_lists, block_size=st.integers(1, 9), data=st.data())
def test_incremental_extend_equals_one_shot(tokens, block_size, data):
    root = root_hash(FP, NS)
    expected = chain_hashes(root, tokens, block_size)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(tokens)), max_size=8), label="cuts"))
    hasher = PrefixHasher(root, block_size)
    collected: list[bytes] = []
    for lo, hi in itertools.pairwise([0, *cuts, len(tokens)]):
        before = hasher.num_full_blocks
        chunk = tokens[lo:hi]
        as_array = data.draw(st.booleans(), label="as numpy")
        added = hasher.extend(np.array(chunk, dtype=np.uint32) if as_array else chunk)
        # extend returns exactly the blocks completed by this call, in order.
        assert added == hasher.hashes[before:]
        assert len(added) == hi // block_size - lo // block_size
        collected.extend(added)
    assert collected == expected == hasher.hashes
    assert hasher.tokens == tokens
    assert len(expected) == len(tokens) // block_size


def test_extend_returns_only_newly_completed_hashes():
    root = root_hash(FP, NS)
    h = PrefixHasher(root, 4)
    assert h.extend([1, 2, 3]) == []
    first = h.extend([4])
    assert first == [block_hash(root, [1, 2, 3, 4])]
    assert h.extend([]) == []
    more = h.extend(range(5, 14))  # completes blocks 2 and 3, leaves 1 token pending
    assert more == chain_hashes(root, list(range(1, 14)), 4)[1:]
    assert len(more) == 2
    assert h.extend([14, 15]) == []
    assert h.extend(iter([16])) == [chain_hashes(root, list(range(1, 17)), 4)[3]]


def test_fork_is_independent_and_shares_history():
    root = root_hash(FP, NS)
    parent = PrefixHasher.for_namespace(FP, NS, 4)
    assert parent.root == root
    parent.extend(range(10))
    child = parent.fork()
    assert child.tokens == parent.tokens and child.hashes == parent.hashes
    assert child.root == parent.root and child.block_size == 4 and child.namespace == NS
    assert child.tokens is not parent.tokens and child.hashes is not parent.hashes

    child_added = child.extend([100, 101, 102, 103, 104])
    parent_added = parent.extend([200, 201])
    assert parent.tokens == list(range(10)) + [200, 201]
    assert child.tokens == list(range(10)) + [100, 101, 102, 103, 104]
    assert child.hashes[:2] == parent.hashes[:2]  # shared history
    assert child.hashes[2] != parent.hashes[2]  # diverged
    assert child_added == chain_hashes(root, child.tokens, 4)[2:]
    assert parent_added == chain_hashes(root, parent.tokens, 4)[2:]
    assert child.hashes == chain_hashes(root, child.tokens, 4)
    assert parent.hashes == chain_hashes(root, parent.tokens, 4)

    # Forking an empty hasher works too; a fork of a fork is still independent.
    grandchild = child.fork()
    grandchild.extend([1])
    assert child.num_tokens == 15 and grandchild.num_tokens == 16


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------

BAD_TOKENS = {
    "negative": [1, 2, -1, 4],
    "negative_np": np.array([1, 2, -5, 4], dtype=np.int64),
    "too_large": [1, 2, 2**32, 4],
    "too_large_np": np.array([1, 2**32 + 7], dtype=np.uint64),
    "huge": [2**64, 1],
    "float_fraction": [1.5, 2.0, 3.0, 4.0],
    "float_integral": [1.0, 2.0, 3.0, 4.0],
    "float_np": np.array([1.0, 2.0, 3.0, 4.0]),
    "two_dim": np.array([[1, 2], [3, 4]]),
    "two_dim_column": np.array([[1], [2], [3], [4]]),
}


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
def test_token_bytes_rejects_bad_token_ids(name):
    with pytest.raises(ValueError, match=r"token ids"):
        token_bytes(BAD_TOKENS[name])
    with pytest.raises(ValueError, match=r"token ids"):
        block_hash(root_hash(FP, NS), BAD_TOKENS[name])


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
def test_extend_and_chain_hashes_reject_bad_token_ids(name):
    # KNOWN BUG (float_*, two_dim*): extend() runs int(t) over its input before validating,
    # so floats are silently truncated (1.5 -> 1, and [1.0, 2.0] hashes like [1, 2]) and 2-D
    # arrays raise TypeError instead of ValueError.
    root = root_hash(FP, NS)
    with pytest.raises(ValueError, match=r"\S"):
        chain_hashes(root, BAD_TOKENS[name], 2)
    with pytest.raises(ValueError, match=r"\S"):
        PrefixHasher(root, 2).extend(BAD_TOKENS[name])


# Bad inputs whose rejection by extend() works today (float and 2-D inputs are covered by
# test_extend_and_chain_hashes_reject_bad_token_ids, which shows they are not rejected).
RANGE_ERRORS = ["negative", "negative_np", "too_large", "too_large_np", "huge"]


@pytest.mark.parametrize("name", RANGE_ERRORS)
def test_rejected_extend_leaves_hasher_unchanged(name):
    root = root_hash(FP, NS)
    h = PrefixHasher(root, 4)
    h.extend([10, 11, 12, 13, 14])
    tokens_before, hashes_before = list(h.tokens), list(h.hashes)
    with pytest.raises(ValueError):
        h.extend(BAD_TOKENS[name])
    assert h.tokens == tokens_before
    assert h.hashes == hashes_before
    # Still usable, and consistent with a fresh one-shot computation.
    h.extend([15, 16, 17])
    assert h.hashes == chain_hashes(root, [10, 11, 12, 13, 14, 15, 16, 17], 4)


def test_empty_namespace_rejected():
    with pytest.raises(ValueError, match="namespace"):
        root_hash(FP, "")
    with pytest.raises(ValueError, match="namespace"):
        PrefixHasher.for_namespace(FP, "", 4)


@pytest.mark.parametrize("block_size", [0, -1])
def test_non_positive_block_size_rejected(block_size):
    with pytest.raises(ValueError, match="block_size"):
        PrefixHasher(root_hash(FP, NS), block_size)
    with pytest.raises(ValueError, match="block_size"):
        chain_hashes(root_hash(FP, NS), [1, 2, 3], block_size)
