"""Helpers shared by the kernel tests and the kernel bench: random selections and error metrics."""

from __future__ import annotations

import torch

__all__ = ["random_selection", "relative_error", "TOLERANCE"]

# ||out - ref|| / ||ref|| allowed per output dtype (float32 math inside every kernel; the gap is output rounding).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_selection(
    batch: int,
    kv_heads: int,
    tokens: int,
    counts: torch.Tensor | list | int,
    generator: torch.Generator | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random selection in the retriever's format.

    Parameters
    ----------
    counts : int, list or Tensor[B, Hkv]
        Tokens selected per row (each <= ``tokens``).
    width : int, optional
        Selection width ``S`` (default: the largest count).

    Returns
    -------
    indices : Tensor[B, Hkv, S], int64, ascending, padded with -1
    counts : Tensor[B, Hkv], int64
    """
    counts = torch.as_tensor(counts, dtype=torch.int64).expand(batch, kv_heads).clone()
    s = int(counts.max()) if width is None else width
    indices = torch.full((batch, kv_heads, s), -1, dtype=torch.int64)
    for b in range(batch):
        for h in range(kv_heads):
            c = int(counts[b, h])
            indices[b, h, :c] = torch.randperm(tokens, generator=generator)[:c].sort().values
    return indices, counts


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (0 when both are zero)."""
    diff = (out.double() - ref.double()).norm()
    norm = ref.double().norm()
    return float(diff / norm) if norm > 0 else float(diff)
