"""Hot-path message encoding for data chunks, wire-compatible with ``kvstore.proto``.

A data-only ``PutRequest`` or ``GetResponse`` is field 2 (``bytes data``): tag byte ``0x12``, a varint length and
the payload. Building and parsing that frame by hand saves the protobuf copies (message construction copies the
payload, field access copies it again); everything else goes through the generated classes. Messages from other
clients that do not have this exact shape fall back to the generated parser, so any protobuf client interoperates.
"""

from __future__ import annotations

from kvrecall.kvstore.v1 import kvstore_pb2 as pb

__all__ = ["encode_varint", "encode_data", "split_data", "passthrough", "parse_put_request", "parse_get_response"]

_DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_data(chunk: memoryview | bytes) -> bytes:
    """Serialized message whose only field is ``data = chunk`` (one copy of the chunk)."""
    return b"".join((b"\x12", encode_varint(len(chunk)), chunk))


def split_data(raw: bytes) -> memoryview | None:
    """The payload of a data-only message as a view into ``raw``, or None if ``raw`` has another shape."""
    n = len(raw)
    if n < 2 or raw[0] != _DATA_TAG:
        return None
    length = 0
    shift = 0
    i = 1
    while i < n and i < 11:
        byte = raw[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            if i + length == n:
                return memoryview(raw)[i:]
            return None
        shift += 7
    return None


def passthrough(message: object) -> bytes:
    """Serializer for streams that yield either pre-encoded ``bytes`` or generated messages."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def parse_put_request(raw: bytes) -> memoryview | pb.PutRequest:
    """Deserializer for Put: a view of the payload for data-only messages, else a ``PutRequest``."""
    view = split_data(raw)
    return view if view is not None else pb.PutRequest.FromString(raw)


def parse_get_response(raw: bytes) -> memoryview | pb.GetResponse:
    """Deserializer for Get: a view of the payload for data-only messages, else a ``GetResponse``."""
    view = split_data(raw)
    return view if view is not None else pb.GetResponse.FromString(raw)
