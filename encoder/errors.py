"""Exceptions raised by the KV codec."""

from __future__ import annotations

__all__ = ["CodecError"]


class CodecError(ValueError):
    """Input to the codec is unusable: a malformed, truncated, corrupted, wrong-version or wrong-profile bitstream,
    a bad profile file, or a tensor the codec cannot encode (wrong rank, non-finite values, unknown level)."""
