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
* Attention batching: sequences with one new token (decode) are attended together in one
  ``scaled_dot_product_attention`` call per layer (their blocks gathered into a padded
  ``[B, kv_heads, max_ctx, head_dim]`` tensor plus a key-padding mask; the query heads of a
  KV group are packed as extra query rows, so GQA needs no K/V expansion). Sequences with
  several new tokens (prefill, chunked prefill) get one SDPA call each (a loop over
  sequences, not tokens): ``is_causal`` when the whole context is new, else an explicit
  bottom-right causal mask (query i sits at absolute position ``context_len - query_len + i``).
* Sliding window: implemented (key j is visible to the query at position p iff
  ``p - window < j <= p``, as in transformers); the pool keeps all blocks, the window is a mask.

The module holds fused weights: ``qkv`` = [q_proj; k_proj; v_proj] and ``gate_up`` =
[gate_proj; up_proj] (one matmul each); ``workers.loader`` maps Hugging Face names onto them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kvstore.spec import parse_dtype

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
    blocks: torch.Tensor  # [B * max_blocks] block slots (padded with the sequence's first block)
    max_blocks: int
    ctx: torch.Tensor  # [B] context lengths
    masks: dict = field(default_factory=dict)  # window -> bool mask [B, 1, 1, max_blocks * block_size]


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
            max_blocks = max(len(t) for t in decode_tables)
            flat = [b for t in decode_tables for b in (t + [t[0]] * (max_blocks - len(t)))]
            all_tokens = len(decode_tokens) == T
            self.decode = _DecodeGroup(
                tokens=None if all_tokens else torch.tensor(decode_tokens, dtype=torch.long, device=device),
                blocks=torch.tensor(flat, dtype=torch.long, device=device),
                max_blocks=max_blocks,
                ctx=torch.tensor(decode_ctx, dtype=torch.long, device=device),
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

    def decode_mask(self, window: int | None) -> torch.Tensor:
        g = self.decode
        if window not in g.masks:
            kpos = torch.arange(g.max_blocks * self.block_size, device=self.device)[None, :]
            ctx = g.ctx[:, None]
            mask = kpos < ctx
            if window is not None:
                mask &= kpos >= ctx - window
            g.masks[window] = mask[:, None, None, :]
        return g.masks[window]


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
            B = g.ctx.shape[0]
            L = g.max_blocks * plan.block_size
            qd = q if g.tokens is None else q.index_select(0, g.tokens)
            # Pack the query heads of each KV group as rows: [B, K, H/K, D] (no K/V expansion).
            qd = qd.reshape(B, K, H // K, D)
            kd = k_pool.index_select(0, g.blocks).view(B, L, K, D).transpose(1, 2)
            vd = v_pool.index_select(0, g.blocks).view(B, L, K, D).transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=plan.decode_mask(window))
            od = od.reshape(B, H, D)
            if g.tokens is None:
                out.copy_(od)
            else:
                out.index_copy_(0, g.tokens, od)
        return out
