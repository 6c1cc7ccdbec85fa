"""GetResponse wire format, both directions by hand: the service's encoder and the client's
zero-copy decoder agree with the generated protobuf code, and the decoder rejects damage."""
from __future__ import annotations

import pytest

from kvstore.blockstore_wire import WireError, decode_get_response, encode_get_response
from kvstore.v1 import blockstore_pb2 as pb

CASES = [
    [], [(0, b"x")], [(0, b"")], [(5, b"abc"), (127, b"y" * 127), (128, b"z" * 128)],
    [(300, b"\x00" * 70000), (2**32 - 1, b"\xff" * 16385)],
]


@pytest.mark.parametrize("found", CASES)
def test_decoder_reads_protobuf_and_hand_encoded_messages(found):
    reference = pb.GetResponse(blocks=[pb.FoundBlock(index=i, data=d) for i, d in found])
    for message in (reference.SerializeToString(), encode_get_response(found)):
        decoded = decode_get_response(message)
        assert [(i, bytes(d)) for i, d in decoded] == found
        assert all(isinstance(d, memoryview) for _, d in decoded)  # views, not copies


def test_decoder_skips_unknown_fields_and_accepts_any_field_order():
    block = b"\x12\x03abc" + b"\x08\x07" + b"\x18\x2a" + b"\x25\x00\x00\x00\x00"  # data, index, 2 unknown
    message = b"\x10\x01" + b"\x0a" + bytes([len(block)]) + block + b"\x1a\x02zz" + b"\x09" + bytes(8)
    assert [(i, bytes(d)) for i, d in decode_get_response(message)] == [(7, b"abc")]
    assert pb.GetResponse.FromString(message).blocks[0].index == 7  # what protobuf reads too


@pytest.mark.parametrize("damage", [
    lambda m: m[:-1],  # truncated data
    lambda m: m[:1],  # truncated length
    lambda m: m + b"\x0a\x7f" + b"\x08\x01",  # block length past the end
    lambda m: m + b"\x0f",  # wire type 7 does not exist
    lambda m: m + b"\x0a" + b"\xff" * 11,  # overlong varint
])
def test_decoder_rejects_malformed_messages(damage):
    message = encode_get_response([(1, b"hello"), (2, b"world")])
    with pytest.raises(WireError):
        decode_get_response(damage(message))
