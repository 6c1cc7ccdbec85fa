"""Build a :class:`~workers.model.Transformer`: from a Hugging Face checkpoint directory, or a
built-in seeded random model (no download), plus the model's :class:`~kvstore.spec.KVSpec`.

Both return ``(config, model, weights_digest)``. The digest goes into the model fingerprint, so
KV blocks computed by one set of weights are never served to another.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from kvstore.spec import KVSpec, parse_dtype
from workers.model import ModelConfig, Transformer
from workers.tokenizer import ByteTokenizer

DIGEST_SCHEME = "kvstore-weights-v1"


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or tensors, or has unexpected ones."""


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ---------------------------------------------------------------------------------------------

def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in {index.name} are missing: {missing}")
        return files
    if single.is_file():
        return [single]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if found:
        raise CheckpointError(
            f"{path}: has {found} but neither model.safetensors nor model.safetensors.index.json"
        )
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = f" (found {others}; only safetensors is supported)" if others else ""
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def _hf_to_ours(name: str) -> tuple[str, str | None]:
    """Map an HF tensor name to (our parameter name, part) where part names a fused slice."""
    if name == "model.embed_tokens.weight":
        return "embed.weight", None
    if name == "model.norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        return "lm_head.weight", None
    parts = name.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        i, rest = parts[2], ".".join(parts[3:])
        simple = {
            "input_layernorm.weight": "attn_norm.weight",
            "post_attention_layernorm.weight": "mlp_norm.weight",
            "self_attn.o_proj.weight": "attn.o.weight",
            "self_attn.o_proj.bias": "attn.o.bias",
            "mlp.down_proj.weight": "mlp.down.weight",
        }
        if rest in simple:
            return f"layers.{i}.{simple[rest]}", None
        fused = {
            "self_attn.q_proj": ("attn.qkv", "q"), "self_attn.k_proj": ("attn.qkv", "k"),
            "self_attn.v_proj": ("attn.qkv", "v"),
            "mlp.gate_proj": ("mlp.gate_up", "gate"), "mlp.up_proj": ("mlp.gate_up", "up"),
        }
        module, _, kind = rest.rpartition(".")
        if module in fused and kind in ("weight", "bias"):
            ours, part = fused[module]
            return f"layers.{i}.{ours}.{kind}", part
    raise CheckpointError(f"unexpected tensor {name!r} in checkpoint")



def _file_digest(files: list[Path], config: ModelConfig) -> str:
    """sha256 over every safetensors file's bytes (with its name and size) and the model-relevant
    config fields (not the compute dtype, which the KV fingerprint carries on its own)."""
    h = hashlib.sha256()
    h.update(DIGEST_SCHEME.encode() + b"\0")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "dtype"}
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_checkpoint(path: str | Path, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu") -> tuple[ModelConfig, Transformer, str]:
    """Load a Hugging Face Llama/Mistral/Qwen2 directory (config.json + safetensors).

    ``dtype`` defaults to the checkpoint's ``dtype``/``torch_dtype`` (float32 if absent).
    Returns ``(config, model, weights_digest)``; the model is in eval mode, without gradients.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: config.json is missing")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    config = ModelConfig.from_hf(raw, dtype=None if dtype is None else parse_dtype(dtype))
    files = _safetensors_files(path)
    device = torch.device(device)

    # Read every tensor, converted to the compute dtype on the target device.
    plain: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                ours, part = _hf_to_ours(name)
                tensor = st.get_tensor(name)
                if ours in plain or (part is not None and part in parts.get(ours, {})):
                    raise CheckpointError(f"tensor {name!r} appears twice in {path}")
                if part is None:
                    plain[ours] = tensor
                else:
                    parts.setdefault(ours, {})[part] = tensor

    if "lm_head.weight" not in plain and not config.tie_word_embeddings:
        config = dataclasses.replace(config, tie_word_embeddings=True)  # HF ties when absent
    if config.tie_word_embeddings:
        plain.pop("lm_head.weight", None)

    state: dict[str, torch.Tensor] = {}
    for name, tensor in plain.items():
        state[name] = tensor
    for name, pieces in parts.items():
        order = ("q", "k", "v") if ".attn.qkv." in name else ("gate", "up")
        missing = [p for p in order if p not in pieces]
        if missing:
            _, layer, _, _, kind = name.split(".")  # layers.N.attn.qkv.weight
            hf = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "gate": "mlp.gate_proj", "up": "mlp.up_proj"}
            names = [f"model.layers.{layer}.{hf[p]}.{kind}" for p in missing]
            raise CheckpointError(f"{path}: missing tensor(s) {names}")
        state[name] = torch.cat([pieces[p] for p in order], dim=0)

    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match config ({config.model_type}, {config.num_layers} layers, "
            f"qkv_bias={config.qkv_bias}): missing {_hf_names(missing)}, unexpected {_hf_names(unexpected)}"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(
                f"{path}: tensor for {name} has shape {tuple(state[name].shape)}, expected {tuple(shape)}"
            )
    state = {k: v.to(device=device, dtype=config.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    _finish(model)
    return config, model, _file_digest(files, config)


def _hf_names(ours: list[str]) -> list[str]:
    back = {
        "embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    layer_back = {
        "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
        "attn.o.weight": "self_attn.o_proj.weight", "attn.o.bias": "self_attn.o_proj.bias",
        "mlp.down.weight": "mlp.down_proj.weight", "attn.qkv.weight": "self_attn.{q,k,v}_proj.weight",
        "attn.qkv.bias": "self_attn.{q,k,v}_proj.bias", "mlp.gate_up.weight": "mlp.{gate,up}_proj.weight",
    }
    out = []
    for name in ours:
        if name in back:
            out.append(back[name])
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            out.append(f"model.layers.{i}.{layer_back.get(rest, rest)}")
        else:
            out.append(name)
    return out


def _finish(model: Transformer) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Built-in models: seeded random weights, no download
# ---------------------------------------------------------------------------------------------

_BYTE_TOK = ByteTokenizer()

# name -> (config fields, default dtype)
BUILTIN_MODELS: dict[str, tuple[dict, torch.dtype]] = {
    # Tests: fits the byte tokenizer (vocab 512 >= its ids), 2 layers, GQA 4:2.
    "tiny": (dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False,
                  qkv_bias=False, max_position_embeddings=4096), torch.float32),
    # Benchmarks: ~26M params, a 4k-token prefill takes a few seconds on 2 CPU cores.
    "small": (dict(model_type="llama", vocab_size=512, hidden_size=512, intermediate_size=1536, num_layers=8,
                   num_heads=8, num_kv_heads=2, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
                   qkv_bias=False, max_position_embeddings=32768), torch.float32),
    # The shape of Qwen2.5-0.5B (random weights): realistic KV size and compute.
    "qwen2.5-0.5b-shape": (dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0,
                                tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=32768),
                           torch.bfloat16),
}


def builtin_config(name: str = "tiny", dtype: torch.dtype | str | None = None) -> ModelConfig:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(BUILTIN_MODELS)}")
    fields, default_dtype = BUILTIN_MODELS[name]
    return ModelConfig(
        **fields, rope_scaling=None, rms_norm_eps=1e-6,
        dtype=default_dtype if dtype is None else parse_dtype(dtype),
        bos_token_id=_BYTE_TOK.bos_token_id, eos_token_ids=_BYTE_TOK.eos_token_ids,
    )


def builtin_model(name: str = "tiny", seed: int = 0, dtype: torch.dtype | str | None = None,
                  device: str | torch.device = "cpu") -> tuple[ModelConfig, Transformer, str]:
    """A model of a named size with seeded random weights (deterministic across processes).

    Weights are drawn in float32 on the CPU from ``torch.Generator().manual_seed(seed)`` in a
    fixed parameter order, then cast and moved. The digest is derived from (name, seed, dtype).
    """
    config = builtin_config(name, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    # Linear weights ~ N(0, 1/fan_in) keep activations O(1); embeddings ~ N(0, 9/hidden) give
    # (tied) logits a spread of a few units, so greedy decoding is not degenerate.
    state = {}
    for pname, p in model.state_dict().items():
        if pname.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif pname.endswith(".bias"):
            t = 0.1 * torch.randn(p.shape, generator=gen)
        elif pname == "embed.weight":
            t = torch.randn(p.shape, generator=gen) * (3.0 / config.hidden_size ** 0.5)
        else:
            t = torch.randn(p.shape, generator=gen) * (1.0 / p.shape[1] ** 0.5)
        state[pname] = t.to(device=device, dtype=config.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    _finish(model)
    digest = hashlib.sha256(
        json.dumps([DIGEST_SCHEME, "builtin", name, int(seed), str(config.dtype).removeprefix("torch.")]).encode()
    ).hexdigest()
    return config, model, digest


def kv_spec(config: ModelConfig, model_id: str, weights_digest: str, block_size: int = 16,
            kv_codec: str = "exact") -> KVSpec:
    """The KV layout and fingerprint of this model (one shard, tp_size 1); a lossy ``kv_codec``
    (the cache's codec) gives blocks a fingerprint of their own."""
    return KVSpec(
        num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
        dtype=config.dtype, block_size=block_size, model_id=model_id, weights_digest=weights_digest,
        kv_codec=kv_codec,
    )
