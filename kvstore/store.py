"""The tiered store: RAM -> disk -> Redis, with read promotion and write-through.

Reads try the tiers fastest first and copy a hit into the faster tiers above it (in the background, so the
reader does not wait for a disk write). Writes go to every configured tier before the Put is acknowledged;
a tier that cannot hold the object (larger than its budget, Redis down, disk error) is skipped, and the Put
fails only if no tier took it.
"""

from __future__ import annotations

import asyncio
import logging

from kvrecall.kvstore.objects import StoredObject
from kvrecall.kvstore.tiers_disk import DiskTier
from kvrecall.kvstore.tiers_ram import RamTier
from kvrecall.kvstore.tiers_redis import RedisTier, RedisUnavailable

__all__ = ["TieredStore"]

log = logging.getLogger("kvrecall.kvstore.store")


class TieredStore:
    """Combines the configured tiers; all methods are coroutines run on the server's event loop."""

    def __init__(self, ram: RamTier | None, disk: DiskTier | None, redis: RedisTier | None) -> None:
        if ram is None and disk is None and redis is None:
            raise ValueError("at least one tier must be configured")
        self.ram = ram
        self.disk = disk
        self.redis = redis
        self.misses = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._background: set[asyncio.Task] = set()

    def tiers(self) -> list[RamTier | DiskTier | RedisTier]:
        return [t for t in (self.ram, self.disk, self.redis) if t is not None]

    @property
    def corrupt(self) -> int:
        return sum(getattr(t, "corrupt", 0) for t in self.tiers())

    async def open(self) -> None:
        """Rebuild the disk index (in a worker thread) and probe Redis."""
        if self.disk is not None:
            await asyncio.to_thread(self.disk.open)
        if self.redis is not None and not await self.redis.ping():
            log.warning("redis tier %s not reachable at start; serving from local tiers", self.redis.url)

    async def close(self) -> None:
        """Finish background promotions, then release the tiers."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.redis is not None:
            await self.redis.close()
        if self.disk is not None:
            self.disk.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----------------------------------------------------------------------------------------------- reads
    async def get(self, key: bytes) -> StoredObject | None:
        """The object under ``key`` from the fastest tier that has it, or None (counted as a miss)."""
        if self.ram is not None:
            obj = self.ram.get(key)
            if obj is not None:
                return obj
        if self.disk is not None:
            obj = await asyncio.to_thread(self.disk.get, key)
            if obj is not None:
                if self.ram is not None:
                    self.ram.put(key, obj)
                return obj
        if self.redis is not None:
            try:
                obj = await self.redis.get(key)
            except RedisUnavailable:
                obj = None
            if obj is not None:
                if self.ram is not None:
                    self.ram.put(key, obj)
                if self.disk is not None:
                    self._spawn(asyncio.to_thread(self.disk.put, key, obj))
                return obj
        self.misses += 1
        return None

    async def sizes(self, keys: list[bytes]) -> list[int | None]:
        """Object size per key (None where no tier has it); Redis is asked once for all local misses."""
        out: list[int | None] = []
        for key in keys:
            size = self.ram.size_of(key) if self.ram is not None else None
            if size is None and self.disk is not None:
                size = self.disk.size_of(key)
            out.append(size)
        missing = [i for i, s in enumerate(out) if s is None]
        if missing and self.redis is not None:
            try:
                remote = await self.redis.sizes([keys[i] for i in missing])
            except RedisUnavailable:
                remote = [None] * len(missing)
            for i, size in zip(missing, remote):
                out[i] = size
        return out

    # ----------------------------------------------------------------------------------------------- writes
    async def put(self, key: bytes, obj: StoredObject) -> list[str]:
        """Write through to every tier; return the names of the tiers that now hold the object."""
        stored: list[str] = []
        jobs = []
        names = []
        if self.disk is not None:
            jobs.append(asyncio.to_thread(self.disk.put, key, obj))
            names.append(self.disk.name)
        if self.redis is not None:
            jobs.append(self.redis.put(key, obj))
            names.append(self.redis.name)
        if self.ram is not None and self.ram.put(key, obj):
            stored.append(self.ram.name)
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for name, result in zip(names, results):
            if result is True:
                stored.append(name)
            elif isinstance(result, BaseException) and not isinstance(result, RedisUnavailable):
                log.error("tier %s failed to store an object: %r", name, result)
        if stored:
            self.bytes_in += obj.size
        return stored

    async def delete(self, key: bytes) -> bool:
        """Remove ``key`` from every tier; True if any tier had it."""
        found = False
        if self.ram is not None:
            found |= self.ram.delete(key)
        if self.disk is not None:
            found |= await asyncio.to_thread(self.disk.delete, key)
        if self.redis is not None:
            try:
                found |= await self.redis.delete(key)
            except RedisUnavailable:
                pass
        return found
