"""Where a :class:`~kvrecall.stream_session.StreamSession` keeps its offloaded blocks: RAM up to a budget, then
disk, or a kvstore. Blocks are opaque byte strings (codec chunks or raw KV), addressed by block number.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["BlockTier", "StreamError", "block_key", "state_key"]


class StreamError(ValueError):
    """Bad input to a stream session, a closed session, or a session/block missing from its store."""


def block_key(session_id: str, index: int) -> bytes:
    """kvstore key of block ``index`` of a session."""
    return f"kvrecall/stream/{session_id}/block/{index}".encode()


def state_key(session_id: str) -> bytes:
    """kvstore key of a session's state (window, sinks, index, metadata)."""
    return f"kvrecall/stream/{session_id}/state".encode()


class BlockTier:
    """Block bytes in RAM (up to ``ram_bytes``), spilled oldest-first to files in ``spill_dir``, or in a kvstore.

    Parameters
    ----------
    session_id : str
    store : kvstore client or None
        When given every block is written there (RAM holds none, the store is the tier).
    ram_bytes : int
        Bytes of blocks kept in RAM without a store; older blocks beyond it go to disk.
    spill_dir : str or Path or None
        Folder for spilled blocks (default: a temporary folder removed at :meth:`close`).
    """

    def __init__(self, session_id: str, store=None, ram_bytes: int = 256 << 20,
                 spill_dir: str | Path | None = None) -> None:
        if isinstance(ram_bytes, bool) or not isinstance(ram_bytes, int) or ram_bytes < 0:
            raise StreamError(f"ram_bytes must be an int >= 0, got {ram_bytes!r}")
        self.session_id, self.store, self.ram_bytes = session_id, store, ram_bytes
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._own_dir = False
        self.ram: dict[int, bytes] = {}
        self.on_disk: dict[int, int] = {}  # index -> size
        self.in_store: dict[int, int] = {}
        self.ram_used = 0

    @property
    def spill_dir(self) -> Path:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix=f"kvrecall-stream-{self.session_id}-"))
            self._own_dir = True
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        return self._spill_dir

    def _path(self, index: int) -> Path:
        return self.spill_dir / f"block-{index:08d}.bin"

    def put(self, index: int, data: bytes) -> None:
        """Keep block ``index``; spill the oldest RAM blocks to disk while RAM is over budget."""
        if self.store is not None:
            self.store.put(block_key(self.session_id, index), data)
            self.in_store[index] = len(data)
            return
        self.ram[index] = data
        self.ram_used += len(data)
        while self.ram_used > self.ram_bytes and self.ram:
            oldest = min(self.ram)
            blob = self.ram.pop(oldest)
            path = self._path(oldest)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
            self.on_disk[oldest] = len(blob)
            self.ram_used -= len(blob)

    def get(self, index: int) -> bytes:
        """Bytes of block ``index``.

        Raises
        ------
        StreamError
            If the block is in no tier (evicted from the store, deleted spill file).
        """
        if index in self.ram:
            return self.ram[index]
        if index in self.on_disk:
            try:
                return self._path(index).read_bytes()
            except FileNotFoundError:
                raise StreamError(f"block {index} of session {self.session_id!r} is missing from "
                                  f"{self.spill_dir}") from None
        if self.store is not None:
            data = self.store.get(block_key(self.session_id, index))
            if data is None:
                raise StreamError(f"block {index} of session {self.session_id!r} is not in the store")
            return bytes(data)
        raise StreamError(f"session {self.session_id!r} has no block {index}")

    def adopt_store_blocks(self, count: int) -> None:
        """Blocks ``0 .. count-1`` are already in the store (a reopened session)."""
        self.in_store.update({i: 0 for i in range(count)})

    def stats(self) -> dict[str, int]:
        return {"ram_block_bytes": self.ram_used, "disk_block_bytes": sum(self.on_disk.values()),
                "store_block_bytes": sum(self.in_store.values()), "blocks_in_ram": len(self.ram),
                "blocks_on_disk": len(self.on_disk), "blocks_in_store": len(self.in_store)}

    def close(self) -> None:
        """Drop RAM blocks and a temporary spill folder (a given ``spill_dir`` is left in place)."""
        self.ram.clear()
        self.ram_used = 0
        if self._own_dir and self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self.on_disk.clear()
