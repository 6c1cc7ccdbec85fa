"""The block store's wire contract that both sides share: its limits, and ``GetResponse``
written and read by hand.

Through the generated classes every ~200 KB block was copied twice on each side (into the
message, then out of it). Here the server writes the protobuf wire format with one join
(byte-identical to ``SerializeToString``, tested) and the client reads each block as a
memoryview of the received message. The reader accepts anything protobuf would: fields in any
order, unknown fields (skipped), a repeated ``index`` / ``data`` (last one wins).
"""
from __future__ import annotations

from collections.abc import Iterable

HASH_SIZES = (16, 32)  # bytes of a block hash (blake2b-128 or sha256)
MAX_BATCH_BLOCKS = 1024  # hashes or blocks per request, by default
MAX_TOUCH_TTL_S = 30 * 86400  # the longest a Touch may keep blocks

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_BLOCKS = b"\x0a"  # GetResponse.blocks: field 1, length-delimited
_INDEX = b"\x08"  # FoundBlock.index: field 1, varint (omitted when 0, as proto3 does)
_DATA = b"\x12"  # FoundBlock.data: field 2, length-delimited (omitted when empty)


class WireError(ValueError):
    """A GetResponse message that is not valid protobuf."""


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_get_response(found: Iterable[tuple[int, bytes | memoryview]]) -> bytes:
    """Serialized ``GetResponse(blocks=[FoundBlock(index=i, data=d) for i, d in found])``."""
    parts: list[bytes | memoryview] = []
    for index, data in found:
        head = (_INDEX + varint(index) if index else b"") + (_DATA + varint(len(data)) if data else b"")
        parts += (_BLOCKS, varint(len(head) + len(data)), head, data)
    return b"".join(parts)


def decode_get_response(message: bytes | memoryview) -> list[tuple[int, memoryview]]:
    """(index, data) of each FoundBlock in a serialized GetResponse; data are views of
    ``message`` (which they keep alive)."""
    buf = memoryview(message).cast("B")
    pos, end = 0, len(buf)
    blocks: list[tuple[int, memoryview]] = []
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        if key == 0x0A:  # blocks, length-delimited
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise WireError("truncated GetResponse.blocks")
            blocks.append(_found_block(buf, pos, pos + n))
            pos += n
        else:
            pos = _skip(buf, pos, end, key & 7)
    return blocks


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _skip(buf: memoryview, pos: int, end: int, wire_type: int) -> int:
    """Position after an unknown field's value."""
    if wire_type == _VARINT:
        return _read_varint(buf, pos, end)[1]
    if wire_type == _LEN:
        n, pos = _read_varint(buf, pos, end)
        pos += n
    elif wire_type in (_I64, _I32):
        pos += 8 if wire_type == _I64 else 4
    else:
        raise WireError(f"unsupported wire type {wire_type}")
    if pos > end:
        raise WireError("truncated field")
    return pos


def _found_block(buf: memoryview, pos: int, end: int) -> tuple[int, memoryview]:
    index, data = 0, buf[0:0]  # proto3 defaults
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        if key == 0x08:  # index, varint
            index, pos = _read_varint(buf, pos, end)
            index &= 0xFFFFFFFF  # uint32, as protobuf truncates
        elif key == 0x12:  # data, length-delimited
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise WireError("truncated FoundBlock.data")
            data, pos = buf[pos:pos + n], pos + n
        else:
            pos = _skip(buf, pos, end, key & 7)
    return index, data
