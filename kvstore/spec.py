"""KV layout of one model shard: the shape of a block and the model fingerprint."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

# Bump when the in-memory or on-the-wire block layout changes: old blocks then stop matching.
LAYOUT_VERSION = 1

# Stable small ids for dtypes, used by the block header and the fingerprint.
DTYPE_IDS: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
DTYPES_BY_ID = {v: k for k, v in DTYPE_IDS.items()}
DTYPE_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# KV storage codecs (kvstore.codec). Exact ones give back the bytes, so their blocks are
# interchangeable; each lossy one, by its id in block headers, gets fingerprints of its own.
EXACT = "exact"
EXACT_CODECS = ("raw", "lz4")
LOSSY_CODEC_IDS = {"int8": 2, "fp8": 3}
# A lossy spec's fingerprint ends with these bytes and its codec's id, so that a codec holding
# only a fingerprint knows which codec the spec's blocks must use (an exact one ends so by
# chance with probability 2**-32).
_LOSSY_TAG = b"\xffkq"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Accept a torch dtype or its name ("bfloat16"); raise ValueError naming the choices."""
    if isinstance(name, torch.dtype):
        if name not in DTYPE_IDS:
            raise ValueError(f"unsupported KV dtype {name}; use one of {sorted(DTYPE_NAMES)}")
        return name
    try:
        return DTYPE_NAMES[name.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {name!r}; use one of {sorted(DTYPE_NAMES)}") from None


def kv_codec_class(name: str) -> str:
    """``"exact"`` for an exact codec (or ``"exact"``), a lossy codec's own name for it."""
    if name == EXACT or name in EXACT_CODECS:
        return EXACT
    if name in LOSSY_CODEC_IDS:
        return name
    raise ValueError(f"unknown KV codec {name!r}; use one of "
                     f"{[EXACT, *EXACT_CODECS, *LOSSY_CODEC_IDS]}")


def fingerprint_kv_codec(fingerprint: bytes) -> str:
    """The ``KVSpec.kv_codec`` a fingerprint was made for: ``"exact"`` or a lossy codec."""
    if fingerprint[-4:-1] == _LOSSY_TAG:
        for name, codec_id in LOSSY_CODEC_IDS.items():
            if fingerprint[-1] == codec_id:
                return name
    return EXACT


@dataclass(frozen=True, slots=True)
class KVSpec:
    """Everything that decides whether a stored KV block can be reused by a model.

    Two specs with different fingerprints never share blocks: the fingerprint is part of the
    root of every prefix hash and is checked again in every stored block's header.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    block_size: int = 16
    model_id: str = "unnamed"
    weights_digest: str = ""
    tp_rank: int = 0
    tp_size: int = 1
    layout_version: int = LAYOUT_VERSION
    # "exact" (also given as "raw" or "lz4") or a lossy codec; only lossy ones change the
    # fingerprint, so lossy blocks never mix with exact ones or with another codec's.
    kv_codec: str = EXACT
    _fingerprint: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        try:
            object.__setattr__(self, "kv_codec", kv_codec_class(self.kv_codec))
        except ValueError as e:
            raise ValueError(f"KVSpec.kv_codec: {e}") from None
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVSpec.{name} must be a positive int, got {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVSpec.tp_rank {self.tp_rank} outside [0, tp_size={self.tp_size})")
        # JSON keeps field boundaries unambiguous ("a|b" + "" never equals "a" + "|b").
        fields = [
            "kvspec", self.layout_version, self.model_id, self.weights_digest,
            dtype_name(self.dtype), self.num_layers, self.num_kv_heads, self.head_dim,
            self.block_size, self.tp_rank, self.tp_size,
        ]
        if self.kv_codec == EXACT:  # as before lossy codecs existed: stored blocks stay valid
            fp = hashlib.blake2b(json.dumps(fields).encode(), digest_size=16).digest()
        else:
            digest = hashlib.blake2b(json.dumps([*fields, self.kv_codec]).encode(), digest_size=12)
            fp = digest.digest() + _LOSSY_TAG + bytes([LOSSY_CODEC_IDS[self.kv_codec]])
        object.__setattr__(self, "_fingerprint", fp)

    @property
    def fingerprint(self) -> bytes:
        """16-byte digest of model identity, KV layout and (if lossy) the KV codec."""
        return self._fingerprint

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block, page-first: [layers, 2 (K, V), block_size, kv_heads, head_dim]."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_numel(self) -> int:
        return math.prod(self.block_shape)

    @property
    def bytes_per_block(self) -> int:
        return self.block_numel * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size
