"""Asyncio kvstore client with the same calls as :class:`~kvrecall.kvstore.client.KVStoreClient`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
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

__all__ = ["AsyncKVStoreClient"]

T = TypeVar("T")


class AsyncKVStoreClient:
    """Asyncio client of a kvstore server (grpc.aio channel); create and use it inside one event loop.

    Examples
    --------
    >>> async with AsyncKVStoreClient("127.0.0.1:50051") as kv:   # doctest: +SKIP
    ...     await kv.put(b"key", payload)
    ...     views = await kv.get_many(keys)
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
        self._channel = (grpc.aio.secure_channel(target, creds, options=args) if creds is not None
                         else grpc.aio.insecure_channel(target, options=args))
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

    async def _call(self, method: str, fn: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await fn()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.options.retries:
                    raise KVStoreError.from_rpc(exc, method) from None
            await asyncio.sleep(self.options.backoff(attempt))
            attempt += 1

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncKVStoreClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def put(self, key: bytes, data, *, ttl_s: float | None = None, crc32: int | None = None) -> list[str]:
        """Store ``data`` (bytes-like) under ``key``; return the tiers that hold it."""
        key = self.options.check_key(key)
        view = as_bytes_view(data)
        ttl = check_ttl(ttl_s)
        if crc32 is None:
            crc32 = crc32_of(view)
        opts = self.options

        async def once() -> list[str]:
            msgs = put_messages(key, view, crc32, ttl, opts.chunk_bytes)
            resp = await self._put(msgs, timeout=opts.timeout_s, metadata=opts.metadata())
            return list(resp.tiers)

        return await self._call("Put", once)

    async def _get_once(self, key: bytes, out: memoryview | None) -> Assembler | None:
        opts = self.options
        asm = Assembler(key, opts, out)
        call = self._get(pb.GetRequest(key=key, chunk_bytes=opts.chunk_bytes), timeout=opts.timeout_s,
                         metadata=opts.metadata())
        try:
            async for msg in call:
                asm.feed(msg)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        finally:
            call.cancel()  # no-op when finished; stops the stream if feeding failed
        asm.finish()
        return asm

    async def get(self, key: bytes) -> bytearray | None:
        """The object under ``key`` as a new bytearray (size and CRC-32 verified), or None if absent."""
        key = self.options.check_key(key)
        asm = await self._call("Get", lambda: self._get_once(key, None))
        return None if asm is None else asm.buffer

    async def get_into(self, key: bytes, out: memoryview) -> bool:
        """Stream the object straight into ``out`` (its exact size); False if absent."""
        key = self.options.check_key(key)
        try:
            asm = await self._call("Get", lambda: self._get_once(key, out))
        except SizeChanged as exc:
            raise ChecksumError(f"object is {exc.args[0]} bytes, the buffer {len(out)}") from None
        return asm is not None

    async def get_many(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        """Fetch many objects concurrently into one preallocated buffer (see ``KVStoreClient.get_many``)."""
        keys = [self.options.check_key(k) for k in keys]
        if not keys:
            return []
        info = await self.exists(keys)
        offsets, total = [], 0
        for size in info.sizes:
            offsets.append(total)
            total += size
        buffer = memoryview(bytearray(total))
        limit = asyncio.Semaphore(self.options.max_parallel)

        async def fetch(i: int) -> memoryview | None:
            if not info.present[i]:
                return None
            slot = buffer[offsets[i] : offsets[i] + info.sizes[i]]
            async with limit:
                try:
                    asm = await self._call("Get", lambda: self._get_once(keys[i], slot))
                except SizeChanged:
                    data = await self.get(keys[i])
                    return None if data is None else memoryview(data)
            return None if asm is None else slot

        return list(await asyncio.gather(*(fetch(i) for i in range(len(keys)))))

    async def exists(self, keys: Sequence[bytes]) -> ExistsResult:
        """Presence and size of many keys with one call, and the length of the present prefix."""
        keys = [self.options.check_key(k) for k in keys]
        opts = self.options
        resp = await self._call("Exists", lambda: self._exists(pb.ExistsRequest(keys=keys), timeout=opts.timeout_s,
                                                                metadata=opts.metadata()))
        return ExistsResult(list(resp.present), list(resp.sizes), resp.prefix_length)

    async def cached_prefix_length(self, keys: Sequence[bytes]) -> int:
        return (await self.exists(keys)).prefix_length if keys else 0

    async def delete(self, keys: Sequence[bytes]) -> int:
        keys = [self.options.check_key(k) for k in keys]
        opts = self.options
        resp = await self._call("Delete", lambda: self._delete(pb.DeleteRequest(keys=keys), timeout=opts.timeout_s,
                                                                metadata=opts.metadata()))
        return resp.deleted

    async def stats(self) -> pb.StatsResponse:
        opts = self.options
        return await self._call("Stats", lambda: self._stats(pb.StatsRequest(), timeout=opts.timeout_s,
                                                              metadata=opts.metadata()))

    async def lookup(self, token_ids, model_id: str, profile_id: str, chunk_tokens: int = 256,
               parent: bytes = b"") -> LookupResult:
        """Keys of the full chunks of ``token_ids`` (derived by the server, docs/keys.md) and the cached prefix.

        Same keys as ``chunk_keys(token_ids, model_id, profile_id, chunk_tokens, parent)``, with one call.
        """
        request = lookup_request(token_ids, model_id, profile_id, chunk_tokens, parent)
        opts = self.options
        resp = await self._call("Lookup", lambda: self._lookup(request, timeout=opts.timeout_s,
                                                              metadata=opts.metadata()))
        return LookupResult(list(resp.keys), list(resp.sizes), resp.cached_chunks, resp.cached_tokens)
