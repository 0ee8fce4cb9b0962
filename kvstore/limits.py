"""Request limits of a kvstore server and the typed error raised when a request breaks one."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from kvrecall.kvstore.keys import DEFAULT_MAX_KEY_BYTES

__all__ = ["Limits", "RequestError", "MESSAGE_OVERHEAD_BYTES", "MAX_KEY_BYTES_LIMIT"]

# Room for the protobuf framing and header fields on top of a data chunk.
MESSAGE_OVERHEAD_BYTES = 64 * 1024
# Longest key every tier can store and read back: the Redis meta record holds the key length in 16 bits
# (the disk header allows 65,536). A larger ``max_key_bytes`` is refused at startup.
MAX_KEY_BYTES_LIMIT = 65535


class RequestError(Exception):
    """A request the server refuses, with the gRPC status code to answer it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask of the server.

    Attributes
    ----------
    max_key_bytes : int
        Longest key (INVALID_ARGUMENT above it).
    max_object_bytes : int
        Largest object a Put may declare (RESOURCE_EXHAUSTED above it).
    max_message_bytes : int
        Largest gRPC message either way; the transport rejects bigger ones with RESOURCE_EXHAUSTED.
    chunk_bytes : int
        Default data chunk of Get responses (a GetRequest may ask for a smaller or larger one up to
        ``max_message_bytes - MESSAGE_OVERHEAD_BYTES``).
    max_keys_per_call : int
        Most keys in one Exists or Delete (INVALID_ARGUMENT above it).
    max_inflight_put_bytes : int
        Bytes of Puts received and not yet stored, over all streams: memory follows the bytes that actually
        arrived (a header alone reserves nothing); a chunk that would exceed it fails its Put with
        RESOURCE_EXHAUSTED (the client retries later).
    put_idle_timeout_s : float
        A Put stream that sends nothing for this long is ended with DEADLINE_EXCEEDED.
    max_lookup_tokens : int
        Most token ids in one Lookup (INVALID_ARGUMENT above it).
    """

    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES
    max_object_bytes: int = 1 << 30
    max_message_bytes: int = 4 << 20
    chunk_bytes: int = 1 << 20
    max_keys_per_call: int = 65536
    max_inflight_put_bytes: int = 2 << 30
    put_idle_timeout_s: float = 30.0
    max_lookup_tokens: int = 1 << 22

    def __post_init__(self) -> None:
        for name in ("max_key_bytes", "max_object_bytes", "max_message_bytes", "chunk_bytes",
                     "max_keys_per_call", "max_inflight_put_bytes", "max_lookup_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_key_bytes > MAX_KEY_BYTES_LIMIT:
            raise ValueError(f"max_key_bytes {self.max_key_bytes} is above {MAX_KEY_BYTES_LIMIT}, the longest key "
                             "the disk and Redis tiers can store and read back")
        if isinstance(self.put_idle_timeout_s, bool) or not self.put_idle_timeout_s > 0:
            raise ValueError(f"put_idle_timeout_s must be positive seconds, got {self.put_idle_timeout_s!r}")
        if self.max_message_bytes < 2 * MESSAGE_OVERHEAD_BYTES:
            raise ValueError(f"max_message_bytes must be at least {2 * MESSAGE_OVERHEAD_BYTES}")
        if self.chunk_bytes > self.max_chunk_bytes:
            raise ValueError(
                f"chunk_bytes {self.chunk_bytes} does not fit in max_message_bytes {self.max_message_bytes} "
                f"(at most {self.max_chunk_bytes})"
            )

    @property
    def max_chunk_bytes(self) -> int:
        """Largest data chunk that fits in one message."""
        return self.max_message_bytes - MESSAGE_OVERHEAD_BYTES

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel/server options that raise gRPC's message limits to ``max_message_bytes``."""
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
