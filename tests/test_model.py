"""The model against transformers (tiny random checkpoints written to tmp_path, no download).

Parity: our logits over the paged T0 pool equal Hugging Face's for Llama (llama3 and linear
RoPE scaling, tied and untied, attention bias), Mistral (sliding window, explicit head_dim)
and Qwen2 (QKV bias), for a one-shot prefill and at every step of greedy decoding. Then the
properties the cache relies on: a prefix prefilled earlier (read back through block tables)
gives the same logits as a one-shot prefill; batched decode equals decoding alone; batched
decode over block tables in one run, scattered, or in long runs (read in place and merged)
equals transformers. Then the loader's errors, sharded checkpoints, built-in models across processes.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvstore.pools import DevicePool  # noqa: E402
from workers.loader import BUILTIN_MODELS, CheckpointError, builtin_config, builtin_model, kv_spec, load_checkpoint  # noqa: E402
from workers.model import ForwardBatch, ModelConfig, decode_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 4  # small blocks: every prompt spans several, some partially filled
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=211, max_position_embeddings=256,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)

HF_CASES = {
    # untied, llama3 RoPE scaling (short original context so all three frequency bands occur), biases
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, tie_word_embeddings=False, attention_bias=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # tied, linear RoPE scaling, MHA-with-GQA 4:1
    "llama_linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, num_key_value_heads=1, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # sliding window shorter than the prompts; head_dim != hidden / heads
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        COMMON, head_dim=24, sliding_window=7, tie_word_embeddings=False)),
    # QKV bias, tied, rope_theta 1e6
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        COMMON, tie_word_embeddings=True, rope_theta=1000000.0)),
    # Qwen2 use_sliding_window: layers >= max_window_layers use the window, the others do not
    "qwen2_swa": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """HF initialises biases to 0 and norms to 1; make every parameter matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 * (2.0 if "embed" in name else 1.0))


def _save_hf(kind: str, path: Path, seed: int = 0, **save_kwargs):
    cfg_cls, model_cls, kwargs = HF_CASES[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    _randomize(model, seed)
    model.save_pretrained(path, **save_kwargs)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (HF model, checkpoint dir), built once per module."""
    out = {}
    for i, kind in enumerate(HF_CASES):
        path = tmp_path_factory.mktemp(kind)
        out[kind] = (_save_hf(kind, path, seed=i), path)
    return out


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {kind: load_checkpoint(path) for kind, (_, path) in checkpoints.items()}


def _pool(config: ModelConfig, num_blocks: int = 64, device: str = "cpu") -> torch.Tensor:
    spec = kv_spec(config, "test", "digest", block_size=BLOCK)
    return DevicePool(spec, num_blocks, device=device).kv


def _table(n_tokens: int, rng: random.Random, free: list[int]) -> list[int]:
    """Take enough blocks for n_tokens from a shuffled free list (non-consecutive slots)."""
    n = -(-n_tokens // BLOCK)
    return [free.pop() for _ in range(n)]


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(ours.float().cpu(), ref.float().cpu(), atol=rel * scale, rtol=0)


# --------------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(HF_CASES))
def test_prefill_logits_match_hf(kind, device, checkpoints, loaded):
    hf, _ = checkpoints[kind]
    config, model, _ = loaded[kind]
    model = model.to(device)
    ids = _prompt(config.vocab_size, 21, seed=1)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    free = list(range(64))
    random.Random(0).shuffle(free)
    table = _table(len(ids), random.Random(0), free)
    kv = _pool(config, device=device)
    batch = ForwardBatch.build([(ids, 0, table)], BLOCK, device=device)
    ours = model(batch, kv, all_logits=True)
    assert ours.dtype == torch.float32 and ours.shape == (len(ids), config.vocab_size)
    _close(ours, ref)
    # Default: only the last token's logits, [B, vocab].
    kv2 = _pool(config, device=device)
    last = model(batch, kv2)
    assert last.shape == (1, config.vocab_size)
    _close(last[0], ref[-1])
    torch.testing.assert_close(kv2, kv)  # same K/V written either way
    model.to("cpu")


@pytest.mark.parametrize("kind", list(HF_CASES))
def test_greedy_decode_matches_hf_generate(kind, checkpoints, loaded):
    hf, _ = checkpoints[kind]
    config, model, _ = loaded[kind]
    ids = _prompt(config.vocab_size, 13, seed=2)
    n_new = 8
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n_new,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    hf_tokens = gen.sequences[0, len(ids):].tolist()
    assert len(hf_tokens) == n_new

    kv = _pool(config)
    free = list(range(64))
    random.Random(1).shuffle(free)
    table = _table(len(ids) + n_new, random.Random(1), free)
    logits = model(ForwardBatch.build([(ids, 0, table)], BLOCK), kv)
    tokens = []
    for step in range(n_new):
        _close(logits[0], gen.logits[step][0])  # our step logits == HF's (its own KV cache)
        tok = int(logits[0].argmax())
        tokens.append(tok)
        ctx = len(ids) + step
        logits = model(ForwardBatch.build([([tok], ctx, table)], BLOCK), kv)
    assert tokens == hf_tokens


# --------------------------------------------------------------------------------------------
# What the cache relies on
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["shuffled", "consecutive"])
@pytest.mark.parametrize("k", [5, 8, 18])  # mid-block, block boundary, all but the last token
@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2"])
def test_prefix_reuse_equals_one_shot(kind, k, layout, loaded):
    config, model, _ = loaded[kind]
    n = 19
    ids = _prompt(config.vocab_size, n, seed=3)
    free = list(range(10, 40))
    if layout == "shuffled":
        random.Random(2).shuffle(free)
    table = [free.pop(0) for _ in range(-(-n // BLOCK))]

    kv_one = _pool(config)
    one_shot = model(ForwardBatch.build([(ids, 0, table)], BLOCK), kv_one, all_logits=True)

    kv = _pool(config)
    first = model(ForwardBatch.build([(ids[:k], 0, table)], BLOCK), kv, all_logits=True)
    # The rest reads the first k tokens' K/V from the pool through the block table.
    rest = model(ForwardBatch.build([(ids[k:], k, table)], BLOCK), kv, all_logits=True)
    _close(first, one_shot[:k], rel=1e-5)
    _close(rest, one_shot[k:], rel=1e-5)
    torch.testing.assert_close(kv, kv_one)


def test_prefix_reuse_uses_the_pool(loaded):
    """The cached prefix really comes from the pool: corrupt it and the suffix changes."""
    config, model, _ = loaded["qwen2"]
    ids = _prompt(config.vocab_size, 16, seed=4)
    table = [3, 9, 1, 6]
    kv = _pool(config)
    model(ForwardBatch.build([(ids[:8], 0, table)], BLOCK), kv)
    kv_bad = kv.clone()
    kv_bad[:, :, 9] += 0.5  # second block of the prefix
    good = model(ForwardBatch.build([(ids[8:], 8, table)], BLOCK), kv, all_logits=True)
    bad = model(ForwardBatch.build([(ids[8:], 8, table)], BLOCK), kv_bad, all_logits=True)
    assert (good - bad).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2"])
def test_batched_steps_equal_single(kind, loaded):
    config, model, _ = loaded[kind]
    lens = [5, 12, 17]
    prompts = [_prompt(config.vocab_size, n, seed=10 + i) for i, n in enumerate(lens)]
    free = list(range(64))
    random.Random(3).shuffle(free)
    tables = [_table(n + 6, random.Random(0), free) for n in lens]

    # Varlen batched prefill of all three == each alone.
    kv = _pool(config)
    batched = model(ForwardBatch.build([(p, 0, t) for p, t in zip(prompts, tables)], BLOCK), kv)
    assert batched.shape == (3, config.vocab_size)
    kv_single = _pool(config)
    for i, (p, t) in enumerate(zip(prompts, tables)):
        _close(batched[i], model(ForwardBatch.build([(p, 0, t)], BLOCK), kv_single)[0], rel=1e-5)
    torch.testing.assert_close(kv, kv_single)

    # One batched decode step of 3 sequences with different context lengths == each alone.
    nxt = [7, 8, 9]
    step = ForwardBatch.build([([tok], n, t) for tok, n, t in zip(nxt, lens, tables)], BLOCK)
    kv_alone = kv.clone()
    together = model(step, kv)
    for i in range(3):
        alone = model(ForwardBatch.build([([nxt[i]], lens[i], tables[i])], BLOCK), kv_alone)
        _close(together[i], alone[0], rel=1e-5)
    torch.testing.assert_close(kv, kv_alone)

    # Mixed step: a chunked-prefill sequence between two decodes == each alone.
    lens2 = [n + 1 for n in lens]
    chunk = [11, 12, 13, 14]
    mixed = ForwardBatch.build([([21], lens2[0], tables[0]), (chunk, lens2[1], tables[1]),
                                ([23], lens2[2], tables[2])], BLOCK)
    kv_alone = kv.clone()
    got = model(mixed, kv, all_logits=True)
    expect = torch.cat([
        model(ForwardBatch.build([([21], lens2[0], tables[0])], BLOCK), kv_alone, all_logits=True),
        model(ForwardBatch.build([(chunk, lens2[1], tables[1])], BLOCK), kv_alone, all_logits=True),
        model(ForwardBatch.build([([23], lens2[2], tables[2])], BLOCK), kv_alone, all_logits=True),
    ])
    _close(got, expect, rel=1e-5)
    last = model(mixed, kv.clone())
    _close(last, expect[[0, 4, 5]], rel=1e-5)


# --------------------------------------------------------------------------------------------
# Decode attention over the paged pool: runs of consecutive slots read in place and merged
# --------------------------------------------------------------------------------------------

def _runs(table: list[int]) -> list[int]:
    """Lengths (in blocks) of the runs of consecutive slots in a block table."""
    runs = [1]
    for a, b in zip(table, table[1:]):
        if b == a + 1:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


def _decode_tables(layout: str, n_tokens: list[int], rng: random.Random) -> list[list[int]]:
    need = [-(-n // BLOCK) for n in n_tokens]
    if layout == "one_run":  # each sequence's blocks consecutive, sequences apart
        starts = [3 + sum(need[:i]) + 5 * i for i in range(len(need))]
        return [list(range(s, s + n)) for s, n in zip(starts, need)]
    if layout == "fragmented":  # every block elsewhere
        free = list(range(2 * sum(need)))
        rng.shuffle(free)
        return [[free.pop() for _ in range(n)] for n in need]
    # long_runs: 4 runs of 64 blocks (256 tokens) each, placed out of order, then the rest one
    # block at a time from a shuffled free list, the sequences taking turns (as decode allocates).
    regions = list(range(4 * len(need)))
    rng.shuffle(regions)
    tables = [[s for r in regions[4 * i:4 * i + 4] for s in range(1000 + 70 * r, 1000 + 70 * r + 64)]
              for i in range(len(need))]
    free = list(range(1000))
    rng.shuffle(free)
    while any(len(t) < n for t, n in zip(tables, need)):
        for t, n in zip(tables, need):
            if len(t) < n:
                t.append(free.pop())
    return tables


DECODE_LENS = {"one_run": [5, 23, 41], "fragmented": [5, 23, 41], "long_runs": [1030, 1100, 1157]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(DECODE_LENS))
@pytest.mark.parametrize("kind", ["llama3", "llama_linear", "mistral", "qwen2_swa"])
def test_batched_decode_over_block_layouts_matches_hf(kind, layout, device, checkpoints, loaded):
    """Three sequences of different lengths decode together, their contexts in one run each,
    in single blocks scattered over the pool, or (over 1k tokens) in 4 runs of 256 tokens plus
    a scattered tail: every step's logits and greedy token equal transformers' (GQA 4:2 and
    4:1, a sliding window on every layer or on one)."""
    hf, _ = checkpoints[kind]
    config, model, _ = loaded[kind]
    lens, steps = DECODE_LENS[layout], 5
    tables = _decode_tables(layout, [n + steps for n in lens], random.Random(7))
    runs = [_runs(t) for t in tables]
    if layout == "one_run":
        assert all(len(r) == 1 for r in runs)
    elif layout == "fragmented":
        assert all(len(r) > len(t) // 2 for r, t in zip(runs, tables))
    else:
        assert all(sum(n * BLOCK >= 256 for n in r) >= 4 and len(r) > 4 for r in runs) and min(lens) >= 1024
    model.to(device)
    try:
        kv = _pool(config, num_blocks=max(max(t) for t in tables) + 1, device=device)
        kv.normal_(generator=torch.Generator(device).manual_seed(0))  # a stray row read shows
        seqs = [_prompt(config.vocab_size, n, seed=20 + i) for i, n in enumerate(lens)]
        logits = torch.cat([model(ForwardBatch.build([(s, 0, t)], BLOCK, device=device), kv)
                            for s, t in zip(seqs, tables)])
        ours = []
        for _ in range(steps):
            ours.append(logits.cpu())
            for s, tok in zip(seqs, logits.argmax(-1).tolist()):
                s.append(tok)
            step = ForwardBatch.build([([s[-1]], len(s) - 1, t) for s, t in zip(seqs, tables)], BLOCK, device=device)
            logits = model(step, kv)
    finally:
        model.to("cpu")
    for i, (seq, n) in enumerate(zip(seqs, lens)):
        with torch.no_grad():
            ref = hf(torch.tensor([seq[:-1]])).logits[0, n - 1:]
        _close(torch.stack([o[i] for o in ours]), ref)  # step 0 is the prefill's, then 4 decode steps
        assert seq[n:] == ref.argmax(-1).tolist()  # the same greedy tokens


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_decode_over_runs_close_to_hf(device, checkpoints):
    """bf16 (where CUDA uses flashinfer's paged kernel when installed): decode over 1.1k tokens
    in 4 long runs and a scattered tail stays within bf16 rounding of transformers in float32."""
    hf, path = checkpoints["qwen2_swa"]  # layer 0 attends to all 1.1k tokens, layer 1 to a window
    config, model, _ = load_checkpoint(path, dtype=torch.bfloat16, device=device)
    n, steps = 1100, 4
    (table,) = _decode_tables("long_runs", [n + steps], random.Random(8))
    kv = _pool(config, num_blocks=max(table) + 1, device=device)
    seq = _prompt(config.vocab_size, n, seed=30)
    logits = model(ForwardBatch.build([(seq, 0, table)], BLOCK, device=device), kv)
    ours = []
    for _ in range(steps):
        ours.append(logits[0].cpu())
        seq.append(int(logits[0].argmax()))
        logits = model(ForwardBatch.build([([seq[-1]], len(seq) - 1, table)], BLOCK, device=device), kv)
    with torch.no_grad():
        ref = hf(torch.tensor([seq[:-1]])).logits[0, n - 1:]
    _close(torch.stack(ours), ref, rel=3e-2)


def test_decode_kernel_selection(monkeypatch):
    """flashinfer's paged kernel only on CUDA in fp16/bf16 and when installed; else torch."""
    import workers.model

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(workers.model, "_installed", lambda name: name == "flashinfer")
    assert decode_kernel(cuda, torch.bfloat16) == decode_kernel(cuda, torch.float16) == "flashinfer"
    assert decode_kernel(cuda, torch.float32) == decode_kernel(cpu, torch.bfloat16) == "torch"
    monkeypatch.setattr(workers.model, "_installed", lambda name: False)
    assert decode_kernel(cuda, torch.bfloat16) == "torch"


def test_forward_rejects_bad_inputs(loaded):
    config, model, _ = loaded["llama3"]
    kv = _pool(config)
    ok = ForwardBatch.build([([1, 2, 3], 0, [0])], BLOCK)
    with pytest.raises(ValueError, match="dtype"):
        model(ok, kv.to(torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        model(ok, kv[:1])
    bad = ForwardBatch(ok.input_ids, ok.positions, ok.slot_mapping, [2], [3], [[0]])
    with pytest.raises(ValueError, match="sum"):
        model(bad, kv)
    short = ForwardBatch.build([([1, 2, 3, 4, 5], 0, [0, 1])], BLOCK)
    short.block_tables = [[0]]
    with pytest.raises(ValueError, match="block"):
        model(short, kv)


# --------------------------------------------------------------------------------------------
# Config and loader
# --------------------------------------------------------------------------------------------

def test_config_from_hf(checkpoints, loaded):
    c = loaded["llama3"][0]
    assert (c.model_type, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 2, 4, 2, 16)
    assert c.rope_type == "llama3" and c.rope_theta == 500000.0 and not c.tie_word_embeddings
    assert c.qkv_bias and c.o_bias
    hash(c)  # frozen and hashable (rope_scaling is a tuple)
    q = loaded["qwen2"][0]
    assert q.qkv_bias and not q.o_bias and q.tie_word_embeddings and q.rope_scaling is None
    m = loaded["mistral"][0]
    assert m.sliding_window == 7 and m.head_dim == 24 and m.sliding_layers is None
    assert m.layer_window(0) == m.layer_window(1) == 7
    w = loaded["qwen2_swa"][0]
    assert w.sliding_layers == (1,) and w.layer_window(0) is None and w.layer_window(1) == 6
    # transformers 4.x layout: rope_theta and rope_scaling with "type".
    old = json.loads((checkpoints["llama3"][1] / "config.json").read_text())
    params = old.pop("rope_parameters")
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = dict(params, type=params.pop("rope_type"))
    assert ModelConfig.from_hf(old) == c
    with pytest.raises(NotImplementedError, match="yarn"):
        ModelConfig.from_hf(dict(old, rope_scaling={"type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf(dict(old, model_type="gpt2"))


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_loader_errors(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src = checkpoints["qwen2"][1]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")

    d = _copy_ckpt(src, tmp_path / "missing")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_checkpoint(d)

    d = _copy_ckpt(src, tmp_path / "unexpected")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        load_checkpoint(d)

    d = _copy_ckpt(src, tmp_path / "badshape")
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(d)

    d = _copy_ckpt(src, tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama, mistral, qwen2"):
        load_checkpoint(d)

    d = _copy_ckpt(src, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(d)


def test_sharded_checkpoint_and_digest(checkpoints, loaded, tmp_path):
    hf, src = checkpoints["llama3"]
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    config, model, digest = load_checkpoint(tmp_path)
    ref_config, ref_model, ref_digest = loaded["llama3"]
    assert config == ref_config
    ids = _prompt(config.vocab_size, 9, seed=5)
    batch = ForwardBatch.build([(ids, 0, [0, 1, 2])], BLOCK)
    ours, ref = model.state_dict(), ref_model.state_dict()
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)
    # Same weights, other buffers: the CPU kernels' rounding may differ with alignment.
    _close(model(batch, _pool(config)), ref_model(batch, _pool(config)), rel=1e-5)
    assert len(digest) == 64 and digest == load_checkpoint(tmp_path)[2]
    assert ref_digest == load_checkpoint(src)[2] != digest
    assert load_checkpoint(checkpoints["qwen2"][1])[2] != ref_digest
    # dtype override: bf16 weights, bf16 pool.
    c16, m16, _ = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert c16.dtype == torch.bfloat16 and m16.embed.weight.dtype == torch.bfloat16
    out = m16(batch, _pool(c16))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # A shard listed in the index but missing.
    next(p for p in tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)


def test_untied_config_without_lm_head_ties(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy_ckpt(checkpoints["mistral"][1], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, d / "model.safetensors")
    config, model, _ = load_checkpoint(d)
    assert config.tie_word_embeddings and model.lm_head is None


# --------------------------------------------------------------------------------------------
# Built-in models
# --------------------------------------------------------------------------------------------

_PROBE = textwrap.dedent("""
    import hashlib, torch
    from workers.loader import builtin_model, kv_spec
    from workers.model import ForwardBatch
    from kvstore.pools import DevicePool

    def probe(name, seed):
        config, model, digest = builtin_model(name, seed=seed)
        kv = DevicePool(kv_spec(config, name, digest, block_size=4), 8, device="cpu").kv
        logits = model(ForwardBatch.build([(list(range(40, 53)), 0, [5, 2, 7, 0])], 4), kv)
        return [digest, hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
                kv_spec(config, name, digest).fingerprint.hex()]
""")


def _probe_subprocess(name: str, seed: int, hashseed: str) -> list[str]:
    code = _PROBE + f"\nimport json\nprint(json.dumps(probe({name!r}, {seed})))\n"
    env = dict(os.environ, PYTHONHASHSEED=hashseed, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_builtin_deterministic_across_processes():
    ns: dict = {}
    exec(_PROBE, ns)
    here = ns["probe"]("tiny", 3)
    assert _probe_subprocess("tiny", 3, "1") == here
    assert _probe_subprocess("tiny", 3, "2") == here
    other = ns["probe"]("tiny", 4)
    assert all(a != b for a, b in zip(here, other))


def test_builtin_models():
    from workers.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    config, model, digest = builtin_model("tiny")
    assert config.vocab_size >= tok.vocab_size
    assert config.eos_token_ids == tok.eos_token_ids and config.bos_token_id == tok.bos_token_id
    assert digest == builtin_model("tiny")[2] != builtin_model("tiny", seed=1)[2]
    assert builtin_model("tiny", dtype=torch.bfloat16)[2] != digest
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    kv = _pool(config, num_blocks=8)
    out = model(ForwardBatch.build([(ids, 0, [0, 1])], BLOCK), kv)
    assert out.shape == (1, config.vocab_size) and torch.isfinite(out).all()
    assert out.std() > 0.1  # random logits are not flat

    small = builtin_config("small")
    assert small.vocab_size >= tok.vocab_size and small.num_params < 300e6
    q = builtin_config("qwen2.5-0.5b-shape")
    assert (q.num_layers, q.hidden_size, q.num_heads, q.num_kv_heads, q.head_dim, q.intermediate_size,
            q.vocab_size) == (24, 896, 14, 2, 64, 4864, 151936)
    assert q.tie_word_embeddings and q.qkv_bias and q.rope_theta == 1e6 and q.dtype == torch.bfloat16
    assert q.num_params == 494_032_768  # the real Qwen2.5-0.5B's count
    assert config.num_params == sum(p.numel() for p in model.parameters())
    spec = kv_spec(q, "qwen-shape", "d" * 64, block_size=16)
    assert spec.block_shape == (24, 2, 16, 2, 64) and spec.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=re.escape("unknown built-in model 'huge'; choose one of "
                                                   "['qwen2.5-0.5b-shape', 'small', 'tiny']")):
        builtin_model("huge")
    assert set(BUILTIN_MODELS) == {"tiny", "small", "qwen2.5-0.5b-shape"}
