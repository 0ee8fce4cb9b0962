"""Token selection per decode step: top-k per query head, union per GQA group, plus sinks and a recent window."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvrecall.retriever.errors import RetrieverError

__all__ = ["Selection", "select_from_scores", "resolve_budget", "fixed_token_mask", "selection_mask", "union_select"]


@dataclass
class Selection:
    """Selected tokens per (batch, KV head).

    Attributes
    ----------
    indices : Tensor[B, Hkv, S], int64
        Token indices in ascending order, padded with -1 (``S`` = the largest count).
    counts : Tensor[B, Hkv], int64
        Number of valid indices per row.
    """

    indices: torch.Tensor
    counts: torch.Tensor

    def mask(self, tokens: int) -> torch.Tensor:
        """Boolean membership ``Tensor[B, Hkv, tokens]``."""
        return selection_mask(self, tokens)


def resolve_budget(budget: int | float, tokens: int) -> int:
    """Top-k count per query head from a budget given as a token count (int) or a fraction of the context (float).

    A fraction ``f`` in (0, 1] gives ``max(1, round(f * tokens))``. Sinks and the recent window come on top.
    """
    if isinstance(budget, bool):
        raise RetrieverError(f"budget must be an int count or a float fraction, got {budget!r}")
    if isinstance(budget, int):
        if budget < 0:
            raise RetrieverError(f"budget count must be >= 0, got {budget}")
        return budget
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise RetrieverError(f"budget fraction must be in (0, 1], got {budget}")
        return max(1, int(round(budget * tokens)))
    raise RetrieverError(f"budget must be an int count or a float fraction, got {type(budget).__name__}")


def fixed_token_mask(tokens: int, sinks: int, window: int, device=None) -> torch.Tensor:
    """``Tensor[tokens]`` bool: the first ``sinks`` and the last ``window`` tokens (always selected)."""
    if sinks < 0 or window < 0:
        raise RetrieverError(f"sinks and window must be >= 0, got {sinks}, {window}")
    pos = torch.arange(tokens, device=device)
    return (pos < sinks) | (pos >= tokens - window)


def _topk_mask(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask ``[..., T]`` of the ``k`` best candidates (``candidates [T]``) per row; ties go to the lower index."""
    k = min(k, int(candidates.sum()))
    out = torch.zeros_like(scores, dtype=torch.bool)
    if k == 0:
        return out
    masked = scores.masked_fill(~candidates, float("-inf"))
    kth = masked.topk(k, dim=-1).values[..., -1:]  # [..., 1]
    greater = (scores > kth) & candidates
    equal = (scores == kth) & candidates
    need = k - greater.sum(-1, keepdim=True)
    take_equal = equal & (torch.cumsum(equal.to(torch.int64), dim=-1) <= need)
    return greater | take_equal


def union_select(head_masks: torch.Tensor, group: int, fixed: torch.Tensor) -> Selection:
    """Union per-query-head masks ``[B, Hq, T]`` within GQA groups, add ``fixed`` ``[T]``, return a Selection."""
    b, hq, t = head_masks.shape
    kv_mask = head_masks.reshape(b, hq // group, group, t).any(dim=2) | fixed
    return _mask_to_selection(kv_mask)


def _mask_to_selection(kv_mask: torch.Tensor) -> Selection:
    b, hkv, t = kv_mask.shape
    counts = kv_mask.sum(-1)
    s = int(counts.max()) if counts.numel() else 0
    pos = torch.arange(t, device=kv_mask.device).expand(b, hkv, t)
    keyed = torch.where(kv_mask, pos, torch.full_like(pos, t))
    idx = keyed.sort(dim=-1).values[..., :s]
    idx = torch.where(idx == t, torch.full_like(idx, -1), idx)
    return Selection(indices=idx.to(torch.int64), counts=counts.to(torch.int64))


def select_from_scores(
    scores: torch.Tensor, group: int, k: int, sinks: int = 8, window: int = 64
) -> Selection:
    """Top-``k`` tokens per query head, unioned within each GQA group, plus the first ``sinks`` and last ``window``.

    Scores of sink/window tokens are ignored for the top-k (they are always included). Among equal scores
    the lower token index is taken first. NaN scores are rejected.

    Parameters
    ----------
    scores : Tensor[B, Hq, T]
    group : int
        Query heads per KV head.

    Returns
    -------
    Selection
        ``indices [B, Hkv, S]`` ascending, padded with -1; ``counts [B, Hkv]``.
    """
    if scores.ndim != 3:
        raise RetrieverError(f"scores must be [B, Hq, T], got {tuple(scores.shape)}")
    b, hq, t = scores.shape
    if not isinstance(group, int) or group < 1 or hq % group != 0:
        raise RetrieverError(f"group={group!r} does not divide {hq} query heads")
    if not isinstance(k, int) or k < 0:
        raise RetrieverError(f"k must be an int >= 0, got {k!r}")
    if torch.isnan(scores).any():
        raise RetrieverError("scores contain NaN")
    fixed = fixed_token_mask(t, sinks, window, scores.device)
    head_masks = _topk_mask(scores.float(), ~fixed, k)
    return union_select(head_masks, group, fixed)


def selection_mask(selection: Selection, tokens: int) -> torch.Tensor:
    """Boolean membership ``Tensor[B, Hkv, tokens]`` of a :class:`Selection`."""
    idx = selection.indices
    b, hkv, _ = idx.shape
    mask = torch.zeros(b, hkv, tokens + 1, dtype=torch.bool, device=idx.device)
    safe = torch.where(idx < 0, torch.full_like(idx, tokens), idx)
    mask.scatter_(2, safe, True)
    return mask[..., :tokens]
