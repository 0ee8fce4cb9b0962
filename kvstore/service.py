"""The KVStore gRPC service: request validation, streaming, limits and per-call metrics."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time

import grpc

from kvrecall.kvstore import wire
from kvrecall.kvstore.keys import KeyValidationError, chunk_keys, validate_key
from kvrecall.kvstore.limits import Limits, RequestError
from kvrecall.kvstore.metrics import Metrics
from kvrecall.kvstore.objects import StoredObject, crc32_of, expiry_from_ttl
from kvrecall.kvstore.store import DiskRequiredError, TieredStore
from kvrecall.kvstore.v1 import kvstore_pb2 as pb

__all__ = ["SERVICE_NAME", "KVStoreService", "Malformed", "DEFAULT_LOOKUP_CHUNK_TOKENS"]

SERVICE_NAME = "kvrecall.kvstore.v1.KVStore"
MIN_CHUNK_BYTES = 4096
DEFAULT_LOOKUP_CHUNK_TOKENS = 256
MAX_LOOKUP_CHUNK_TOKENS = 1 << 20
# At shutdown a Put stream that sends nothing for this long is ended (UNAVAILABLE); active ones get the grace.
SHUTDOWN_IDLE_S = 0.5
log = logging.getLogger("kvrecall.kvstore.service")
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
_END = object()


class Malformed:
    """What a request deserializer returns for bytes that are not a valid message (answered INVALID_ARGUMENT)."""

    __slots__ = ("what", "error")

    def __init__(self, what: str, error: Exception) -> None:
        self.what = what
        self.error = error

    def raise_error(self):
        raise RequestError(_INVALID, f"malformed {self.what} message: {self.error}")


def _lenient(parse, what: str):
    """A deserializer that returns :class:`Malformed` instead of raising (gRPC would answer UNKNOWN/INTERNAL)."""

    def deserialize(raw: bytes):
        try:
            return parse(raw)
        except Exception as exc:  # DecodeError, or anything else a hostile message provokes
            return Malformed(what, exc)

    return deserialize


def _instrumented(method):
    """Time the call, record its status code, and turn :class:`RequestError` into a gRPC status."""
    name = method.__name__

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            start = time.perf_counter()
            code = "OK"
            try:
                self._check_ready()
                if isinstance(request, Malformed):
                    request.raise_error()
                async for item in method(self, request, context):
                    yield item
            except RequestError as exc:
                code = None  # counted before the status goes out, so a client never sees it uncounted
                self.metrics.observe(name, exc.code.name, time.perf_counter() - start)
                await context.abort(exc.code, exc.message)
            except Exception as exc:
                code = self._unexpected(exc, context)
                raise
            except BaseException:  # cancelled by the client or by shutdown
                code = "CANCELLED"
                raise
            finally:
                if code is not None:
                    self.metrics.observe(name, code, time.perf_counter() - start)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        start = time.perf_counter()
        code = "OK"
        try:
            self._check_ready()
            if isinstance(request, Malformed):
                request.raise_error()
            return await method(self, request, context)
        except RequestError as exc:
            code = None  # counted before the status goes out, so a client never sees it uncounted
            self.metrics.observe(name, "CANCELLED" if context.cancelled() else exc.code.name,
                                 time.perf_counter() - start)
            await context.abort(exc.code, exc.message)
        except Exception as exc:
            code = self._unexpected(exc, context)
            raise
        except BaseException:  # cancelled by the client or by shutdown
            code = "CANCELLED"
            raise
        finally:
            if code is not None:
                self.metrics.observe(name, code, time.perf_counter() - start)

    return unary_wrapper


class _InflightBudget:
    """Bytes of Puts received and not yet stored, over all streams; keeps receive buffers bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, n: int) -> None:
        if self.used + n > self.limit:
            raise RequestError(_EXHAUSTED, f"server holds {self.used} bytes of Puts being received; {n} more "
                                           f"would exceed the in-flight limit of {self.limit}; retry later")
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n


class KVStoreService:
    """Handlers of ``kvrecall.kvstore.v1.KVStore`` over a :class:`TieredStore`.

    Use :meth:`generic_handler` to register it; data messages bypass protobuf (see :mod:`kvrecall.kvstore.wire`).
    Calls before :attr:`ready` is set get UNAVAILABLE (clients retry).
    """

    def __init__(self, store: TieredStore, limits: Limits, metrics: Metrics) -> None:
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.ready = False
        self._inflight = _InflightBudget(limits.max_inflight_put_bytes)
        self._stopping: asyncio.Future | None = None

    def begin_shutdown(self) -> None:
        """From now on, Put streams idle for :data:`SHUTDOWN_IDLE_S` are ended (UNAVAILABLE)."""
        stopping = self._stop_future()
        if not stopping.done():
            stopping.set_result(None)

    def _stop_future(self) -> asyncio.Future:
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_future()
        return self._stopping

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Put": grpc.stream_unary_rpc_method_handler(
                self.Put, request_deserializer=_lenient(wire.parse_put_request, "PutRequest"),
                response_serializer=pb.PutResponse.SerializeToString),
            "Get": grpc.unary_stream_rpc_method_handler(
                self.Get, request_deserializer=_lenient(pb.GetRequest.FromString, "GetRequest"),
                response_serializer=wire.passthrough),
            "Exists": grpc.unary_unary_rpc_method_handler(
                self.Exists, request_deserializer=_lenient(pb.ExistsRequest.FromString, "ExistsRequest"),
                response_serializer=pb.ExistsResponse.SerializeToString),
            "Delete": grpc.unary_unary_rpc_method_handler(
                self.Delete, request_deserializer=_lenient(pb.DeleteRequest.FromString, "DeleteRequest"),
                response_serializer=pb.DeleteResponse.SerializeToString),
            "Stats": grpc.unary_unary_rpc_method_handler(
                self.Stats, request_deserializer=_lenient(pb.StatsRequest.FromString, "StatsRequest"),
                response_serializer=pb.StatsResponse.SerializeToString),
            "Lookup": grpc.unary_unary_rpc_method_handler(
                self.Lookup, request_deserializer=_lenient(pb.LookupRequest.FromString, "LookupRequest"),
                response_serializer=pb.LookupResponse.SerializeToString),
        })

    # ----------------------------------------------------------------------------------------------- helpers
    def _check_ready(self) -> None:
        if not self.ready:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "kvstore is not serving (starting up or shutting down)")

    @staticmethod
    def _unexpected(exc: BaseException, context) -> str:
        if isinstance(exc, grpc.aio.AbortError):
            return (context.code() or grpc.StatusCode.UNKNOWN).name
        log.exception("unexpected error in a kvstore handler")
        return grpc.StatusCode.INTERNAL.name

    def _key(self, key: bytes) -> bytes:
        try:
            return validate_key(key, self.limits.max_key_bytes)
        except KeyValidationError as exc:
            raise RequestError(_INVALID, str(exc)) from None

    def _keys(self, keys) -> list[bytes]:
        if len(keys) > self.limits.max_keys_per_call:
            raise RequestError(_INVALID, f"{len(keys)} keys in one call; the limit is {self.limits.max_keys_per_call}")
        return [self._key(k) for k in keys]

    # ----------------------------------------------------------------------------------------------- handlers
    async def _next_message(self, stream, context):
        """The next Put message, or ``_END``; ends idle streams (DEADLINE_EXCEEDED; UNAVAILABLE at shutdown)."""

        async def receive():
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return _END

        task = asyncio.ensure_future(receive())
        stopping = self._stop_future()
        try:
            idle = self.limits.put_idle_timeout_s
            if not stopping.done():
                await asyncio.wait((task, stopping), timeout=idle, return_when=asyncio.FIRST_COMPLETED)
                if not task.done() and not stopping.done():
                    raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"Put stream sent nothing for {idle:g} s; closed (put_idle_timeout_s)")
            if not task.done():  # shutting down: an idle stream does not hold the server up
                await asyncio.wait((task,), timeout=min(idle, SHUTDOWN_IDLE_S))
                if not task.done():
                    raise RequestError(grpc.StatusCode.UNAVAILABLE,
                                       "server is shutting down and this Put stream is idle; retry elsewhere")
            return task.result()
        finally:
            if not task.done():
                task.cancel()

    @_instrumented
    async def Put(self, request_iterator, context) -> pb.PutResponse:
        stream = request_iterator.__aiter__()
        first = await self._next_message(stream, context)
        if first is _END:
            raise RequestError(_INVALID, "empty Put stream: the first message must carry a header")
        if isinstance(first, Malformed):
            first.raise_error()
        if not isinstance(first, pb.PutRequest) or not first.HasField("header"):
            raise RequestError(_INVALID, "the first Put message must carry a header (key, total_bytes, crc32)")
        header = first.header
        key = self._key(header.key)
        total = header.total_bytes
        if total > self.limits.max_object_bytes:
            raise RequestError(_EXHAUSTED, f"object of {total} bytes exceeds the limit of "
                                           f"{self.limits.max_object_bytes} bytes")
        # Memory follows the bytes that arrive: nothing is allocated or reserved for the declared size. The
        # received chunks are kept as views into gRPC's message buffers and joined once at the end (one copy;
        # growing a buffer instead re-copied it on realloc, which profiling showed as ~1/3 of the server's time).
        pieces: list = []
        received = 0
        reserved = 0
        crc = 0
        try:
            msg = first
            while True:
                if isinstance(msg, memoryview):
                    chunk = msg
                elif isinstance(msg, Malformed):
                    msg.raise_error()
                elif msg is not first and msg.HasField("header"):
                    raise RequestError(_INVALID, "only the first Put message may carry a header")
                else:
                    chunk = msg.data
                n = len(chunk)
                if n:
                    if received + n > total:
                        raise RequestError(_INVALID, f"Put sent more than the declared total_bytes={total}")
                    self._inflight.reserve(n)
                    reserved += n
                    received += n
                    pieces.append(chunk)
                    crc = crc32_of(chunk, crc)
                msg = await self._next_message(stream, context)
                if msg is _END:
                    break
            if context.cancelled():
                raise asyncio.CancelledError()
            if received != total:
                raise RequestError(_INVALID, f"Put sent {received} bytes but declared total_bytes={total}")
            if crc != header.crc32:
                raise RequestError(_INVALID, f"checksum mismatch: received data has crc32 {crc:#010x}, "
                                             f"header says {header.crc32:#010x}")
            data = bytearray().join(pieces)
            pieces.clear()
            obj = StoredObject(data, crc, expiry_from_ttl(header.ttl_seconds))
            try:
                tiers = await self.store.put(key, obj)
            except DiskRequiredError as exc:
                raise RequestError(_EXHAUSTED, str(exc)) from None
        finally:
            self._inflight.release(reserved)
        if not tiers:
            raise RequestError(_EXHAUSTED, f"no tier could hold an object of {total} bytes "
                                           "(larger than every budget, or the tiers failed)")
        return pb.PutResponse(stored_bytes=total, tiers=tiers)

    @_instrumented
    async def Get(self, request: pb.GetRequest, context):
        key = self._key(request.key)
        chunk = request.chunk_bytes or self.limits.chunk_bytes
        chunk = max(MIN_CHUNK_BYTES, min(chunk, self.limits.max_chunk_bytes))  # tiny chunks would flood the stream
        obj = await self.store.get(key)
        if obj is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, "no object under this key")
        yield pb.GetResponse(header=pb.ObjectHeader(key=key, total_bytes=obj.size, crc32=obj.crc32), tier=obj.tier)
        view = memoryview(obj.data)
        for start in range(0, obj.size, chunk):
            yield wire.encode_data(view[start : start + chunk])
        self.store.bytes_out += obj.size

    @_instrumented
    async def Exists(self, request: pb.ExistsRequest, context) -> pb.ExistsResponse:
        keys = self._keys(request.keys)
        sizes = await self.store.sizes(keys)
        present = [s is not None for s in sizes]
        prefix = next((i for i, p in enumerate(present) if not p), len(present))
        return pb.ExistsResponse(present=present, sizes=[s or 0 for s in sizes], prefix_length=prefix)

    @_instrumented
    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        keys = self._keys(request.keys)
        deleted = 0
        for key in keys:
            deleted += await self.store.delete(key)
        return pb.DeleteResponse(deleted=deleted)

    @_instrumented
    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        s = self.store
        tiers = [
            pb.TierStats(
                name=t.name, objects=len(t) if hasattr(t, "used_bytes") else 0,
                bytes=getattr(t, "used_bytes", 0), budget_bytes=t.budget_bytes, hits=t.hits,
                evictions=t.evictions, available=getattr(t, "available", True),
                errors=getattr(t, "errors", 0), last_error=getattr(t, "last_error", ""),
            )
            for t in s.tiers()
        ]
        return pb.StatsResponse(tiers=tiers, misses=s.misses, bytes_in=s.bytes_in, bytes_out=s.bytes_out,
                                corrupt_objects=s.corrupt)

    @_instrumented
    async def Lookup(self, request: pb.LookupRequest, context) -> pb.LookupResponse:
        if not request.model_id or not request.profile_id:
            raise RequestError(_INVALID, "Lookup needs a non-empty model_id and profile_id")
        chunk = request.chunk_tokens or DEFAULT_LOOKUP_CHUNK_TOKENS
        if chunk > MAX_LOOKUP_CHUNK_TOKENS:
            raise RequestError(_INVALID, f"chunk_tokens {chunk} is above {MAX_LOOKUP_CHUNK_TOKENS}")
        n = len(request.token_ids)
        if n > self.limits.max_lookup_tokens:
            raise RequestError(_INVALID, f"{n} token ids in one Lookup; the limit is {self.limits.max_lookup_tokens}")
        if n // chunk > self.limits.max_keys_per_call:
            raise RequestError(_INVALID, f"{n // chunk} chunks in one Lookup; the limit is "
                                         f"{self.limits.max_keys_per_call}")
        parent = bytes(request.parent)
        if parent:
            self._key(parent)
        keys = await asyncio.to_thread(chunk_keys, request.token_ids, request.model_id, request.profile_id,
                                       chunk, parent)
        sizes = await self.store.sizes(keys)
        cached = next((i for i, size in enumerate(sizes) if size is None), len(sizes))
        return pb.LookupResponse(keys=keys, sizes=[size or 0 for size in sizes], cached_chunks=cached,
                                 cached_tokens=cached * chunk)
