"""Hand-decoded ``GetResponse`` messages (the client's side of ``services/blockstore/wire``).

Parsing with the generated class copies every block twice (into the message, then out of
``FoundBlock.data``); restores move hundreds of ~200 KB blocks per call. Here the protobuf
wire format is read directly and each block is a memoryview of the received message: no
copy. Accepts anything protobuf would: fields in any order, unknown fields (skipped), and
a repeated ``index`` / ``data`` (last one wins).
"""
from __future__ import annotations


class WireError(ValueError):
    """A GetResponse message that is not valid protobuf."""


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
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
        return _varint(buf, pos, end)[1]
    if wire_type == _LEN:
        n, pos = _varint(buf, pos, end)
        pos += n
    elif wire_type == _I64:
        pos += 8
    elif wire_type == _I32:
        pos += 4
    else:
        raise WireError(f"unsupported wire type {wire_type}")
    if pos > end:
        raise WireError("truncated field")
    return pos


def _found_block(buf: memoryview, pos: int, end: int) -> tuple[int, memoryview]:
    index, data = 0, buf[0:0]  # proto3 defaults
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 1 and wire_type == _VARINT:
            index, pos = _varint(buf, pos, end)
            index &= 0xFFFFFFFF  # uint32, as protobuf truncates
        elif field == 2 and wire_type == _LEN:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise WireError("truncated FoundBlock.data")
            data, pos = buf[pos:pos + n], pos + n
        else:
            pos = _skip(buf, pos, end, wire_type)
    return index, data


def decode_get_response(message: bytes | memoryview) -> list[tuple[int, memoryview]]:
    """(index, data) of each FoundBlock in a serialized GetResponse; data are views of
    ``message`` (which they keep alive)."""
    buf = memoryview(message).cast("B")
    pos, end = 0, len(buf)
    blocks: list[tuple[int, memoryview]] = []
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 1 and wire_type == _LEN:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise WireError("truncated GetResponse.blocks")
            blocks.append(_found_block(buf, pos, pos + n))
            pos += n
        else:
            pos = _skip(buf, pos, end, wire_type)
    return blocks
