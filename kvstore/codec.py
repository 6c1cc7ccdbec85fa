"""Serialized form of one KV block: a versioned, checksummed header and a payload.

Layout (little-endian), version 2::

    magic "KVSB" | version u16 | header_len u32 | codec u8 | dtype u8
    | ndim u8 | hash_len u8 | parent_len u8 | pad_len u8 | n_planes u8 | n_tokens u32
    | shape u32*ndim | fingerprint 16B | hash | parent | tokens u32*n_tokens | zero*pad_len
    | (plane_codec u8, stored_len u32)*n_planes
    | raw_len u64 | payload_len u64 | payload_sum u64 | header_crc32 u32  || payload (the planes, in order)

Counts come first so the rest of the header parses with one cached ``struct.Struct``; the
padding makes the payload 8-byte aligned. Exact codecs: ``raw``; ``lz4``, byte planes each
compressed on its own and kept compressed only when that saves ``min_saving`` (else the whole
block is ``raw``). Lossy codecs (symmetric, scales rounded to bf16 before quantizing):
``int8``, planes K scales per channel [layers, heads, head_dim] over the block's tokens, V
scales per token [layers, tokens, heads] over head_dim, then int8 values in block order;
``fp8``, planes one scale per group of g consecutive elements (g = elements / scales, a
divisor of heads * head_dim), then float8 e4m3fn values. A lossy block's fingerprint must be
its ``KVSpec(kv_codec=...)``'s, which names the codec (``kvstore.spec.fingerprint_kv_codec``):
the encoder refuses any other and decoders reject a block whose codec is not the one their
expected fingerprint names. ``payload_sum`` = sum of (2i+1) * w[i] mod 2**64 over the payload's
little-endian 64-bit words as stored. Decoding trusts nothing and raises a
``BlockCodecError`` naming the first mismatch. Design and measurements: docs/architecture.md,
docs/codecs.md (the lossy codecs).
"""
from __future__ import annotations

import functools
import math
import struct
import warnings
import zlib
from enum import IntEnum
from typing import NamedTuple, NoReturn

import lz4.block
import numpy as np
import torch

from kvstore.hashing import token_bytes
from kvstore.spec import DTYPE_IDS, DTYPE_ITEMSIZE, DTYPES_BY_ID, EXACT, LOSSY_CODEC_IDS, fingerprint_kv_codec

MAGIC = b"KVSB"
CODEC_VERSION = 2
MIN_SAVING = 0.03
MAX_HEADER_LEN = 1 << 20
# magic, version, header_len, codec, dtype, ndim, hash_len, parent_len, pad_len, n_planes, n_tokens
_PREFIX = struct.Struct("<4sHIBBBBBBBI")
_U32 = struct.Struct("<I")
_TAIL = struct.Struct("<QQQI")  # raw_len, payload_len, payload_sum, header_crc
_PLANE = struct.Struct("<BI")  # plane codec, stored length
_ALIGN = 8  # header_len is a multiple of this
_U64 = 2**64
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32}  # one element as a little-endian word


# Decoding reads the payload (often ``bytes``) through read-only torch views: never written.
warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning, __name__)


class Codec(IntEnum):
    RAW = 0
    LZ4 = 1
    INT8 = 2
    FP8 = 3

    @property
    def kv_codec(self) -> str:
        """The ``KVSpec.kv_codec`` of the specs whose blocks this codec stores."""
        return _KV_CODECS[self]


class PlaneCodec(IntEnum):
    """How one plane of a block is stored (``BlockHeader.planes``)."""
    STORED = 0  # exact bytes (raw, or an lz4 byte plane left as is)
    LZ4 = 1  # an lz4-compressed byte plane
    SCALES_BF16 = 2  # lossy: one bf16 scale per group of elements
    INT8 = 3  # lossy: int8 values, times their scale
    FP8_E4M3 = 4  # lossy: float8 e4m3fn values, times their scale


_CODECS = {c.value: c for c in Codec}
_KV_CODECS = {c: c.name.lower() if c.name.lower() in LOSSY_CODEC_IDS else EXACT for c in Codec}
assert {c.kv_codec: c.value for c in Codec if c.kv_codec != EXACT} == LOSSY_CODEC_IDS
INT8_MAX = 127
FP8_MAX = 448.0  # largest finite float8 e4m3fn
FP8_GROUP = 64  # elements per fp8 scale at most (~32 dB SNR on Gaussian data)
# float8 e4m3fn bits placed in a wider float: (int(b) << shift) & mask has the value of b times
# 2**-bias_shift, subnormals included (same mantissa bits, exponent bias 7 against the wider one).
_GRAIN = 32768  # torch's at::internal::GRAIN_SIZE: smaller element-wise ops run serially
_ROUND = 1.5 * 2**23
_BF16_128 = 0x4300  # bf16 bits of 128.0: below it, scale * 2**120 is a finite float
# Masks 0x87F0, 0xBF80 and 0x87F00000, as signed ints.
_FP8_WIDEN = {torch.bfloat16: (torch.int16, 4, -0x7810, 120), torch.float16: (torch.int16, 7, -0x4080, 8),
              torch.float32: (torch.int32, 20, -0x78100000, 120)}


class BlockCodecError(ValueError):
    """A serialized block cannot be used. Treat as a cache miss."""


class CorruptBlockError(BlockCodecError):
    """The bytes are damaged: bad magic, CRC, length or compressed stream."""


class UnsupportedBlockError(BlockCodecError):
    """Written by an unknown codec version, codec or dtype."""


class BlockMismatchError(BlockCodecError):
    """Intact, but not the block asked for (other model, other hash, other shape)."""


class BlockHeader(NamedTuple):
    # A NamedTuple, not a frozen dataclass: built on every decode, and a frozen dataclass's
    # __init__ (one object.__setattr__ per field) cost ~2 us of a ~4 us header parse.
    codec: Codec
    dtype: torch.dtype
    shape: tuple[int, ...]
    fingerprint: bytes
    block_hash: bytes
    parent_hash: bytes
    token_ids: tuple[int, ...]
    raw_len: int
    payload_len: int
    payload_sum: int
    header_len: int
    planes: tuple[tuple[int, int], ...]  # (plane codec, stored length)


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor (no copy)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    return t.view(torch.uint8).reshape(-1).numpy()


def parse_codec(codec: Codec | str) -> Codec:
    """A codec by name (``"raw"``, ``"lz4"``, ``"int8"``, ``"fp8"``) or id; ``ValueError``
    naming the choices otherwise."""
    try:
        return Codec[codec.upper()] if isinstance(codec, str) else Codec(codec)
    except (KeyError, ValueError):
        raise ValueError(f"unknown codec {codec!r}; use one of "
                         f"{[c.name.lower() for c in Codec]}") from None


def encode_block(
    data: np.ndarray,
    *,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    fingerprint: bytes,
    block_hash: bytes,
    parent_hash: bytes,
    token_ids: tuple[int, ...] | list[int],
    codec: Codec | str = Codec.LZ4,
    min_saving: float = MIN_SAVING,
) -> bytes:
    """Serialize one block. ``data`` is the block's bytes as a flat uint8 array.

    A lossy ``codec`` needs the fingerprint of a ``KVSpec`` with that ``kv_codec``, an exact
    one that of an exact spec (``ValueError`` otherwise): lossy and exact blocks never mix.
    """
    codec = parse_codec(codec)
    if codec.kv_codec != (wanted := fingerprint_kv_codec(fingerprint)):
        raise ValueError(f"codec {codec.name.lower()} cannot store blocks of a spec with "
                         f"kv_codec={wanted!r}: build the KVSpec with kv_codec={codec.kv_codec!r}")
    if dtype not in DTYPE_IDS:
        raise UnsupportedBlockError(f"dtype {dtype} has no codec id")
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    itemsize = DTYPE_ITEMSIZE[dtype]
    expected = itemsize * math.prod(shape)
    if data.size != expected:
        raise ValueError(f"block has {data.size} bytes, shape {shape} of {dtype} needs {expected}")

    parts: list[np.ndarray] = [data]
    planes = [(PlaneCodec.STORED, data.size)]
    if codec.kv_codec != EXACT:
        parts, planes = _quantize(torch.from_numpy(data).view(dtype).view(shape), codec)
    elif codec is Codec.LZ4:
        parts, planes = _compress_planes(data, itemsize, min_saving)
        if sum(n for _, n in planes) > data.size * (1 - min_saving):
            codec, parts, planes = Codec.RAW, [data], [(PlaneCodec.STORED, data.size)]

    if len(fingerprint) != 16:
        raise ValueError("fingerprint must be 16 bytes")
    if not (0 < len(block_hash) < 256 and 0 < len(parent_hash) < 256):
        raise ValueError("hashes must be 1..255 bytes")
    tokens = token_bytes(np.asarray(token_ids))
    body = _body_struct(len(shape), len(block_hash), len(parent_hash), len(tokens) // 4, 0,
                        len(planes)).size
    pad = -(_PREFIX.size + body) % _ALIGN
    payload = b"".join(parts)
    head = bytearray(_PREFIX.pack(
        MAGIC, CODEC_VERSION, _PREFIX.size + body + pad, codec, DTYPE_IDS[dtype], len(shape),
        len(block_hash), len(parent_hash), pad, len(planes), len(tokens) // 4))
    head += struct.pack(f"<{len(shape)}I", *shape)
    head += fingerprint + block_hash + parent_hash + tokens + bytes(pad)
    for kind, n in planes:
        head += _PLANE.pack(kind, n)
    head += _TAIL.pack(data.size, len(payload), _checksum(payload), 0)[:-4]
    head += _U32.pack(zlib.crc32(head))
    return bytes(head) + payload


@functools.lru_cache(maxsize=64)
def _body_struct(ndim: int, hash_len: int, parent_len: int, n_tokens: int, pad: int,
                 n_planes: int) -> struct.Struct:
    """The header after the prefix: shape, fingerprint, hashes, tokens, padding, plane table,
    raw_len, payload_len, payload_sum and the CRC."""
    return struct.Struct(f"<{ndim}I16s{hash_len}s{parent_len}s{n_tokens}I{pad}x"
                         + _PLANE.format[1:] * n_planes + _TAIL.format[1:])


@functools.lru_cache(maxsize=8)
def _odd_weights(n: int) -> np.ndarray:
    return np.arange(1, 2 * n, 2, dtype=np.uint64)


def _checksum(buf: bytes | np.ndarray) -> int:
    """The payload checksum: sum of (2i+1) * w[i] mod 2**64 over little-endian 64-bit words."""
    a = np.frombuffer(buf, dtype=np.uint8)
    n = a.size // 8
    # Weights for a power of two words, sliced: a few block sizes share one cached array.
    # einsum, not dot: its unrolled integer loop is 10-30% faster here (both wrap mod 2**64).
    total = int(np.einsum("i,i->", a[: 8 * n].view("<u8"), _odd_weights(1 << n.bit_length())[:n]))
    if tail := a[8 * n:].tobytes():
        total += (2 * n + 1) * int.from_bytes(tail, "little")
    return total % _U64


def _split_planes(data: np.ndarray, itemsize: int) -> list[np.ndarray]:
    # Shifts on a little-endian word view beat strided byte slicing by ~3x.
    words = data.view(f"<u{itemsize}")
    return [(words >> (8 * k)).astype(np.uint8) if k else words.astype(np.uint8)
            for k in range(itemsize)]


def _join_planes(planes: list[np.ndarray], out: np.ndarray) -> None:
    """Interleave byte planes (lowest byte first) into ``out``, a flat uint8 array."""
    words = out.view(_WORDS[len(planes)])
    # Whole-word ufuncs, not strided byte writes (~3x slower in numpy). Each lower plane is
    # ORed in after the bytes above it moved up one: "* 256", not "<< 8", because numpy
    # vectorizes the multiply and not the shift for these widths (~2x faster here). The first
    # multiply also zero-extends the top plane, so ``out`` is written whole in the first pass.
    if len(planes) == 1:
        np.copyto(words, planes[0])
        return
    np.multiply(planes[-1], 256, out=words, dtype=words.dtype)
    for k in range(len(planes) - 2, -1, -1):
        np.bitwise_or(words, planes[k], out=words, dtype=words.dtype)
        if k:
            np.multiply(words, 256, out=words)


def _compress_planes(
    data: np.ndarray, itemsize: int, min_saving: float
) -> tuple[list[np.ndarray], list[tuple[PlaneCodec, int]]]:
    parts: list[np.ndarray] = []
    planes: list[tuple[PlaneCodec, int]] = []
    for plane in _split_planes(data, itemsize):
        packed = lz4.block.compress(plane, store_size=False)
        if len(packed) <= plane.size * (1 - min_saving):
            parts.append(np.frombuffer(packed, dtype=np.uint8))
            planes.append((PlaneCodec.LZ4, len(packed)))
        else:
            parts.append(plane)
            planes.append((PlaneCodec.STORED, plane.size))
    return parts, planes


def _checked_prefix(mv: memoryview) -> tuple:
    """The fixed prefix's fields, once magic, version, header length and header CRC hold."""
    if len(mv) < _PREFIX.size + _TAIL.size:
        raise CorruptBlockError(f"block too short ({len(mv)} bytes)")
    fields = _PREFIX.unpack_from(mv)
    magic, version, header_len = fields[:3]
    if magic != MAGIC:
        raise CorruptBlockError(f"bad magic {bytes(magic)!r}")
    if version != CODEC_VERSION:
        raise UnsupportedBlockError(f"codec version {version}, this build reads {CODEC_VERSION}")
    if not _PREFIX.size + _TAIL.size <= header_len <= min(len(mv), MAX_HEADER_LEN):
        raise CorruptBlockError(f"bad header length {header_len}")
    if zlib.crc32(mv[: header_len - 4]) != _U32.unpack_from(mv, header_len - 4)[0]:
        raise CorruptBlockError("header checksum mismatch")
    return fields


def read_header(buf: bytes | memoryview) -> BlockHeader:
    """Parse and verify a block's header (not its payload)."""
    mv = memoryview(buf)
    (_, _, header_len, codec_id, dtype_id, ndim, hash_len, parent_len, pad, n_planes,
     n_tokens) = _checked_prefix(mv)
    # Sizes add up before a Struct is built: a (CRC-valid) n_tokens of 2**32 must not be one.
    body_len = (4 * ndim + 16 + hash_len + parent_len + 4 * n_tokens + pad
                + _PLANE.size * n_planes + _TAIL.size)
    if _PREFIX.size + body_len != header_len:
        raise CorruptBlockError("header fields do not add up to header length")
    if pad >= _ALIGN:
        raise CorruptBlockError(f"bad header padding {pad}")
    codec = _CODECS.get(codec_id)
    if codec is None:
        raise UnsupportedBlockError(f"unknown codec id {codec_id}")
    dtype = DTYPES_BY_ID.get(dtype_id)
    if dtype is None:
        raise UnsupportedBlockError(f"unknown dtype id {dtype_id}")

    body = _body_struct(ndim, hash_len, parent_len, n_tokens, pad, n_planes).unpack_from(
        mv, _PREFIX.size)
    shape = body[:ndim]
    fingerprint, block_hash, parent_hash = body[ndim:ndim + 3]
    i = ndim + 3 + n_tokens
    tokens = body[ndim + 3:i]
    planes = tuple(zip(body[i:i + 2 * n_planes:2], body[i + 1:i + 2 * n_planes:2]))
    raw_len, payload_len, payload_sum = body[-4:-1]
    if raw_len != DTYPE_ITEMSIZE[dtype] * math.prod(shape):
        raise CorruptBlockError("raw length does not match shape and dtype")
    if sum(n for _, n in planes) != payload_len:
        raise CorruptBlockError("plane lengths do not add up to payload length")
    if codec.kv_codec != fingerprint_kv_codec(fingerprint):
        raise CorruptBlockError(f"codec {codec.name.lower()} in a block whose fingerprint is for "
                                f"kv_codec={fingerprint_kv_codec(fingerprint)!r}")
    if codec.kv_codec != EXACT:
        _check_lossy_planes(codec, shape, planes)
    return BlockHeader(codec, dtype, shape, fingerprint, block_hash, parent_hash, tokens,
                       raw_len, payload_len, payload_sum, header_len, planes)


def peek_block(buf: bytes | memoryview) -> tuple[bytes, int]:
    """(block hash, total length header + payload) of an encoded block, checking only its
    magic, version, header length and header CRC: several times cheaper than ``read_header``,
    for stores that re-check blocks which ``read_header`` accepted when they were written."""
    mv = memoryview(buf)
    _, _, header_len, _, _, ndim, hash_len, *_ = _checked_prefix(mv)
    # The CRC matched: the header is as encode_block wrote it; only lengths need care.
    off = _PREFIX.size + 4 * ndim + 16  # after shape and fingerprint
    if off + hash_len > header_len - _TAIL.size:
        raise CorruptBlockError("malformed header: hash past its end")
    _, payload_len, _, _ = _TAIL.unpack_from(mv, header_len - _TAIL.size)
    return bytes(mv[off:off + hash_len]), header_len + payload_len


def decode_block(
    buf: bytes | memoryview,
    *,
    out: np.ndarray | None = None,
    expect_fingerprint: bytes | None = None,
    expect_hash: bytes | None = None,
    expect_dtype: torch.dtype | None = None,
    expect_shape: tuple[int, ...] | None = None,
) -> tuple[BlockHeader, np.ndarray]:
    """Verify and decode a block into ``out`` (a flat uint8 array) or a new array.

    On a ``BlockCodecError`` after the header checks, ``out`` may hold garbage: the payload
    checksum is verified after decoding, when the decode's own reads have brought the payload
    into cache (one pass over cold memory fewer: ~5% of a bf16 decode here). lz4's block
    decoder is memory-safe on any input, so damaged planes cannot do harm before that.
    """
    mv = memoryview(buf)
    hdr = read_header(mv)
    if expect_fingerprint is not None:
        if hdr.codec.kv_codec != (wanted := fingerprint_kv_codec(expect_fingerprint)):
            _mismatch("codec", wanted, hdr.codec.kv_codec)
        if expect_fingerprint != hdr.fingerprint:
            _mismatch("fingerprint", expect_fingerprint, hdr.fingerprint)
    if expect_hash is not None and expect_hash != hdr.block_hash:
        _mismatch("block hash", expect_hash, hdr.block_hash)
    if expect_dtype is not None and expect_dtype != hdr.dtype:
        _mismatch("dtype", expect_dtype, hdr.dtype)
    if expect_shape is not None and tuple(expect_shape) != hdr.shape:
        _mismatch("shape", tuple(expect_shape), hdr.shape)
    if len(mv) - hdr.header_len != hdr.payload_len:
        raise CorruptBlockError(
            f"payload is {len(mv) - hdr.header_len} bytes, header says {hdr.payload_len}")
    if out is None:
        out = np.empty(hdr.raw_len, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.ndim != 1 or out.size != hdr.raw_len:
        raise ValueError(f"out must be a flat uint8 array of {hdr.raw_len} bytes")
    payload = np.frombuffer(mv, dtype=np.uint8, offset=hdr.header_len)
    if hdr.codec is Codec.RAW:
        if hdr.planes != ((PlaneCodec.STORED, hdr.raw_len),):
            raise CorruptBlockError("raw block with a plane table")
        out[:] = payload
    elif hdr.codec is Codec.LZ4:
        _decode_planes(hdr, payload, out)
    else:
        with torch.inference_mode():  # ~15% off an int8 decode: its dozen small ops skip autograd's bookkeeping
            _dequantize(hdr, payload, out)
    if _checksum(payload) != hdr.payload_sum:
        raise CorruptBlockError("payload checksum mismatch")
    return hdr, out


def _decode_planes(hdr: BlockHeader, payload: np.ndarray, out: np.ndarray) -> None:
    itemsize = len(hdr.planes)
    if itemsize != DTYPE_ITEMSIZE[hdr.dtype]:
        raise CorruptBlockError("plane count does not match dtype size")
    plane_len = hdr.raw_len // itemsize
    planes: list[np.ndarray] = []
    off = 0
    for k, (kind, n) in enumerate(hdr.planes):
        chunk = payload[off:off + n]  # a view: stored planes are never copied
        off += n
        if kind == PlaneCodec.STORED:
            if n != plane_len:
                raise CorruptBlockError("stored plane has the wrong length")
        elif kind == PlaneCodec.LZ4:
            try:
                chunk = np.frombuffer(
                    lz4.block.decompress(chunk, uncompressed_size=plane_len), dtype=np.uint8)
            except lz4.block.LZ4BlockError as e:
                raise CorruptBlockError(f"lz4 plane {k}: {e}") from None
            if chunk.size != plane_len:  # python-lz4 returns a short output without error
                raise CorruptBlockError("lz4 plane decompressed to the wrong length")
        else:
            raise UnsupportedBlockError(f"unknown plane codec {kind}")
        planes.append(chunk)
    _join_planes(planes, out)


def _lossy_planes(codec: Codec, shape: tuple[int, ...], group: int = 0) -> tuple[tuple[int, int], ...]:
    """The plane table of a lossy block of ``shape`` (fp8: ``group`` elements per scale)."""
    layers, _, tokens, heads, head_dim = shape
    n = math.prod(shape)
    if codec is Codec.INT8:
        return ((PlaneCodec.SCALES_BF16, 2 * layers * heads * head_dim),
                (PlaneCodec.SCALES_BF16, 2 * layers * tokens * heads), (PlaneCodec.INT8, n))
    group = group or _fp8_group(shape)
    return (PlaneCodec.SCALES_BF16, 2 * (n // group)), (PlaneCodec.FP8_E4M3, n)


def _fp8_group(shape: tuple[int, ...]) -> int:
    """Elements per fp8 scale: at most FP8_GROUP, within one token's heads * head_dim."""
    return math.gcd(FP8_GROUP, shape[3] * shape[4])


def _check_lossy_planes(codec: Codec, shape: tuple[int, ...], planes: tuple[tuple[int, int], ...]) -> None:
    if len(shape) != 5 or shape[1] != 2 or 0 in shape:
        raise CorruptBlockError(f"{codec.name.lower()} block of shape {shape}, not [layers, 2, tokens, heads, head_dim]")
    group = 0
    if codec is Codec.FP8:  # any group size that tiles a token's heads * head_dim
        n_scales = planes[0][1] // 2 if planes else 0
        group = math.prod(shape) // n_scales if n_scales else 0
        if not group or shape[3] * shape[4] % group:
            raise CorruptBlockError(f"fp8 plane table {planes} has no valid group size")
    if planes != _lossy_planes(codec, shape, group):
        raise CorruptBlockError(f"{codec.name.lower()} plane table {planes} does not fit shape {shape}")


def _bf16_scales(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    return (amax / qmax).to(torch.bfloat16)


def _serial_chunks(rows: int, row_numel: int) -> list[slice]:
    """Row slices of fewer than ``_GRAIN`` elements each (one slice if torch runs on one
    thread): torch runs an op that small on the calling thread alone. A parallel op waits for
    its OpenMP team, and on a busy host (the model, the T2 writers, gRPC) a descheduled team
    thread stalls it by milliseconds; the chunks' extra ops cost ~30 us per 192 KiB block."""
    step = rows if torch.get_num_threads() == 1 else max(1, (_GRAIN - 1) // row_numel)
    return [slice(i, i + step) for i in range(0, rows, step)]


def _quantize(x: torch.Tensor, codec: Codec) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Scales and values of ``x`` ([layers, 2, tokens, heads, head_dim]) under a lossy codec.
    Values are divided by their scale after it is rounded to bf16, so decoding multiplies by
    exactly the scale the values were made with."""
    if x.dim() != 5 or x.shape[1] != 2:
        raise ValueError(f"lossy codecs need a block shape [layers, 2, tokens, heads, head_dim], got {tuple(x.shape)}")
    layers, _, tokens, heads, head_dim = shape = tuple(x.shape)
    if codec is Codec.INT8:
        scales = [torch.empty(layers, 1, heads, head_dim, dtype=torch.bfloat16),  # K: per channel
                  torch.empty(layers, tokens, heads, 1, dtype=torch.bfloat16)]  # V: per token
        values = torch.empty(shape, dtype=torch.int8)
        for c in _serial_chunks(layers, x[0].numel()):
            part = x[c].to(torch.float32, copy=True)
            for half, dim in ((0, 1), (1, 3)):
                scales[half][c] = s = _bf16_scales(part[:, half].abs().amax(dim=dim, keepdim=True), INT8_MAX)
                part[:, half].div_(s)
            # Round half to even by adding and subtracting 1.5 * 2**23 (exact below 2**22):
            # round_ is one of torch's unary ops that go parallel from 2048 elements.
            part.nan_to_num_(0.0).clamp_(-INT8_MAX, INT8_MAX).add_(_ROUND).sub_(_ROUND)
            values[c] = part
    else:
        groups = x.view(-1, _fp8_group(shape))
        scales = [torch.empty(groups.shape[0], 1, dtype=torch.bfloat16)]
        values = torch.empty(groups.shape, dtype=torch.float8_e4m3fn)
        for c in _serial_chunks(*groups.shape):
            part = groups[c].to(torch.float32, copy=True)
            scales[0][c] = s = _bf16_scales(part.abs().amax(dim=1, keepdim=True), FP8_MAX)
            values[c] = part.div_(s).nan_to_num_(0.0).clamp_(-FP8_MAX, FP8_MAX)
    if not all(bool(torch.isfinite(s).all()) for s in scales):
        raise ValueError("lossy codecs need finite KV values (the block has inf or nan)")
    return [tensor_bytes(t) for t in (*scales, values)], list(_lossy_planes(codec, shape))


def _view(payload: np.ndarray, start: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(payload[start:start + n]).view(dtype)


def _dequantize(hdr: BlockHeader, payload: np.ndarray, out: np.ndarray) -> None:
    """Scale and write a lossy block's values into ``out`` as ``hdr.dtype``, chunk by chunk:
    one widening copy into ``out``, then in place (fp8: two bit operations and) a multiply by
    the scales. (A mixed int8 * bf16 multiply into ``out`` measured slower: torch widens
    through a temporary.)"""
    (_, s0), *rest = hdr.planes
    dtype, shape = hdr.dtype, hdr.shape
    target = torch.from_numpy(out).view(dtype)
    if hdr.codec is Codec.INT8:
        layers, _, tokens, heads, head_dim = shape
        s1 = rest[0][1]
        k_scales = _view(payload, 0, s0, torch.bfloat16).view(layers, 1, heads, head_dim).to(dtype)
        v_scales = _view(payload, s0, s1, torch.bfloat16).view(layers, tokens, heads, 1).to(dtype)
        values = _view(payload, s0 + s1, rest[1][1], torch.int8).view(shape)
        target = target.view(shape)
        for c in _serial_chunks(layers, values[0].numel()):
            part = target[c]
            part.copy_(values[c])
            part.select(1, 0).mul_(k_scales[c])
            part.select(1, 1).mul_(v_scales[c])
        return
    n_groups = s0 // 2
    words, shift, mask, bias_shift = _FP8_WIDEN[dtype]
    bits = target.view(words).view(n_groups, -1)
    values = _view(payload, s0, rest[0][1], torch.int8).view(n_groups, -1)
    scales = _view(payload, 0, s0, torch.bfloat16).view(n_groups, 1).float()
    pre = 1.0
    if payload[:s0].view("<u2").max() >= _BF16_128:  # scale * 2**bias_shift may overflow
        pre, bias_shift = 2.0**(bias_shift // 2), bias_shift - bias_shift // 2
    factors = (scales * 2.0**bias_shift).to(dtype)
    for c in _serial_chunks(*values.shape):
        part = bits[c]
        part.copy_(values[c])  # sign-extends
        part.bitwise_left_shift_(shift).bitwise_and_(mask)
        if pre != 1.0:
            part.view(dtype).mul_(pre)
        part.view(dtype).mul_(factors[c])


def _mismatch(what: str, want: object, got: object) -> NoReturn:
    raise BlockMismatchError(f"{what} mismatch: wanted {want!r}, block has {got!r}")
