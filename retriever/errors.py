"""The one exception type of :mod:`kvrecall.retriever`."""

from __future__ import annotations

__all__ = ["RetrieverError"]


class RetrieverError(ValueError):
    """A retriever profile, index, tensor or setting is unusable (wrong shape, dtype, model, corrupted file...)."""
