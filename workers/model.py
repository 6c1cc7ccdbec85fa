"""A Llama-family decoder (Llama, Mistral, Qwen2) in plain torch, attending over the paged T0 pool.

One readable file in the spirit of gpt-fast / nano-vllm:

* RMSNorm, RoPE (default, ``linear`` and ``llama3`` scaling), grouped-query attention,
  SwiGLU MLP, optional QKV bias (Qwen2), tied or untied embeddings, optional sliding window
  (Mistral; Qwen2's ``use_sliding_window`` layers).
* One engine step is a :class:`ForwardBatch`: the *new* tokens of B sequences concatenated
  (varlen). Every linear layer runs once over all T new tokens. Each layer writes the new
  tokens' K/V into the T0 pool ``kv[layer, 0|1]`` at ``slot_mapping`` and then attends over
  each sequence's whole context read back from its blocks (``block_tables``): a prefix that
  was loaded into T0 from another tier is reused without recomputing it.
* Decode attention (sequences with one new token) reads the pool in place: a sequence's
  block table is split into runs of consecutive slots (the allocator hands them out in
  order, so a long context is usually a few runs); each run is a strided view of the pool,
  attended with one SDPA call that also returns its log-sum-exp, and the runs' partial
  outputs are merged exactly (online-softmax combination), for all sequences at once. Only
  runs under ``_MIN_VIEW_TOKENS`` (a fragmented decode tail) are gathered, into one piece
  per sequence: a copy of those few rows costs less than a call per run. The query heads of
  a KV group are packed as query rows, so GQA needs no K/V expansion; a sliding window
  clips the runs (no mask). On CUDA with flashinfer installed (fp16/bf16), its paged decode
  kernel reads the pool through the block tables instead (``decode_kernel``).
* Prefill (several new tokens): one SDPA call per sequence (a loop over sequences, not
  tokens): ``is_causal`` when the whole context is new, else an explicit bottom-right causal
  mask (query i sits at absolute position ``context_len - query_len + i``) over the context
  read as a view when its blocks are consecutive, else gathered (a copy of O(context) rows
  against O(query x context) attention math).
* Sliding window: implemented (key j is visible to the query at position p iff
  ``p - window < j <= p``, as in transformers); the pool keeps all blocks.

The module holds fused weights: ``qkv`` = [q_proj; k_proj; v_proj] and ``gate_up`` =
[gate_proj; up_proj] (one matmul each); ``workers.loader`` maps Hugging Face names onto them.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kvstore.spec import parse_dtype

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Decode: runs of consecutive slots shorter than this are gathered (one copy per sequence)
# rather than attended in place (one call each); both cost about the same at this length.
_MIN_VIEW_TOKENS = 256


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: tuple | None  # hashable form of the HF dict (sorted (key, value) pairs), None = default
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Extensions (defaults keep the core signature above):
    o_bias: bool = False  # Llama attention_bias=True also puts a bias on o_proj
    sliding_window: int | None = None  # tokens visible to a query, itself included
    sliding_layers: tuple[int, ...] | None = None  # layers using the window; None = all layers

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))  # the model's dtype is its KV's
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        _rope_scaling_dict(self.rope_scaling)  # validates the type

    @property
    def rope_type(self) -> str:
        return _rope_scaling_dict(self.rope_scaling).get("rope_type", "default")

    def layer_window(self, layer: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.sliding_layers is None or layer in self.sliding_layers:
            return self.sliding_window
        return None

    @property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        qkv = (self.num_heads + 2 * self.num_kv_heads) * d
        attn = h * qkv + self.num_heads * d * h + (qkv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        per_layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    @classmethod
    def from_hf(cls, d: dict, dtype: torch.dtype | str | None = None) -> "ModelConfig":
        """From a Hugging Face ``config.json`` dict (transformers 4.x and 5.x layouts)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} (architectures={d.get('architectures')}); "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", d.get("hidden_activation", "silu"))
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r} is not supported (only 'silu', SwiGLU)")
        if d.get("mlp_bias"):
            raise NotImplementedError("mlp_bias=True is not supported")
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            layers = int(d["num_hidden_layers"])
            vocab = int(d["vocab_size"])
            inter = int(d["intermediate_size"])
        except KeyError as e:
            raise ValueError(f"config.json lacks required key {e.args[0]!r}") from None
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = int(d.get("head_dim") or hidden // heads)

        # RoPE: transformers 5 writes "rope_parameters" (with rope_theta inside); 4.x wrote
        # "rope_theta" and "rope_scaling" (type under "type" or "rope_type").
        params = d.get("rope_parameters")
        if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
            raise NotImplementedError("per-layer-type rope_parameters are not supported")
        scaling = dict(params) if isinstance(params, dict) else dict(d.get("rope_scaling") or {})
        theta = float(scaling.pop("rope_theta", None) or d.get("rope_theta") or 10000.0)
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling.pop("type"))
        scaling.setdefault("rope_type", "default")
        partial = scaling.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise NotImplementedError(f"partial_rotary_factor={partial} is not supported")
        max_pos = int(d.get("max_position_embeddings") or 2048)
        if scaling["rope_type"] == "llama3":
            scaling.setdefault("original_max_position_embeddings", max_pos)
        rope_scaling = None if scaling["rope_type"] == "default" else _hashable(scaling)
        if rope_scaling is not None:
            _rope_scaling_dict(rope_scaling)  # NotImplementedError for unsupported types

        attention_bias = bool(d.get("attention_bias", False))
        qkv_bias = True if model_type == "qwen2" else attention_bias
        o_bias = False if model_type == "qwen2" else attention_bias

        sliding_window, sliding_layers = None, None
        if model_type == "mistral" and d.get("sliding_window"):
            sliding_window = int(d["sliding_window"])
        elif model_type == "qwen2" and d.get("use_sliding_window") and d.get("sliding_window"):
            sliding_window = int(d["sliding_window"])
            types = d.get("layer_types")
            if types:
                sliding_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
            else:
                start = int(d.get("max_window_layers", layers))
                sliding_layers = tuple(range(start, layers))
            if not sliding_layers:
                sliding_window, sliding_layers = None, None

        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list | tuple) else (eos,))
        if dtype is None:
            dtype = str(d.get("dtype") or d.get("torch_dtype") or "float32")  # ValueError, not AttributeError, if odd
        return cls(
            model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rope_theta=theta, rope_scaling=rope_scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, max_position_embeddings=max_pos, dtype=parse_dtype(dtype),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids,
            o_bias=o_bias, sliding_window=sliding_window, sliding_layers=sliding_layers,
        )


def _rope_scaling_dict(rope_scaling: tuple | None) -> dict:
    if rope_scaling is None:
        return {}
    d = dict(rope_scaling)
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    d["rope_type"] = rope_type
    return d


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (float32, CPU), computed exactly as transformers does."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    )
    s = _rope_scaling_dict(config.rope_scaling)
    rope_type = s.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(s["factor"])
    elif rope_type == "llama3":
        factor = float(s["factor"])
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


@dataclass(slots=True)
class ForwardBatch:
    """One engine step over B sequences, their new tokens concatenated (varlen)."""

    input_ids: torch.Tensor  # [T] long: new tokens of every sequence, in order
    positions: torch.Tensor  # [T] long: absolute position of each new token
    slot_mapping: torch.Tensor  # [T] long: T0 block slot * block_size + offset where its K/V is written
    query_lens: list[int]  # new tokens per sequence (sum = T)
    context_lens: list[int]  # tokens per sequence after this step (cached + new)
    block_tables: list[list[int]]  # T0 slots of each sequence's blocks, in order

    @classmethod
    def build(cls, sequences: list[tuple[list[int], int, list[int]]], block_size: int,
              device: str | torch.device = "cpu") -> "ForwardBatch":
        """Convenience: from ``(new_token_ids, num_cached_tokens, block_table)`` per sequence.

        New tokens take positions ``num_cached .. num_cached + len(new) - 1``; their slots follow
        from the block table (which must already cover the whole context).
        """
        ids, pos, slots, qlens, clens, tables = [], [], [], [], [], []
        for new, cached, table in sequences:
            ctx = cached + len(new)
            if len(table) * block_size < ctx:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {ctx} tokens")
            ids.extend(new)
            for p in range(cached, ctx):
                pos.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
            qlens.append(len(new))
            clens.append(ctx)
            tables.append(list(table))
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        return cls(as_long(ids), as_long(pos), as_long(slots), qlens, clens, tables)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same rounding as transformers: normalise in float32, scale in the model dtype.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(dtype).mul_(self.weight)  # a fresh tensor: scale in place


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, 1, head_dim / 2]. Rotates the two halves (HF's
    ``x * cos + rotate_half(x) * sin`` with the same roundings, on half-size tensors)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.qkv = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=c.qkv_bias)
        self.o = nn.Linear(self.q_size, c.hidden_size, bias=c.o_bias)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate_size, dim=-1)
        return self.down(F.silu(gate).mul_(up))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


@dataclass(slots=True)
class _PrefillItem:
    start: int  # token range [start, end) in the batch
    end: int
    ctx: int  # context length after this step
    blocks: tuple[int, int] | torch.Tensor | None  # (first, count) if consecutive, else index tensor; None = local
    masks: dict = field(default_factory=dict)  # window -> bool mask [q, ctx] or None (is_causal)


@dataclass(slots=True)
class _DecodeGroup:
    tokens: torch.Tensor | None  # token indices in the batch (None = all tokens, in order)
    tables: list[list[int]]  # block table of each sequence (its first blocks covering ctx)
    ctx: list[int]  # context lengths
    pieces: dict = field(default_factory=dict)  # window -> _Pieces
    kernel: "_FlashInferDecode | None" = None  # CUDA paged kernel, when selected


@dataclass(slots=True)
class _Pieces:
    """Where each decode sequence's visible keys are: runs of the flat pool ``[slots * block_size,
    K, D]`` read in place, and short runs gathered (all sequences' in one copy)."""

    seqs: list[int]  # the sequence of each piece
    rows: list[slice]  # its rows: of the flat pool, or of the gathered blocks laid end to end
    gathered: list[bool]  # whether it reads the gathered blocks
    blocks: torch.Tensor | None  # the slots to gather, None = none
    owner: torch.Tensor | None  # seqs as a tensor; None when there is one piece per sequence


def _sequence_pieces(table: list[int], ctx: int, window: int | None,
                     block_size: int) -> tuple[list[slice], list[int], int, int]:
    """The runs of consecutive slots that hold context positions [ctx - window, ctx): slices of
    the flat pool, except short runs when there are several: their slots, and the rows
    [start, stop) of those blocks laid end to end that hold context."""
    bs = block_size
    lo = 0 if window is None else max(0, ctx - window)
    runs = []  # (first block, end block, first position, end position)
    b, end = lo // bs, -(-ctx // bs)
    while b < end:
        e = b + 1
        while e < end and table[e] == table[e - 1] + 1:
            e += 1
        runs.append((b, e, max(b * bs, lo), min(e * bs, ctx)))
        b = e
    short = [r for r in runs if r[3] - r[2] < _MIN_VIEW_TOKENS]
    if len(short) < 2:
        short = []
    views = [slice(table[b] * bs + p0 - b * bs, table[b] * bs + p1 - b * bs)
             for b, e, p0, p1 in runs if not short or p1 - p0 >= _MIN_VIEW_TOKENS]
    if not short:
        return views, [], 0, 0
    slots = [table[i] for b, e, _, _ in short for i in range(b, e)]
    return views, slots, short[0][2] - short[0][0] * bs, len(slots) * bs - (short[-1][1] * bs - short[-1][3])


class _Plan:
    """Per-forward attention bookkeeping, computed once and shared by all layers."""

    def __init__(self, batch: ForwardBatch, T: int, block_size: int, device: torch.device):
        q_lens, c_lens, tables = batch.query_lens, batch.context_lens, batch.block_tables
        if not (len(q_lens) == len(c_lens) == len(tables)):
            raise ValueError(
                f"query_lens ({len(q_lens)}), context_lens ({len(c_lens)}) and block_tables "
                f"({len(tables)}) must have one entry per sequence"
            )
        if sum(q_lens) != T:
            raise ValueError(f"sum(query_lens)={sum(q_lens)} != number of new tokens {T}")
        self.block_size = block_size
        self.device = device
        self.prefill: list[_PrefillItem] = []
        decode_tokens: list[int] = []
        decode_tables: list[list[int]] = []
        decode_ctx: list[int] = []
        start = 0
        for i, (q, c, table) in enumerate(zip(q_lens, c_lens, tables)):
            if q <= 0 or c < q:
                raise ValueError(f"sequence {i}: need 0 < query_len <= context_len, got {q}, {c}")
            n_blocks = -(-c // block_size)
            if len(table) < n_blocks:
                raise ValueError(f"sequence {i}: {c} tokens need {n_blocks} blocks, block table has {len(table)}")
            if q == 1:
                decode_tokens.append(start)
                decode_tables.append(list(table[:n_blocks]))
                decode_ctx.append(c)
            else:
                if q == c:
                    blocks = None  # the whole context is new: attend over the fresh K/V, no gather
                else:
                    first = table[0]
                    if list(table[:n_blocks]) == list(range(first, first + n_blocks)):
                        blocks = (first, n_blocks)
                    else:
                        blocks = torch.tensor(table[:n_blocks], dtype=torch.long, device=device)
                self.prefill.append(_PrefillItem(start, start + q, c, blocks))
            start += q
        self.decode: _DecodeGroup | None = None
        if decode_tokens:
            all_tokens = len(decode_tokens) == T
            self.decode = _DecodeGroup(
                tokens=None if all_tokens else torch.tensor(decode_tokens, dtype=torch.long, device=device),
                tables=decode_tables, ctx=decode_ctx,
            )

    def prefill_mask(self, item: _PrefillItem, window: int | None) -> torch.Tensor | None:
        """Bool mask [q, ctx] (True = attend), or None when plain ``is_causal`` is exact."""
        if window not in item.masks:
            q, c = item.end - item.start, item.ctx
            if q == c and (window is None or c <= window):
                item.masks[window] = None
            else:
                qpos = torch.arange(c - q, c, device=self.device)[:, None]
                kpos = torch.arange(c, device=self.device)[None, :]
                mask = kpos <= qpos
                if window is not None:
                    mask &= kpos > qpos - window
                item.masks[window] = mask
        return item.masks[window]

    def decode_pieces(self, window: int | None) -> _Pieces:
        g = self.decode
        if window not in g.pieces:
            seqs, rows, gathered, blocks = [], [], [], []
            for i, (table, ctx) in enumerate(zip(g.tables, g.ctx)):
                views, slots, start, stop = _sequence_pieces(table, ctx, window, self.block_size)
                seqs += [i] * len(views)
                rows += views
                gathered += [False] * len(views)
                if slots:
                    base = len(blocks) * self.block_size
                    seqs.append(i)
                    rows.append(slice(base + start, base + stop))
                    gathered.append(True)
                    blocks += slots
            as_long = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
            g.pieces[window] = _Pieces(seqs, rows, gathered, as_long(blocks) if blocks else None,
                                       None if len(seqs) == len(g.ctx) else as_long(seqs))
        return g.pieces[window]


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def decode_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """The decode-attention implementation for this device and dtype: ``"flashinfer"`` (its
    paged kernel reads the pool through the block tables) on CUDA in fp16/bf16 when the
    package is installed, else ``"torch"`` (runs of the pool attended in place, merged)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _installed("flashinfer"):
        return "flashinfer"
    return "torch"


class _FlashInferDecode:
    """flashinfer's batched paged decode over the pool layout ``[slots, block_size, K, D]`` (its NHD)."""

    def __init__(self, workspace: torch.Tensor, g: _DecodeGroup, block_size: int, config: ModelConfig):
        device = workspace.device
        as_int = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
        blocks = [-(-c // block_size) for c in g.ctx]
        indptr = [0]
        for n in blocks:
            indptr.append(indptr[-1] + n)
        self.workspace = workspace
        self.plan_args = (
            as_int(indptr), as_int([s for t, n in zip(g.tables, blocks) for s in t[:n]]),
            as_int([c - (n - 1) * block_size for c, n in zip(g.ctx, blocks)]),
            config.num_heads, config.num_kv_heads, config.head_dim, block_size,
        )
        self.wrappers: dict = {}

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, window: int | None):
        import flashinfer

        w = self.wrappers.get(window)
        if w is None:
            # Tensor cores: its CUDA-core decode kernels only take 1, 2, 3, 4 or 8 query heads per KV head.
            w = self.wrappers[window] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=True)
            w.plan(*self.plan_args, window_left=-1 if window is None else window - 1,
                   q_data_type=q.dtype, kv_data_type=k_pool.dtype)
        return w.run(q.contiguous(), (k_pool, v_pool))


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q ``[1, K, R, D]`` over k, v ``[1, K, L, D]`` (strided views are
    fine): the output ``[1, K, R, D]`` and the float32 log-sum-exp of the scores ``[1, K, R]``."""
    if q.device.type == "cpu":  # the fused kernel SDPA itself dispatches to on CPU
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(s.softmax(-1), v.float()).to(q.dtype), s.logsumexp(-1)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Tied: the output projection is the embedding matrix (no separate parameter).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False
        )
        # Plain attribute (not a buffer): stays valid when the module is built on the meta device.
        self._inv_freq_cpu = rope_inv_freq(config)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self._flashinfer_workspace: dict[torch.device, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = positions.device
        inv = self._inv_freq.get(device)
        if inv is None:
            inv = self._inv_freq[device] = self._inv_freq_cpu.to(device)
        freqs = positions[:, None].float() * inv[None, :]  # [T, head_dim / 2], as HF (both halves)
        return freqs.cos().to(dtype)[:, None, :], freqs.sin().to(dtype)[:, None, :]

    def _check_kv(self, kv: torch.Tensor) -> None:
        c = self.config
        if kv.dim() != 6 or kv.shape[0] != c.num_layers or kv.shape[1] != 2 \
                or kv.shape[4] != c.num_kv_heads or kv.shape[5] != c.head_dim:
            raise ValueError(
                f"kv pool shape {tuple(kv.shape)} does not fit the model: expected "
                f"[{c.num_layers}, 2, num_blocks, block_size, {c.num_kv_heads}, {c.head_dim}]"
            )
        if kv.dtype != self.dtype:
            raise ValueError(f"kv pool dtype {kv.dtype} != model dtype {self.dtype}")
        if kv.device != self.device:
            raise ValueError(f"kv pool on {kv.device} but model weights on {self.device}")
        if not kv[0, 0].is_contiguous():
            raise ValueError("kv pool must be contiguous per layer (the DevicePool layout)")

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, kv: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run one step; write new K/V into ``kv``; return float32 logits.

        Returns ``[B, vocab]`` for the last new token of each sequence, or ``[T, vocab]`` for
        every new token when ``all_logits``.
        """
        self._check_kv(kv)
        c = self.config
        device = kv.device
        block_size = kv.shape[3]
        input_ids = batch.input_ids.to(device, non_blocking=True)
        positions = batch.positions.to(device, non_blocking=True)
        slot_mapping = batch.slot_mapping.to(device, non_blocking=True)
        T = input_ids.shape[0]
        if positions.shape[0] != T or slot_mapping.shape[0] != T:
            raise ValueError(f"input_ids ({T}), positions ({positions.shape[0]}) and slot_mapping "
                             f"({slot_mapping.shape[0]}) must have the same length")
        plan = _Plan(batch, T, block_size, device)
        if plan.decode is not None and decode_kernel(device, self.dtype) == "flashinfer":
            ws = self._flashinfer_workspace.get(device)
            if ws is None:  # scratch the kernel splits long contexts into
                ws = self._flashinfer_workspace[device] = torch.empty(128 << 20, dtype=torch.uint8, device=device)
            plan.decode.kernel = _FlashInferDecode(ws, plan.decode, block_size, c)

        if all_logits:
            keep = None
        else:
            ends = torch.tensor(batch.query_lens, device="cpu").cumsum(0) - 1
            keep = None if len(batch.query_lens) == T else ends.to(device)

        cos, sin = self._rope(positions, self.dtype)
        h = self.embed(input_ids)
        H, K, D = c.num_heads, c.num_kv_heads, c.head_dim
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer.attn_norm(h)
            qkv = layer.attn.qkv(x)
            # RoPE on q and k together (adjacent columns of the fused projection).
            qk = apply_rope(qkv[:, :(H + K) * D].view(T, H + K, D), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, (H + K) * D:].view(T, K, D)
            k_pool, v_pool = kv[i, 0], kv[i, 1]  # [num_blocks, block_size, K, D]
            k_pool.view(-1, K, D).index_copy_(0, slot_mapping, k)
            v_pool.view(-1, K, D).index_copy_(0, slot_mapping, v)
            o = self._attention(plan, q, k, v, k_pool, v_pool, c.layer_window(i))
            o = o.reshape(T, H * D)  # a view for CPU SDPA's [T, H, D]-laid-out output
            if i == last and keep is not None:
                # Only the rows that produce logits need the rest of the last layer.
                o, h = o[keep], h[keep]
            h = layer.attn.o(o).add_(h)  # residual (fresh tensors: add in place)
            h = layer.mlp(layer.mlp_norm(h)).add_(h)
        h = self.norm(h)
        return F.linear(h, self.output_weight()).float()

    def _attention(self, plan: _Plan, q, k, v, k_pool, v_pool, window: int | None) -> torch.Tensor:
        T, H, D = q.shape
        K = k.shape[1]
        gqa = H != K
        # Single sequence whose whole context is new (full prefill): attend directly, no copies.
        if plan.decode is None and len(plan.prefill) == 1 and plan.prefill[0].blocks is None:
            item = plan.prefill[0]
            mask = plan.prefill_mask(item, window)
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=mask, is_causal=mask is None, enable_gqa=gqa,
            )
            return o[0].transpose(0, 1)  # [T, H, D]; SDPA's output is laid out [T, H, D] already

        out = q.new_empty(T, H, D)
        for item in plan.prefill:
            s, e = item.start, item.end
            if item.blocks is None:
                ki, vi = k[s:e], v[s:e]
            elif isinstance(item.blocks, tuple):
                b0, nb = item.blocks
                ki = k_pool[b0:b0 + nb].view(-1, K, D)[:item.ctx]
                vi = v_pool[b0:b0 + nb].view(-1, K, D)[:item.ctx]
            else:
                ki = k_pool.index_select(0, item.blocks).view(-1, K, D)[:item.ctx]
                vi = v_pool.index_select(0, item.blocks).view(-1, K, D)[:item.ctx]
            mask = plan.prefill_mask(item, window)
            oi = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None],
                attn_mask=mask, is_causal=mask is None, enable_gqa=gqa,
            )
            out[s:e] = oi[0].transpose(0, 1)

        g = plan.decode
        if g is not None:
            qd = q if g.tokens is None else q.index_select(0, g.tokens)
            if g.kernel is not None:
                od = g.kernel(qd, k_pool, v_pool, window)
            else:
                od = self._decode_attention(plan.decode_pieces(window), qd, k_pool, v_pool)
            if g.tokens is None:
                out.copy_(od)
            else:
                out.index_copy_(0, g.tokens, od)
        return out

    @staticmethod
    def _decode_attention(pieces: _Pieces, q: torch.Tensor, k_pool: torch.Tensor,
                          v_pool: torch.Tensor) -> torch.Tensor:
        """q ``[B, H, D]`` (one token per sequence) over each sequence's pieces of the pool."""
        B, H, D = q.shape
        K = k_pool.shape[2]
        kf, vf = k_pool.view(-1, K, D), v_pool.view(-1, K, D)  # views: runs are read in place
        if pieces.blocks is not None:
            gk = k_pool.index_select(0, pieces.blocks).view(-1, K, D)
            gv = v_pool.index_select(0, pieces.blocks).view(-1, K, D)
        qs = q.view(B, 1, K, H // K, D)  # the query heads of a KV group as rows
        own = pieces.owner
        outs, lses = [], []
        for i, rows, gathered in zip(pieces.seqs, pieces.rows, pieces.gathered):
            k, v = (gk[rows], gv[rows]) if gathered else (kf[rows], vf[rows])
            o, lse = _attention_lse(qs[i], k[None].transpose(1, 2), v[None].transpose(1, 2))
            outs.append(o)
            lses.append(lse)
        if own is None:
            return torch.cat(outs).view(B, H, D)
        # Merge the pieces of each sequence: softmax over all its keys = its pieces' outputs
        # weighted by exp(lse_piece - lse_sequence).
        lse = torch.cat(lses)  # [P, K, R]
        top = lse.new_full((B, *lse.shape[1:]), -math.inf).scatter_reduce_(
            0, own.view(-1, 1, 1).expand_as(lse), lse, "amax")
        w = (lse - top[own]).exp_()
        num = lse.new_zeros(B, *outs[0].shape[1:]).index_add_(0, own, torch.cat(outs).float() * w[..., None])
        den = lse.new_zeros(top.shape).index_add_(0, own, w)
        return (num / den[..., None]).to(q.dtype).view(B, H, D)
