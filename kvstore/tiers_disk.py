"""Disk tier: durable objects under a byte budget, LRU-evicted, atomic writes, checksum-verified reads.

Layout under the root directory (one server per directory, enforced with an advisory lock)::

    KVRECALL_STORE         marker with the format version
    LOCK                   flock held while a server uses the directory
    tmp/                   writes in progress; emptied on open (leftovers of a crash)
    objects/ab/<64 hex>    one file per object, named by SHA-256 of the key (keys never form paths)

Object file: a 32-byte header (magic ``KVRC``, format version, key length, object size, CRC-32 of the object,
expiry in ms), the key, a CRC-32 of header and key, then the object bytes. A write goes to ``tmp/``, is fsynced,
renamed over the final name (atomic on POSIX) and the directory is fsynced before the Put is acknowledged, so
no reader ever sees a partial object, even after ``kill -9``. Every read re-checks both CRCs, the key and the
length; a corrupt file is deleted, counted and reported as missing. The in-memory index (name -> size, expiry,
LRU position) is rebuilt from the file headers on open, ordered by modification time, which reads bump.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from kvrecall.kvstore.keys import key_digest
from kvrecall.kvstore.objects import StoredObject, crc32_of

__all__ = ["DiskTier", "DiskStoreError", "HEADER"]

log = logging.getLogger("kvrecall.kvstore.disk")

MAGIC = b"KVRC"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHIQIQ")  # magic, version, flags, key_len, object_bytes, crc32, expires_at_ms
HEADER_CRC = struct.Struct("<I")
_NAME_RE = re.compile(r"^[0-9a-f]{64}$")
_MARKER = "KVRECALL_STORE"


class DiskStoreError(RuntimeError):
    """The disk directory cannot be used (locked by another server, not writable, not a store)."""


# Write errors that mean the disk cannot take objects at all (rather than one bad object): the tier reports
# itself down until a write succeeds again.
_DISK_DOWN_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


@dataclass
class _Entry:
    file_bytes: int
    object_bytes: int
    expires_at: float


class DiskTier:
    """Durable object store in a directory, bounded by ``budget_bytes`` of file sizes.

    Thread-safe; the methods block on file I/O, so an asyncio server calls them in worker threads.
    Call :meth:`open` (or :meth:`lock` then :meth:`load`) before use and :meth:`close` after.

    Writes in progress are charged to the budget before their first byte is written (older objects are
    evicted to make room), so the directory never holds more than ``budget_bytes`` of object files, even with
    many concurrent writers. A write that fails for lack of space (ENOSPC, EDQUOT, EFBIG) or a read-only or
    failing device (EROFS, EIO) counts in :attr:`errors` and marks the tier unavailable (:attr:`available`,
    :attr:`last_error`) until a write succeeds again.
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike, budget_bytes: int, fsync: bool = True) -> None:
        if budget_bytes < 0:
            raise ValueError(f"disk budget must be >= 0, got {budget_bytes}")
        self.root = Path(root).expanduser()
        self.budget_bytes = budget_bytes
        self.fsync = fsync
        self._index: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._reserved = 0
        self.hits = 0
        self.evictions = 0
        self.corrupt = 0
        self.errors = 0
        self.available = True
        self.last_error = ""

    # ----------------------------------------------------------------------------------------------- lifecycle
    def open(self) -> int:
        """Lock the directory, clear unfinished writes, rebuild the index; return the number of objects."""
        self.lock()
        return self.load()

    def lock(self) -> None:
        """Create the layout if needed and take the directory's lock (fast; no scan).

        Raises
        ------
        DiskStoreError
            If the directory cannot be created or is locked by another server.
        """
        if self._lock_fd is not None:
            return
        try:
            (self.root / "objects").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
            marker = self.root / _MARKER
            if not marker.exists():
                marker.write_text(f"kvrecall disk store, format {FORMAT_VERSION}\n")
            fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DiskStoreError(f"cannot use disk directory {self.root}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise DiskStoreError(f"disk directory {self.root} is in use by another kvstore server") from exc
        self._lock_fd = fd

    def load(self) -> int:
        """Clear unfinished writes and rebuild the index from the file headers; return the number of objects."""
        self.lock()
        for leftover in (self.root / "tmp").iterdir():
            leftover.unlink(missing_ok=True)
        found = []
        now = time.time()
        for sub in sorted((self.root / "objects").iterdir()):
            if not sub.is_dir():
                continue
            for item in os.scandir(sub):
                if not _NAME_RE.match(item.name) or not item.is_file(follow_symlinks=False):
                    continue
                entry = self._read_entry(Path(item.path), item.name, now)
                if entry is not None:
                    found.append((item.stat().st_mtime, item.name, entry))
        found.sort()
        with self._lock:
            for _, name, entry in found:
                self._index[name] = entry
                self._bytes += entry.file_bytes
            self._evict_locked(keep=None)
        log.info("disk tier %s: %d objects, %d bytes", self.root, len(self._index), self._bytes)
        return len(self._index)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _read_entry(self, path: Path, name: str, now: float) -> _Entry | None:
        """Index entry from a file's header, or None (file deleted) if the header is bad or expired."""
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
                parsed = self._parse_header(head)
                if parsed is not None:
                    key_len, size, _, expires_at = parsed
                    rest = f.read(key_len + HEADER_CRC.size)
                    file_bytes = os.fstat(f.fileno()).st_size
        except OSError:
            return None
        ok = (
            parsed is not None
            and len(rest) == key_len + HEADER_CRC.size
            and HEADER_CRC.unpack(rest[key_len:])[0] == crc32_of(head + rest[:key_len])
            and key_digest(rest[:key_len]) == name
            and file_bytes == HEADER.size + key_len + HEADER_CRC.size + size
        )
        if not ok:
            log.warning("disk tier: dropping corrupt object file %s", path)
            self.corrupt += 1
            path.unlink(missing_ok=True)
            return None
        if expires_at and expires_at <= now:
            path.unlink(missing_ok=True)
            return None
        return _Entry(file_bytes, size, expires_at)

    @staticmethod
    def _parse_header(head: bytes) -> tuple[int, int, int, float] | None:
        if len(head) != HEADER.size:
            return None
        magic, version, _flags, key_len, size, crc, expires_ms = HEADER.unpack(head)
        if magic != MAGIC or version != FORMAT_VERSION or key_len == 0 or key_len > 1 << 16:
            return None
        return key_len, size, crc, expires_ms / 1000.0

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._index)

    def _path(self, name: str) -> Path:
        return self.root / "objects" / name[:2] / name

    def size_of(self, key: bytes) -> int | None:
        """Object size under ``key`` from the index (no file access), or None if absent or expired."""
        name = key_digest(key)
        with self._lock:
            entry = self._index.get(name)
            if entry is None:
                return None
            if entry.expires_at and entry.expires_at <= time.time():
                self._drop_locked(name)
                return None
            return entry.object_bytes

    def get(self, key: bytes) -> StoredObject | None:
        """Read and verify the object under ``key``; a corrupt file is deleted and None returned."""
        name = key_digest(key)
        with self._lock:
            entry = self._index.get(name)
            if entry is None:
                return None
            if entry.expires_at and entry.expires_at <= time.time():
                self._drop_locked(name)
                return None
            self._index.move_to_end(name)
        path = self._path(name)
        try:
            with open(path, "rb", buffering=0) as f:
                inode = os.fstat(f.fileno()).st_ino
                obj, reason = self._read_object(f, key)
        except FileNotFoundError:
            with self._lock:
                if name in self._index and not path.exists():
                    self._drop_locked(name)
            return None
        except OSError as exc:  # an I/O error is a miss, never a failed request
            log.error("disk tier: cannot read %s: %s", path, exc)
            return None
        if obj is None:
            self._drop_corrupt(name, path, inode, reason)
            return None
        try:
            os.utime(path)  # LRU position survives restart
        except OSError:
            pass
        self.hits += 1
        return obj

    def _read_object(self, f, key: bytes) -> tuple[StoredObject | None, str]:
        head = f.read(HEADER.size)
        parsed = self._parse_header(head)
        if parsed is None:
            return None, "bad header"
        key_len, size, crc, expires_at = parsed
        rest = f.read(key_len + HEADER_CRC.size)
        if len(rest) != key_len + HEADER_CRC.size or HEADER_CRC.unpack(rest[key_len:])[0] != crc32_of(
            head + rest[:key_len]
        ):
            return None, "header checksum mismatch"
        if rest[:key_len] != key:
            return None, "key mismatch"
        if os.fstat(f.fileno()).st_size != HEADER.size + key_len + HEADER_CRC.size + size:
            return None, "length mismatch"
        data = bytearray(size)
        view = memoryview(data)
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:
                return None, "short read"
            done += n
        if crc32_of(data) != crc:
            return None, "object checksum mismatch"
        return StoredObject(data, crc, expires_at, tier=self.name), ""

    def _drop_corrupt(self, name: str, path: Path, inode: int, reason: str) -> None:
        log.warning("disk tier: corrupt object %s (%s); deleted and reported as missing", path, reason)
        self.corrupt += 1
        with self._lock:
            try:
                if os.stat(path).st_ino == inode:  # not replaced by a fresh write meanwhile
                    path.unlink()
                    self._drop_locked(name, unlink=False)
            except FileNotFoundError:
                self._drop_locked(name, unlink=False)

    # ----------------------------------------------------------------------------------------------- updates
    def put(self, key: bytes, obj: StoredObject) -> bool:
        """Durably write ``obj`` (atomic replace); False if it cannot fit in the budget or the write fails.

        The file's size is reserved against the budget before writing (evicting older objects), so concurrent
        writers never push the directory over it; if reservations of other writes in progress leave no room,
        the write is skipped (False).
        """
        name = key_digest(key)
        head = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(key), obj.size, obj.crc32, int(obj.expires_at * 1000))
        head += key
        head += HEADER_CRC.pack(crc32_of(head))
        file_bytes = len(head) + obj.size
        if file_bytes > self.budget_bytes or not self._reserve(file_bytes):
            return False
        final = self._path(name)
        tmp = self.root / "tmp" / f"{name}.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}.part"
        try:
            try:
                final.parent.mkdir(exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    self._write_all(fd, head)
                    self._write_all(fd, obj.data)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                with self._lock:
                    os.replace(tmp, final)
                    self._reserved -= file_bytes
                    file_bytes_charged, file_bytes = file_bytes, 0
                    self._drop_locked(name, unlink=False)
                    self._index[name] = _Entry(file_bytes_charged, obj.size, obj.expires_at)
                    self._bytes += file_bytes_charged
                    self._evict_locked(keep=name)
                if self.fsync:
                    dir_fd = os.open(final.parent, os.O_RDONLY)
                    try:
                        os.fsync(dir_fd)
                    finally:
                        os.close(dir_fd)
            finally:
                if file_bytes:  # not committed: give the reservation back
                    with self._lock:
                        self._reserved -= file_bytes
        except OSError as exc:
            self._write_failed(final, exc)
            tmp.unlink(missing_ok=True)
            return False
        if not self.available:
            log.warning("disk tier %s accepts writes again", self.root)
            self.available = True
            self.last_error = ""
        return True

    def _reserve(self, file_bytes: int) -> bool:
        """Charge a write in progress to the budget, evicting least recently used objects to make room."""
        with self._lock:
            while self._bytes + self._reserved + file_bytes > self.budget_bytes and self._index:
                victim = next(iter(self._index))
                self._drop_locked(victim)
                self.evictions += 1
            if self._bytes + self._reserved + file_bytes > self.budget_bytes:
                return False  # the rest of the budget is reserved by other writes in progress
            self._reserved += file_bytes
            return True

    def _write_failed(self, path: Path, exc: OSError) -> None:
        self.errors += 1
        message = f"write of {path} failed: {exc.strerror or exc}"
        if exc.errno in _DISK_DOWN_ERRNOS:
            if self.available:
                log.error("disk tier %s cannot take writes (%s); Puts are not durable until it can", self.root,
                          exc.strerror or exc)
            self.available = False
            self.last_error = message
        else:
            log.error("disk tier: %s", message)

    def probe(self, probe_bytes: int = 64 << 10) -> bool:
        """While the tier is down, try a small write (``probe_bytes`` to ``tmp/``, fsynced, removed): mark it up
        again if that works. Returns :attr:`available`. Lets a server whose Puts were refused (``require_disk``
        turns health NOT_SERVING) notice that space was freed without waiting for a Put."""
        if self.available:
            return True
        path = self.root / "tmp" / f"probe.{os.getpid()}.{threading.get_ident()}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                self._write_all(fd, bytes(probe_bytes))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.last_error = f"write probe failed: {exc.strerror or exc}"
            return False
        finally:
            path.unlink(missing_ok=True)
        log.warning("disk tier %s accepts writes again", self.root)
        self.available = True
        self.last_error = ""
        return True

    @property
    def reserved_bytes(self) -> int:
        """Bytes charged to writes in progress."""
        return self._reserved

    @staticmethod
    def _write_all(fd: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def delete(self, key: bytes) -> bool:
        name = key_digest(key)
        with self._lock:
            if name not in self._index:
                return False
            self._drop_locked(name)
            return True

    def _drop_locked(self, name: str, unlink: bool = True) -> None:
        entry = self._index.pop(name, None)
        if entry is not None:
            self._bytes -= entry.file_bytes
        if unlink:
            self._path(name).unlink(missing_ok=True)

    def _evict_locked(self, keep: str | None) -> None:
        while self._bytes > self.budget_bytes and self._index:
            victim = next(iter(self._index))
            if victim == keep:
                if len(self._index) == 1:
                    break
                self._index.move_to_end(victim)
                continue
            self._drop_locked(victim)
            self.evictions += 1
