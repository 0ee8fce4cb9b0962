"""The value type every tier stores and returns."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvrecall.kvstore.crc import crc32_of

__all__ = ["StoredObject", "crc32_of", "expiry_from_ttl"]


def expiry_from_ttl(ttl_seconds: float) -> float:
    """Absolute expiry (Unix seconds) for a TTL; 0.0 when ``ttl_seconds`` is 0 (no expiry)."""
    return time.time() + ttl_seconds if ttl_seconds > 0 else 0.0


@dataclass(frozen=True)
class StoredObject:
    """One object: its bytes (never mutated after creation), CRC-32 and absolute expiry.

    Attributes
    ----------
    data : bytes or bytearray
        Object contents, shape ``[size]``.
    crc32 : int
        CRC-32 of ``data``.
    expires_at : float
        Unix time after which the object counts as missing; 0.0 means never.
    tier : str
        Name of the tier it was read from (set by the tier that returns it).
    """

    data: bytes | bytearray
    crc32: int
    expires_at: float = 0.0
    tier: str = field(default="", compare=False)

    @property
    def size(self) -> int:
        return len(self.data)

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at > 0 and (time.time() if now is None else now) >= self.expires_at
