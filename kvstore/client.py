"""Synchronous kvstore client: deadlines, retries on UNAVAILABLE, end-to-end CRC checks, parallel multi-get."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from kvrecall.kvstore.client_common import (
    METHOD_PREFIX,
    Assembler,
    ChecksumError,
    ClientOptions,
    ExistsResult,
    KVStoreError,
    LookupResult,
    SizeChanged,
    as_bytes_view,
    check_ttl,
    get_deserializer,
    lookup_request,
    put_messages,
)
from kvrecall.kvstore.crc import crc32_of
from kvrecall.kvstore.v1 import kvstore_pb2 as pb

__all__ = ["KVStoreClient", "KVStoreError", "ChecksumError", "ExistsResult", "ClientOptions"]

T = TypeVar("T")


class KVStoreClient:
    """Blocking client of a kvstore server; thread-safe (one channel, any number of threads).

    Parameters
    ----------
    target : str
        ``host:port`` of the server.
    options : ClientOptions, optional
        Token, TLS, deadlines, retries, chunk size; keyword arguments override its fields
        (e.g. ``KVStoreClient("127.0.0.1:50051", token="...", timeout_s=5)``).

    Examples
    --------
    >>> with KVStoreClient("127.0.0.1:50051") as kv:               # doctest: +SKIP
    ...     kv.put(b"key", payload)
    ...     data = kv.get(b"key")                                  # bytearray, or None if absent
    """

    def __init__(self, target: str, options: ClientOptions | None = None, **overrides) -> None:
        if options is None:
            options = ClientOptions(**overrides)
        elif overrides:
            options = ClientOptions(**{**options.__dict__, **overrides})
        self.options = options
        self.target = target
        creds = options.credentials()
        args = options.channel_args()
        self._channel = (grpc.secure_channel(target, creds, options=args) if creds is not None
                         else grpc.insecure_channel(target, options=args))
        ch = self._channel
        self._put = ch.stream_unary(METHOD_PREFIX + "Put", request_serializer=None,
                                    response_deserializer=pb.PutResponse.FromString)
        self._get = ch.unary_stream(METHOD_PREFIX + "Get", request_serializer=pb.GetRequest.SerializeToString,
                                    response_deserializer=get_deserializer(options.verify))
        self._exists = ch.unary_unary(METHOD_PREFIX + "Exists", request_serializer=pb.ExistsRequest.SerializeToString,
                                      response_deserializer=pb.ExistsResponse.FromString)
        self._delete = ch.unary_unary(METHOD_PREFIX + "Delete", request_serializer=pb.DeleteRequest.SerializeToString,
                                      response_deserializer=pb.DeleteResponse.FromString)
        self._stats = ch.unary_unary(METHOD_PREFIX + "Stats", request_serializer=pb.StatsRequest.SerializeToString,
                                     response_deserializer=pb.StatsResponse.FromString)
        self._lookup = ch.unary_unary(METHOD_PREFIX + "Lookup", request_serializer=pb.LookupRequest.SerializeToString,
                                      response_deserializer=pb.LookupResponse.FromString)
        self._pool: ThreadPoolExecutor | None = None

    # ----------------------------------------------------------------------------------------------- plumbing
    def _call(self, method: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.options.retries:
                    raise KVStoreError.from_rpc(exc, method) from None
            time.sleep(self.options.backoff(attempt))
            attempt += 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- calls
    def put(self, key: bytes, data, *, ttl_s: float | None = None, crc32: int | None = None) -> list[str]:
        """Store ``data`` (bytes-like, shape ``[size]``) under ``key``; return the tiers that hold it.

        Raises :class:`KVStoreError` (``code`` RESOURCE_EXHAUSTED when over a server limit).
        """
        key = self.options.check_key(key)
        view = as_bytes_view(data)
        ttl = check_ttl(ttl_s)
        if crc32 is None:
            crc32 = crc32_of(view)
        opts = self.options

        def once() -> list[str]:
            msgs = put_messages(key, view, crc32, ttl, opts.chunk_bytes)
            return list(self._put(msgs, timeout=opts.timeout_s, metadata=opts.metadata()).tiers)

        return self._call("Put", once)

    def _get_once(self, key: bytes, out: memoryview | None) -> Assembler | None:
        opts = self.options
        request = pb.GetRequest(key=key, chunk_bytes=opts.chunk_bytes)
        asm = Assembler(key, opts, out)
        try:
            for msg in self._get(request, timeout=opts.timeout_s, metadata=opts.metadata()):
                asm.feed(msg)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        asm.finish()
        return asm

    def get(self, key: bytes) -> bytearray | None:
        """The object under ``key`` as a new bytearray (size and CRC-32 verified), or None if absent."""
        key = self.options.check_key(key)
        asm = self._call("Get", lambda: self._get_once(key, None))
        return None if asm is None else asm.buffer

    def get_into(self, key: bytes, out: memoryview) -> bool:
        """Stream the object straight into ``out`` (its exact size); False if absent.

        Raises :class:`ChecksumError` if the stored object's size differs from ``len(out)``.
        """
        key = self.options.check_key(key)
        try:
            asm = self._call("Get", lambda: self._get_once(key, out))
        except SizeChanged as exc:
            raise ChecksumError(f"object is {exc.args[0]} bytes, the buffer {len(out)}") from None
        return asm is not None

    def get_many(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        """Fetch many objects in parallel into one preallocated buffer.

        One Exists call gives the sizes; a buffer of their sum is allocated once and up to
        ``options.max_parallel`` Get streams write their chunks straight into their slices. Returns one
        read-only-by-convention view per key (None where absent). An object overwritten with another size
        in between is fetched on its own.
        """
        keys = [self.options.check_key(k) for k in keys]
        if not keys:
            return []
        info = self.exists(keys)
        offsets, total = [], 0
        for size in info.sizes:
            offsets.append(total)
            total += size
        buffer = memoryview(bytearray(total))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.options.max_parallel, thread_name_prefix="kvstore-get")

        def fetch(i: int) -> memoryview | None:
            if not info.present[i]:
                return None
            slot = buffer[offsets[i] : offsets[i] + info.sizes[i]]
            try:
                asm = self._call("Get", lambda: self._get_once(keys[i], slot))
            except SizeChanged:
                data = self.get(keys[i])
                return None if data is None else memoryview(data)
            return None if asm is None else slot

        return list(self._pool.map(fetch, range(len(keys))))

    def exists(self, keys: Sequence[bytes]) -> ExistsResult:
        """Presence and size of many keys with one call, and the length of the present prefix."""
        keys = [self.options.check_key(k) for k in keys]
        opts = self.options
        resp = self._call("Exists", lambda: self._exists(pb.ExistsRequest(keys=keys), timeout=opts.timeout_s,
                                                          metadata=opts.metadata()))
        return ExistsResult(list(resp.present), list(resp.sizes), resp.prefix_length)

    def cached_prefix_length(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys (e.g. from :func:`chunk_keys`) the store holds."""
        return self.exists(keys).prefix_length if keys else 0

    def delete(self, keys: Sequence[bytes]) -> int:
        """Delete keys from every tier; return how many were present."""
        keys = [self.options.check_key(k) for k in keys]
        opts = self.options
        resp = self._call("Delete", lambda: self._delete(pb.DeleteRequest(keys=keys), timeout=opts.timeout_s,
                                                          metadata=opts.metadata()))
        return resp.deleted

    def stats(self) -> pb.StatsResponse:
        """Per-tier objects, bytes, budgets, hits, evictions and availability, plus global counters."""
        opts = self.options
        return self._call("Stats", lambda: self._stats(pb.StatsRequest(), timeout=opts.timeout_s,
                                                        metadata=opts.metadata()))

    def lookup(self, token_ids, model_id: str, profile_id: str, chunk_tokens: int = 256,
               parent: bytes = b"") -> LookupResult:
        """Keys of the full chunks of ``token_ids`` (derived by the server, docs/keys.md) and the cached prefix.

        Same keys as ``chunk_keys(token_ids, model_id, profile_id, chunk_tokens, parent)``, with one call.
        """
        request = lookup_request(token_ids, model_id, profile_id, chunk_tokens, parent)
        opts = self.options
        resp = self._call("Lookup", lambda: self._lookup(request, timeout=opts.timeout_s,
                                                              metadata=opts.metadata()))
        return LookupResult(list(resp.keys), list(resp.sizes), resp.cached_chunks, resp.cached_tokens)
