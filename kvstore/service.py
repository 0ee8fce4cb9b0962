"""The KVStore gRPC service: request validation, streaming, limits and per-call metrics."""

from __future__ import annotations

import functools
import inspect
import logging
import time

import grpc

from kvrecall.kvstore import wire
from kvrecall.kvstore.keys import KeyValidationError, validate_key
from kvrecall.kvstore.limits import Limits, RequestError
from kvrecall.kvstore.metrics import Metrics
from kvrecall.kvstore.objects import StoredObject, crc32_of, expiry_from_ttl
from kvrecall.kvstore.store import TieredStore
from kvrecall.kvstore.v1 import kvstore_pb2 as pb

__all__ = ["SERVICE_NAME", "KVStoreService"]

SERVICE_NAME = "kvrecall.kvstore.v1.KVStore"
MIN_CHUNK_BYTES = 4096
log = logging.getLogger("kvrecall.kvstore.service")
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


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
                async for item in method(self, request, context):
                    yield item
            except RequestError as exc:
                code = exc.code.name
                await context.abort(exc.code, exc.message)
            except Exception as exc:
                code = self._unexpected(exc, context)
                raise
            except BaseException:  # cancelled by the client or by shutdown
                code = "CANCELLED"
                raise
            finally:
                self.metrics.observe(name, code, time.perf_counter() - start)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        start = time.perf_counter()
        code = "OK"
        try:
            self._check_ready()
            return await method(self, request, context)
        except RequestError as exc:
            code = exc.code.name
            await context.abort(exc.code, exc.message)
        except Exception as exc:
            code = self._unexpected(exc, context)
            raise
        except BaseException:  # cancelled by the client or by shutdown
            code = "CANCELLED"
            raise
        finally:
            self.metrics.observe(name, code, time.perf_counter() - start)

    return unary_wrapper


class _InflightBudget:
    """Bytes reserved by Puts being received; keeps receive buffers bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, n: int) -> None:
        if self.used + n > self.limit:
            raise RequestError(_EXHAUSTED, f"server is receiving {self.used} bytes of Puts already; a {n}-byte "
                                           f"Put would exceed the in-flight limit of {self.limit}; retry later")
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

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Put": grpc.stream_unary_rpc_method_handler(
                self.Put, request_deserializer=wire.parse_put_request,
                response_serializer=pb.PutResponse.SerializeToString),
            "Get": grpc.unary_stream_rpc_method_handler(
                self.Get, request_deserializer=pb.GetRequest.FromString, response_serializer=wire.passthrough),
            "Exists": grpc.unary_unary_rpc_method_handler(
                self.Exists, request_deserializer=pb.ExistsRequest.FromString,
                response_serializer=pb.ExistsResponse.SerializeToString),
            "Delete": grpc.unary_unary_rpc_method_handler(
                self.Delete, request_deserializer=pb.DeleteRequest.FromString,
                response_serializer=pb.DeleteResponse.SerializeToString),
            "Stats": grpc.unary_unary_rpc_method_handler(
                self.Stats, request_deserializer=pb.StatsRequest.FromString,
                response_serializer=pb.StatsResponse.SerializeToString),
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
    @_instrumented
    async def Put(self, request_iterator, context) -> pb.PutResponse:
        stream = request_iterator.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise RequestError(_INVALID, "empty Put stream: the first message must carry a header") from None
        if not isinstance(first, pb.PutRequest) or not first.HasField("header"):
            raise RequestError(_INVALID, "the first Put message must carry a header (key, total_bytes, crc32)")
        header = first.header
        key = self._key(header.key)
        total = header.total_bytes
        if total > self.limits.max_object_bytes:
            raise RequestError(_EXHAUSTED, f"object of {total} bytes exceeds the limit of "
                                           f"{self.limits.max_object_bytes} bytes")
        self._inflight.reserve(total)
        try:
            buffer = bytearray(total)
            view = memoryview(buffer)
            offset = 0
            crc = 0
            pending = [first.data] if first.data else []
            while True:
                for chunk in pending:
                    n = len(chunk)
                    if offset + n > total:
                        raise RequestError(_INVALID, f"Put sent more than the declared total_bytes={total}")
                    view[offset : offset + n] = chunk
                    crc = crc32_of(chunk, crc)
                    offset += n
                try:
                    msg = await stream.__anext__()
                except StopAsyncIteration:
                    break
                if isinstance(msg, memoryview):
                    pending = [msg]
                elif msg.HasField("header"):
                    raise RequestError(_INVALID, "only the first Put message may carry a header")
                else:
                    pending = [msg.data]
            if offset != total:
                raise RequestError(_INVALID, f"Put sent {offset} bytes but declared total_bytes={total}")
            if crc != header.crc32:
                raise RequestError(_INVALID, f"checksum mismatch: received data has crc32 {crc:#010x}, "
                                             f"header says {header.crc32:#010x}")
            obj = StoredObject(buffer, crc, expiry_from_ttl(header.ttl_seconds))
            tiers = await self.store.put(key, obj)
        finally:
            self._inflight.release(total)
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
            )
            for t in s.tiers()
        ]
        return pb.StatsResponse(tiers=tiers, misses=s.misses, bytes_in=s.bytes_in, bytes_out=s.bytes_out,
                                corrupt_objects=s.corrupt)
