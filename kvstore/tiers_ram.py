"""RAM tier: an LRU of objects bounded by a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace

from kvrecall.kvstore.objects import StoredObject

__all__ = ["RamTier", "RAM_ENTRY_OVERHEAD"]

# Bytes charged per entry on top of key and data (dict slot, dataclass, bookkeeping): keeps many tiny
# objects from overrunning the budget.
RAM_ENTRY_OVERHEAD = 160


class RamTier:
    """LRU cache of :class:`StoredObject` under ``budget_bytes`` (key + data + overhead per entry).

    Thread-safe. An object larger than the whole budget is not cached.
    """

    name = "ram"

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"RAM budget must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[bytes, StoredObject] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.evictions = 0

    @staticmethod
    def _cost(key: bytes, obj: StoredObject) -> int:
        return len(key) + obj.size + RAM_ENTRY_OVERHEAD

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> StoredObject | None:
        """The object under ``key`` (now most recently used), or None if absent or expired."""
        with self._lock:
            obj = self._items.get(key)
            if obj is None:
                return None
            if obj.expired():
                self._remove(key)
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return obj

    def size_of(self, key: bytes) -> int | None:
        """Size of the object under ``key`` without touching its LRU position, or None."""
        with self._lock:
            obj = self._items.get(key)
            if obj is None or obj.expired():
                return None
            return obj.size

    def put(self, key: bytes, obj: StoredObject) -> bool:
        """Cache ``obj``, evicting least recently used entries; False if it is bigger than the budget."""
        cost = self._cost(key, obj)
        with self._lock:
            self._remove(key)
            if cost > self.budget_bytes:
                return False
            while self._bytes + cost > self.budget_bytes and self._items:
                old_key, _ = next(iter(self._items.items()))
                self._remove(old_key)
                self.evictions += 1
            self._items[key] = replace(obj, tier=self.name)
            self._bytes += cost
            return True

    def delete(self, key: bytes) -> bool:
        with self._lock:
            return self._remove(key)

    def _remove(self, key: bytes) -> bool:
        obj = self._items.pop(key, None)
        if obj is None:
            return False
        self._bytes -= self._cost(key, obj)
        return True
