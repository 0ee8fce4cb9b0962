"""Redis tier: objects shared by several kvstore servers through one Redis, degrading cleanly when it is down.

Layout per object (``H`` = first 40 hex digits of SHA-256 of the key, in a ``{hash tag}`` so that all keys of
one object live in one Redis Cluster slot)::

    kvrecall:v1:{H}:meta         header: size, CRC-32, part count, part size, generation id, key
    kvrecall:v1:{H}:<gen>:<i>    part i of the object (objects larger than ``part_bytes`` are split)

A Put writes all parts under a fresh generation id, then the meta key, so a reader never mixes two versions;
parts of the replaced generation expire shortly after. A read checks the key and the CRC-32 of the
reassembled object, so a torn or stale read is reported as missing, never served.

When Redis does not answer (connection refused, timeout), the tier marks itself unavailable, logs once, counts
the error, and skips Redis for a back-off period (doubling up to ``max_backoff_s``) so requests are served from
the local tiers without waiting on timeouts; the first successful call afterwards logs the recovery. On a
Redis Cluster the back-off is per master: a dead master makes only the objects in its slots miss (after one
failed call, not one per object), objects on the surviving masters are still read, and Exists asks each master
for its own keys.

The URL may hold a password: everything logged shows it redacted (:func:`~kvrecall.kvstore.secrets.redact_url`).
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kvrecall.kvstore.keys import key_digest
from kvrecall.kvstore.objects import StoredObject, crc32_of
from kvrecall.kvstore.secrets import redact_text, redact_url

__all__ = ["RedisTier", "RedisUnavailable"]

log = logging.getLogger("kvrecall.kvstore.redis")

_META = struct.Struct("<QIIIQH")  # size, crc32, parts, part_bytes, expires_at_ms, key_len; then gen (16) + key
_GEN_BYTES = 16
_OLD_GENERATION_TTL_MS = 30_000
T = TypeVar("T")


class RedisUnavailable(RuntimeError):
    """Redis did not answer; the caller falls back to local tiers."""


class RedisTier:
    """Async Redis-backed tier. Create, then ``await close()`` when done.

    Parameters
    ----------
    url : str
        ``redis://host:port/db`` (or ``rediss://`` for TLS, ``unix://`` for a socket); with ``cluster``, the
        URL of any node of a Redis Cluster.
    part_bytes : int
        Largest Redis value; bigger objects are split into parts.
    timeout_s : float
        Socket connect and read timeout.
    cluster : bool
        Talk to a Redis Cluster (all keys of one object share a hash slot through the ``{H}`` tag).
    """

    name = "redis"

    def __init__(self, url: str, part_bytes: int = 8 << 20, timeout_s: float = 2.0,
                 min_backoff_s: float = 0.5, max_backoff_s: float = 10.0, prefix: str = "kvrecall:v1",
                 cluster: bool = False) -> None:
        import redis.asyncio as aioredis

        if part_bytes < 1:
            raise ValueError(f"part_bytes must be positive, got {part_bytes}")
        self._url = url
        self.url = redact_url(url)  # for messages: never the password
        self.part_bytes = part_bytes
        self.prefix = prefix.encode()
        self.budget_bytes = 0
        self.cluster = cluster
        if cluster:  # any node's URL; the client discovers the others and routes by hash slot
            # One attempt per call: a dead master is handled by the per-master back-off, not by retrying.
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            self._client = aioredis.RedisCluster.from_url(url, socket_timeout=timeout_s,
                                                          socket_connect_timeout=timeout_s,
                                                          retry=Retry(NoBackoff(), 1))
        else:
            self._client = aioredis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
            )
        self._min_backoff = min_backoff_s
        self._max_backoff = max_backoff_s
        self._backoff = min_backoff_s
        self._skip_until = 0.0
        self.available = True
        self.last_error = ""
        self._nodes: dict[str, tuple[float, float]] = {}  # cluster: master "host:port" -> (skip until, back-off)
        self.hits = 0
        self.errors = 0
        self.corrupt = 0
        self.evictions = 0

    async def close(self) -> None:
        await self._client.aclose()

    def _redact(self, exc: BaseException) -> str:
        return redact_text(str(exc) or type(exc).__name__, self._url)

    def _node(self, key: bytes) -> str | None:
        """On a cluster, the master that owns ``key``'s slot (from the client's slot map), else None."""
        if not self.cluster:
            return None
        try:
            node = self._client.get_node_from_key(self._meta_key(key))
        except Exception:  # slot map not loaded yet (first call) or being rebuilt
            return None
        return None if node is None else node.name

    # ----------------------------------------------------------------------------------------------- health
    async def _call(self, fn: Callable[[], Awaitable[T]], key: bytes | None = None, node: str | None = None) -> T:
        """Run one Redis operation with the availability bookkeeping (per master of ``key`` on a cluster)."""
        import redis.exceptions as rex

        if node is None and key is not None:
            node = self._node(key)
        now = time.monotonic()
        if node is not None:
            state = self._nodes.get(node)
            if state is not None and now < state[0]:
                raise RedisUnavailable(f"redis cluster master {node} is down (skipping until it answers)")
        elif not self.available and now < self._skip_until:
            raise RedisUnavailable(f"redis at {self.url} is down (skipping until it answers again)")
        try:
            result = await fn()
        except rex.ResponseError as exc:  # Redis answered but refused (e.g. out of memory): skip it this time
            self.errors += 1
            log.warning("redis tier %s refused a call: %s", self.url, self._redact(exc))
            raise RedisUnavailable(self._redact(exc)) from None
        except (rex.RedisError, rex.RedisClusterException, OSError, TimeoutError) as exc:
            self.errors += 1
            message = self._redact(exc)
            if self.available:
                log.warning("redis tier %s unavailable (%s); serving from local tiers", self.url, message)
            self.last_error = message
            if node is not None:
                state = self._nodes.get(node)
                backoff = self._min_backoff if state is None else min(state[1] * 2, self._max_backoff)
                self._nodes[node] = (time.monotonic() + backoff, backoff)
            else:
                self._backoff = self._min_backoff if self.available else min(self._backoff * 2, self._max_backoff)
                self._skip_until = time.monotonic() + self._backoff
            self.available = False
            raise RedisUnavailable(message) from None
        if node is not None:
            self._nodes.pop(node, None)
        if not self.available and (node is None or not self._nodes):
            self._nodes.clear()
            log.warning("redis tier %s is back", self.url)
            self.available = True
            self.last_error = ""
        return result

    async def ping(self) -> bool:
        """True if Redis answers (updates :attr:`available`)."""
        try:
            return bool(await self._call(self._client.ping))
        except RedisUnavailable:
            return False

    # ----------------------------------------------------------------------------------------------- keys
    def _base(self, key: bytes) -> bytes:
        return self.prefix + b":{" + key_digest(key)[:40].encode() + b"}"

    def _meta_key(self, key: bytes) -> bytes:
        return self._base(key) + b":meta"

    def _part_key(self, key: bytes, gen: bytes, index: int) -> bytes:
        return b"%s:%s:%d" % (self._base(key), gen.hex().encode(), index)

    def _parse_meta(self, raw: bytes | None, key: bytes) -> tuple[int, int, int, int, float, bytes] | None:
        if raw is None or len(raw) < _META.size + _GEN_BYTES:
            return None
        size, crc, parts, part_bytes, expires_ms, key_len = _META.unpack_from(raw)
        gen = raw[_META.size : _META.size + _GEN_BYTES]
        if raw[_META.size + _GEN_BYTES :] != key or key_len != len(key):
            return None  # digest collision on the 40-digit prefix, or garbage
        return size, crc, parts, part_bytes, expires_ms / 1000.0, gen

    # ----------------------------------------------------------------------------------------------- operations
    async def put(self, key: bytes, obj: StoredObject) -> bool:
        """Write ``obj`` (parts, then meta); raises :class:`RedisUnavailable` if Redis is down."""
        gen = os.urandom(_GEN_BYTES)
        view = memoryview(obj.data)
        n_parts = max(1, -(-obj.size // self.part_bytes))
        ttl_ms = max(1, int((obj.expires_at - time.time()) * 1000)) if obj.expires_at else None
        meta = _META.pack(obj.size, obj.crc32, n_parts, self.part_bytes, int(obj.expires_at * 1000), len(key))
        meta += gen + key
        meta_key = self._meta_key(key)

        async def write() -> None:
            old = await self._client.get(meta_key)
            pipe = self._client.pipeline(transaction=False)
            for i in range(n_parts):
                part = view[i * self.part_bytes : (i + 1) * self.part_bytes]
                pipe.set(self._part_key(key, gen, i), part, px=ttl_ms)
            pipe.set(meta_key, meta, px=ttl_ms)
            await pipe.execute()
            previous = self._parse_meta(old, key)
            if previous is not None and previous[5] != gen:
                expire = self._client.pipeline(transaction=False)
                for i in range(previous[2]):
                    expire.pexpire(self._part_key(key, previous[5], i), _OLD_GENERATION_TTL_MS)
                await expire.execute()

        await self._call(write, key)
        return True

    async def get(self, key: bytes) -> StoredObject | None:
        """Read and verify the object under ``key``; None if absent or inconsistent."""
        meta_key = self._meta_key(key)

        async def read() -> StoredObject | None:
            meta = self._parse_meta(await self._client.get(meta_key), key)
            if meta is None:
                return None
            size, crc, n_parts, _part_bytes, expires_at, gen = meta
            parts = await self._client.mget([self._part_key(key, gen, i) for i in range(n_parts)])
            if any(p is None for p in parts):
                return None  # replaced or expired meanwhile
            data = bytearray(size)
            view = memoryview(data)
            offset = 0
            for part in parts:
                if offset + len(part) > size:
                    return None
                view[offset : offset + len(part)] = part
                offset += len(part)
            if offset != size or crc32_of(data) != crc:
                self.corrupt += 1
                log.warning("redis tier: object under meta %r failed its checksum; ignored", meta_key.decode())
                return None
            self.hits += 1
            return StoredObject(data, crc, expires_at, tier=self.name)

        # Parts of one object share a hash-tag slot, so MGET works on Redis Cluster as well.
        return await self._call(read, key)

    async def sizes(self, keys: list[bytes]) -> list[int | None]:
        """Object size per key (None where absent), with one round trip (one per master on a cluster)."""

        async def read(batch: list[bytes]) -> list[int | None]:
            pipe = self._client.pipeline(transaction=False)
            for key in batch:
                pipe.get(self._meta_key(key))
            raws = await pipe.execute()
            out: list[int | None] = []
            for key, raw in zip(batch, raws):
                meta = self._parse_meta(raw, key)
                out.append(None if meta is None else meta[0])
            return out

        groups: dict[str | None, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(self._node(key), []).append(i)
        if len(groups) == 1 and None in groups:
            return await self._call(lambda: read(keys))
        out: list[int | None] = [None] * len(keys)
        failed = None
        for node, idx in groups.items():
            batch = [keys[i] for i in idx]
            try:
                sizes = await self._call(lambda batch=batch: read(batch), node=node)
            except RedisUnavailable as exc:  # that master is down: its keys count as absent
                failed = exc
                continue
            for i, size in zip(idx, sizes):
                out[i] = size
        if failed is not None and len(groups) == 1:
            raise failed
        return out

    async def delete(self, key: bytes) -> bool:
        meta_key = self._meta_key(key)

        async def remove() -> bool:
            meta = self._parse_meta(await self._client.get(meta_key), key)
            if meta is None:
                return False
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(meta_key)
            for i in range(meta[2]):
                pipe.delete(self._part_key(key, meta[5], i))
            await pipe.execute()
            return True

        return await self._call(remove, key)
