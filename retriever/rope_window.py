"""RoPE tables from a stored ``inv_freq`` and the windowed-RoPE query rotation.

RoPE rotates a pre-RoPE vector ``x`` at position ``p`` to ``R_p x`` (Hugging Face "rotate half" convention).
For a query at position ``p`` and a key at position ``j``::

    (R_p q) . (R_j k) = (R_{p-j} q) . k

so the score of any key at *relative distance* ``d = p - j`` is the pre-RoPE key dotted with the query rotated by
``d``. Windowed RoPE (A²ATS) scores every out-of-window key as if it sat at one fixed distance ``w``: the query
is rotated once by ``w`` and compared with position-free, pre-RoPE keys, so one codebook serves all positions.
"""

from __future__ import annotations

import torch

from kvrecall.models import apply_rope, rope_tables, undo_rope
from kvrecall.retriever.errors import RetrieverError

__all__ = ["rotate", "unrotate", "windowed_query"]


def rotate(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Apply RoPE to ``x[..., tokens, head_dim]`` at ``positions`` (``[tokens]``). Returns float32."""
    cos, sin = rope_tables(inv_freq, positions, scaling)
    return apply_rope(x.float(), cos.to(x.device), sin.to(x.device))


def unrotate(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Undo RoPE on ``x[..., tokens, head_dim]`` rotated at ``positions``. Exact for ``scaling == 1``."""
    cos, sin = rope_tables(inv_freq, positions, 1.0)
    out = undo_rope(x.float(), cos.to(x.device), sin.to(x.device))
    return out / scaling if scaling != 1.0 else out


def windowed_query(q: torch.Tensor, inv_freq: torch.Tensor, distance: int, scaling: float = 1.0) -> torch.Tensor:
    """Rotate pre-RoPE queries ``q[..., head_dim]`` by the fixed relative position ``distance``.

    ``windowed_query(q, ..., w) @ k_pre`` equals the true post-RoPE score of a key exactly ``w`` tokens back.

    Returns
    -------
    Tensor[..., head_dim], float32
    """
    if distance < 0:
        raise RetrieverError(f"window distance must be >= 0, got {distance}")
    cos, sin = rope_tables(inv_freq, torch.tensor([distance]), scaling)
    return apply_rope(q.float(), cos[0].to(q.device), sin[0].to(q.device))
