"""Pieces shared by the sync and asyncio clients: errors, options, message building, response assembly."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from kvrecall.kvstore import wire
from kvrecall.kvstore.auth import channel_credentials
from kvrecall.kvstore.keys import DEFAULT_MAX_KEY_BYTES, KeyValidationError, validate_key
from kvrecall.kvstore.limits import MESSAGE_OVERHEAD_BYTES
from kvrecall.kvstore.crc import crc32_combine, crc32_of
from kvrecall.kvstore.v1 import kvstore_pb2 as pb

__all__ = ["KVStoreError", "ChecksumError", "ExistsResult", "LookupResult", "ClientOptions", "METHOD_PREFIX",
           "lookup_request"]

METHOD_PREFIX = "/kvrecall.kvstore.v1.KVStore/"


class KVStoreError(Exception):
    """A kvstore call failed; ``code`` is the gRPC status code (None for client-side failures)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError, method: str) -> KVStoreError:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "UNKNOWN"
        return cls(f"kvstore {method} failed: {name}: {details}", code)


class ChecksumError(KVStoreError):
    """The bytes received do not match the size or CRC-32 announced by the server."""


@dataclass(frozen=True)
class ExistsResult:
    """Answer of Exists: per-key presence and size, and the number of leading present keys."""

    present: list[bool]
    sizes: list[int]
    prefix_length: int


@dataclass(frozen=True)
class LookupResult:
    """Answer of Lookup: the prefix-chain keys of every full chunk and how many leading ones are stored.

    Attributes
    ----------
    keys : list of bytes
        One 32-byte key per full chunk, in order (as :func:`~kvrecall.kvstore.keys.chunk_keys` gives).
    sizes : list of int
        Stored object size per key, 0 where absent.
    cached_chunks : int
        Number of leading keys that are stored.
    cached_tokens : int
        ``cached_chunks * chunk_tokens``.
    """

    keys: list[bytes]
    sizes: list[int]
    cached_chunks: int
    cached_tokens: int


def lookup_request(token_ids, model_id: str, profile_id: str, chunk_tokens: int, parent: bytes) -> pb.LookupRequest:
    """A LookupRequest, with the arguments checked the way the server checks them."""
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    if not model_id or not profile_id:
        raise ValueError("model_id and profile_id must be non-empty")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    model = model_id.decode() if isinstance(model_id, bytes) else model_id
    profile = profile_id.decode() if isinstance(profile_id, bytes) else profile_id
    return pb.LookupRequest(model_id=model, profile_id=profile, chunk_tokens=chunk_tokens,
                            token_ids=list(token_ids), parent=bytes(parent))


@dataclass
class ClientOptions:
    """Connection and call settings shared by :class:`KVStoreClient` and :class:`AsyncKVStoreClient`.

    Attributes
    ----------
    token : str, optional
        Bearer token sent as ``authorization: Bearer <token>`` on every call.
    tls : bool
        Use TLS; ``ca`` verifies the server (system roots if None), ``cert``/``key`` for client certificates.
    timeout_s : float
        Deadline of each call attempt.
    retries : int
        Extra attempts after UNAVAILABLE (server starting, restarting, unreachable), with exponential
        back-off starting at ``backoff_s`` (jittered, capped at 2 s).
    chunk_bytes : int
        Data chunk size for Put and the chunk size asked of Get.
    max_message_bytes : int
        gRPC message limit; must cover ``chunk_bytes`` plus framing (set automatically when left at 0).
    max_object_bytes : int
        Largest object the client accepts from a server (guards allocations).
    verify : bool
        Check size and CRC-32 of every object received (end-to-end check).
    """

    token: str | None = None
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout_s: float = 30.0
    retries: int = 4
    backoff_s: float = 0.05
    chunk_bytes: int = 1 << 20
    max_message_bytes: int = 0
    max_object_bytes: int = 4 << 30
    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES
    verify: bool = True
    max_parallel: int = 8

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1 or self.chunk_bytes > (1 << 30):
            raise ValueError(f"chunk_bytes must be in [1, 2**30], got {self.chunk_bytes}")
        if self.max_message_bytes == 0:
            self.max_message_bytes = max(4 << 20, self.chunk_bytes + MESSAGE_OVERHEAD_BYTES)
        if self.max_message_bytes < self.chunk_bytes + MESSAGE_OVERHEAD_BYTES:
            raise ValueError("max_message_bytes must exceed chunk_bytes by the framing overhead")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or self.max_parallel < 1:
            raise ValueError("timeout_s must be > 0, retries and backoff_s >= 0, max_parallel >= 1")

    def channel_args(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return channel_credentials(self.ca, self.cert, self.key)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def backoff(self, attempt: int) -> float:
        return min(self.backoff_s * (2**attempt), 2.0) * (0.5 + random.random())

    def check_key(self, key: object) -> bytes:
        try:
            return validate_key(key, self.max_key_bytes)
        except KeyValidationError as exc:
            raise KVStoreError(f"invalid key: {exc}", grpc.StatusCode.INVALID_ARGUMENT) from None


def as_bytes_view(data: object) -> memoryview:
    """A flat byte view of bytes-like ``data`` (bytes, bytearray, memoryview, contiguous numpy array)."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("data must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def put_messages(key: bytes, view: memoryview, crc: int | None, ttl_s: int, chunk_bytes: int):
    """Serialized Put stream: header, then data chunks (each a single copy of its slice)."""
    if crc is None:
        crc = crc32_of(view)
    header = pb.ObjectHeader(key=key, total_bytes=len(view), crc32=crc, ttl_seconds=ttl_s)
    yield pb.PutRequest(header=header).SerializeToString()
    for start in range(0, len(view), chunk_bytes):
        yield wire.encode_data(view[start : start + chunk_bytes])


def check_ttl(ttl_s: float | None) -> int:
    if ttl_s is None:
        return 0
    if ttl_s <= 0 or ttl_s >= 2**32:
        raise ValueError(f"ttl_s must be positive seconds below 2**32, got {ttl_s}")
    return max(1, int(round(ttl_s)))


class DataChunk(NamedTuple):
    """A received data chunk and its own CRC-32 (computed on gRPC's receiving thread)."""

    view: memoryview
    crc: int


def get_deserializer(verify: bool):
    """Response deserializer for Get: with ``verify``, data chunks arrive as :class:`DataChunk`.

    The sync gRPC client deserializes on its channel thread, so the per-chunk CRC overlaps with the consuming
    thread copying the previous chunk; :class:`Assembler` chains the chunk CRCs with :func:`crc32_combine`.
    """
    if not verify:
        return wire.parse_get_response

    def parse(raw: bytes):
        view = wire.split_data(raw)
        if view is None:
            return pb.GetResponse.FromString(raw)
        return DataChunk(view, crc32_of(view))

    return parse


class SizeChanged(Exception):
    """The object's size differs from the slot reserved for it (overwritten between Exists and Get)."""


class Assembler:
    """Reassembles a Get stream into a buffer (preallocated slot, or a new bytearray) and verifies it.

    Each data chunk is copied once, into its place in the buffer. With ``options.verify`` the running CRC-32 is
    chained from the chunks' own CRCs (:class:`DataChunk`) or computed here for chunks that arrive without one.
    """

    def __init__(self, key: bytes, options: ClientOptions, out: memoryview | None = None) -> None:
        self.key = key
        self.options = options
        self.out = out
        self.buffer: bytearray | None = None
        self.view: memoryview | None = None
        self.total = -1
        self.expected_crc = 0
        self.crc = 0
        self.chunk_len = 0
        self.offset = 0
        self.tier = ""

    def feed(self, msg: DataChunk | memoryview | pb.GetResponse) -> None:
        """Take the next message of the stream (header first)."""
        if self.view is None:
            self._header(msg)
            return
        chunk_crc = None
        if isinstance(msg, DataChunk):
            chunk, chunk_crc = msg
        elif isinstance(msg, memoryview):
            chunk = msg
        else:
            if msg.HasField("header"):
                raise ChecksumError("kvstore Get: server sent a second header")
            chunk = msg.data
        n = len(chunk)
        end = self.offset + n
        if end > self.total:
            raise ChecksumError(f"kvstore Get: server sent more than the announced {self.total} bytes")
        self.view[self.offset : end] = chunk
        if self.options.verify:
            if chunk_crc is None:
                self.crc = crc32_of(chunk, self.crc)
            elif self.offset == 0:
                self.crc = chunk_crc
                self.chunk_len = n
            elif n == self.chunk_len:  # the server's regular chunk size: one cached operator
                self.crc = crc32_combine(self.crc, chunk_crc, n)
            else:  # a tail or irregular chunk: checksum it here rather than build an operator for its length
                self.crc = crc32_of(chunk, self.crc)
        self.offset = end

    def _header(self, msg: DataChunk | memoryview | pb.GetResponse) -> None:
        if not isinstance(msg, pb.GetResponse) or not msg.HasField("header"):
            raise ChecksumError("kvstore Get: the first response carries no header")
        total = msg.header.total_bytes
        if total > self.options.max_object_bytes:
            raise KVStoreError(f"kvstore Get: object of {total} bytes exceeds the client's max_object_bytes "
                               f"{self.options.max_object_bytes}", grpc.StatusCode.RESOURCE_EXHAUSTED)
        if self.out is not None:
            if len(self.out) != total:
                raise SizeChanged(total)
            self.view = self.out
        else:
            self.buffer = bytearray(total)
            self.view = memoryview(self.buffer)
        self.total = total
        self.expected_crc = msg.header.crc32
        self.tier = msg.tier
        if msg.data:
            self.feed(memoryview(msg.data))

    def finish(self) -> None:
        """Check that the whole object arrived intact (raises :class:`ChecksumError`)."""
        if self.view is None:
            raise ChecksumError("kvstore Get: empty response stream")
        if self.offset != self.total:
            raise ChecksumError(f"kvstore Get: received {self.offset} of {self.total} bytes")
        if self.options.verify and self.crc != self.expected_crc:
            raise ChecksumError(f"kvstore Get: crc32 {self.crc:#010x} of received bytes does not match "
                                f"{self.expected_crc:#010x} announced by the server")
