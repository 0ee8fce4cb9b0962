"""The tiered store: RAM -> disk -> Redis, with read promotion and write-through.

Reads try the tiers fastest first and copy a hit into the faster tiers above it (in the background, so the
reader does not wait for a disk write). Writes go to every configured tier before the Put is acknowledged;
a tier that cannot hold the object (larger than its budget, Redis down, disk error) is skipped, and the Put
fails only if no tier took it (or, with ``require_disk``, if the disk did not take it).

Which write wins: writes, promotions and deletes of one key are serialised by a per-key lock, in the order
in which their Puts finished arriving (the lock is FIFO). Every tier therefore ends with the same version:
the one whose Put was received completely last, which is also the one acknowledged last. A promotion copies
an object into a faster tier only under that lock and only if no write of the key happened since it was read.
"""

from __future__ import annotations

import asyncio
import logging

from kvrecall.kvstore.objects import StoredObject
from kvrecall.kvstore.tiers_disk import DiskTier
from kvrecall.kvstore.tiers_ram import RamTier
from kvrecall.kvstore.tiers_redis import RedisTier, RedisUnavailable

__all__ = ["TieredStore", "DiskRequiredError"]

log = logging.getLogger("kvrecall.kvstore.store")


class DiskRequiredError(RuntimeError):
    """With ``require_disk``, a Put could not be written to the disk tier (nothing was stored)."""


class _KeyLocks:
    """One FIFO :class:`asyncio.Lock` per key while anyone holds or waits for it; a write counter per key."""

    def __init__(self) -> None:
        self._locks: dict[bytes, list] = {}  # key -> [lock, users]
        self.writes = 0  # global write sequence; a promotion checks nothing was written since it read

    def hold(self, key: bytes):
        return _Held(self, key)


class _Held:
    def __init__(self, locks: _KeyLocks, key: bytes) -> None:
        self.locks, self.key = locks, key

    async def __aenter__(self) -> None:
        entry = self.locks._locks.get(self.key)
        if entry is None:
            entry = self.locks._locks[self.key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._release_user(entry)
            raise

    async def __aexit__(self, *exc) -> None:
        entry = self.locks._locks[self.key]
        entry[0].release()
        self._release_user(entry)

    def _release_user(self, entry: list) -> None:
        entry[1] -= 1
        if entry[1] == 0:
            del self.locks._locks[self.key]


class TieredStore:
    """Combines the configured tiers; all methods are coroutines run on the server's event loop.

    Parameters
    ----------
    ram, disk, redis : tier or None
        The configured tiers (at least one).
    require_disk : bool
        A Put is acknowledged only once the disk tier holds it; if the disk write fails (disk full, I/O
        error, no room in the budget) the Put fails with :class:`DiskRequiredError` and nothing is stored.
    write_behind : bool
        A Put is acknowledged once RAM (and Redis, if configured) hold it; the disk copy is written in the
        background, in write order per key (a newer write of the key supersedes an older pending one). Until
        then reads are served from memory. A crash or power loss loses Puts whose disk write had not finished.
        At most ``write_behind_bytes`` wait for the disk; beyond that a Put writes its disk copy before it is
        acknowledged (back-pressure).
    """

    def __init__(self, ram: RamTier | None, disk: DiskTier | None, redis: RedisTier | None,
                 require_disk: bool = False, write_behind: bool = False, write_behind_bytes: int = 1 << 30) -> None:
        if ram is None and disk is None and redis is None:
            raise ValueError("at least one tier must be configured")
        if require_disk and disk is None:
            raise ValueError("require_disk needs a disk tier (disk_dir and a non-zero disk budget)")
        if write_behind and (disk is None or require_disk):
            raise ValueError("write_behind needs a disk tier and excludes require_disk")
        self.write_behind = write_behind
        self.write_behind_bytes = write_behind_bytes
        self._pending: dict[bytes, StoredObject] = {}  # write-behind: acknowledged, not yet on disk
        self._pending_bytes = 0
        self.ram = ram
        self.disk = disk
        self.redis = redis
        self.require_disk = require_disk
        self.misses = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._background: set[asyncio.Task] = set()
        self._keys = _KeyLocks()
        self._last_write: dict[bytes, int] = {}
        self._pruned_upto = 0

    def tiers(self) -> list[RamTier | DiskTier | RedisTier]:
        return [t for t in (self.ram, self.disk, self.redis) if t is not None]

    @property
    def corrupt(self) -> int:
        return sum(getattr(t, "corrupt", 0) for t in self.tiers())

    def lock(self) -> None:
        """Take the disk directory's lock (fast; raises DiskStoreError if another server holds it)."""
        if self.disk is not None:
            self.disk.lock()

    async def open(self) -> None:
        """Rebuild the disk index (in a worker thread) and probe Redis."""
        if self.disk is not None:
            await asyncio.to_thread(self.disk.open)
        if self.redis is not None and not await self.redis.ping():
            log.warning("redis tier %s not reachable at start; serving from local tiers", self.redis.url)  # redacted

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
    def _written_since(self, key: bytes, seq: int) -> bool:
        return seq < self._pruned_upto or self._last_write.get(key, -1) > seq

    async def get(self, key: bytes) -> StoredObject | None:
        """The object under ``key`` from the fastest tier that has it, or None (counted as a miss)."""
        if self.ram is not None:
            obj = self.ram.get(key)
            if obj is not None:
                return obj
        obj = self._pending.get(key)
        if obj is not None and not obj.expired():
            return obj
        seq = self._keys.writes
        if self.disk is not None:
            obj = await asyncio.to_thread(self.disk.get, key)
            if obj is not None:
                if self.ram is not None:
                    async with self._keys.hold(key):
                        if not self._written_since(key, seq):
                            self.ram.put(key, obj)
                return obj
        if self.redis is not None:
            try:
                obj = await self.redis.get(key)
            except RedisUnavailable:
                obj = None
            if obj is not None:
                if self.ram is not None:
                    async with self._keys.hold(key):
                        if not self._written_since(key, seq):
                            self.ram.put(key, obj)
                if self.disk is not None:
                    self._spawn(self._promote_to_disk(key, obj, seq))
                return obj
        self.misses += 1
        return None

    async def _promote_to_disk(self, key: bytes, obj: StoredObject, seq: int) -> None:
        async with self._keys.hold(key):
            if not self._written_since(key, seq):
                await asyncio.to_thread(self.disk.put, key, obj)

    async def sizes(self, keys: list[bytes]) -> list[int | None]:
        """Object size per key (None where no tier has it); Redis is asked once for all local misses."""
        out: list[int | None] = []
        for key in keys:
            size = self.ram.size_of(key) if self.ram is not None else None
            if size is None and key in self._pending:
                size = self._pending[key].size
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
    def _mark_written(self, key: bytes) -> None:
        self._keys.writes += 1
        self._last_write[key] = self._keys.writes
        if len(self._last_write) > 65536:  # only keys with reads in flight matter; keep the map small
            cutoff = self._keys.writes - 65536
            self._pruned_upto = cutoff
            self._last_write = {k: v for k, v in self._last_write.items() if v > cutoff}

    async def put(self, key: bytes, obj: StoredObject) -> list[str]:
        """Write through to every tier; return the names of the tiers that now hold the object.

        Raises
        ------
        DiskRequiredError
            With ``require_disk``, when the disk tier did not take the object (nothing is stored then).
        """
        async with self._keys.hold(key):
            self._mark_written(key)
            stored: list[str] = []
            if self.require_disk:
                ok = await self._disk_put(key, obj)
                if not ok:
                    reason = self.disk.last_error or "not enough room in the disk budget"
                    raise DiskRequiredError(f"the disk tier could not store the object ({reason}); "
                                            "nothing was stored")
                stored.append(self.disk.name)
            jobs = []
            names = []
            in_ram = self.ram is not None and self.ram.put(key, obj)
            if in_ram:
                stored.insert(0, self.ram.name)
            # write-behind only for what memory holds meanwhile, and within its byte budget
            behind = self.write_behind and in_ram and self._pending_bytes + obj.size <= self.write_behind_bytes
            if behind:
                self._queue_disk_write(key, obj)
            elif self.disk is not None and not self.require_disk:
                jobs.append(self._disk_put(key, obj))
                names.append(self.disk.name)
            if self.redis is not None:
                jobs.append(self.redis.put(key, obj))
                names.append(self.redis.name)
            results = await asyncio.gather(*jobs, return_exceptions=True)
            for name, result in zip(names, results):
                if result is True:
                    stored.append(name)
                elif isinstance(result, BaseException) and not isinstance(result, RedisUnavailable):
                    log.error("tier %s failed to store an object: %r", name, result)
            if stored:
                self.bytes_in += obj.size
            return stored

    def _queue_disk_write(self, key: bytes, obj: StoredObject) -> None:
        old = self._pending.pop(key, None)
        if old is not None:
            self._pending_bytes -= old.size
        self._pending[key] = obj
        self._pending_bytes += obj.size
        self._spawn(self._write_behind(key, obj))

    async def _write_behind(self, key: bytes, obj: StoredObject) -> None:
        async with self._keys.hold(key):  # FIFO: after the Put that queued it, before any later write of key
            if self._pending.get(key) is not obj:
                return  # superseded by a newer write (or deleted): that one is written instead
            try:
                await self._disk_put(key, obj)
            finally:
                if self._pending.get(key) is obj:
                    del self._pending[key]
                    self._pending_bytes -= obj.size

    async def _disk_put(self, key: bytes, obj: StoredObject) -> bool:
        """Disk write in a worker thread; a failure before the write started (thread pool gone) is False."""
        try:
            return await asyncio.to_thread(self.disk.put, key, obj)
        except RuntimeError as exc:
            log.error("disk tier: write could not run: %s", exc)
            return False

    async def delete(self, key: bytes) -> bool:
        """Remove ``key`` from every tier; True if any tier had it."""
        async with self._keys.hold(key):
            self._mark_written(key)
            found = False
            pending = self._pending.pop(key, None)
            if pending is not None:
                self._pending_bytes -= pending.size
                found = True
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
