"""Selection baselines that run inside :class:`~kvrecall.retrieval_cache.RetrievalCache` (same runtime, same
gather and attention), for side-by-side measurement: exact oracle top-k, StreamingLLM and Quest.

Each is a selector ``(layer, q_pre [B, Hq, D], lo, n_off, k, pos) -> list[list[Tensor]]`` (per batch row, per KV
head, ascending token indices in ``lo .. n_off-1``) passed as ``RetrievalCache(..., selector=...)``. The oracle
and Quest read the full keys from the store (use ``offload="exact"``): they are references, not deployable.
"""

from __future__ import annotations

import math

import torch

from kvrecall.retriever.fast_scoring import topk_union

__all__ = ["oracle_selector", "streaming_selector", "quest_selector", "true_scores", "SELECTORS"]


def true_scores(layer, q_pre: torch.Tensor, lo: int, n_off: int, pos: int) -> torch.Tensor:
    """Exact post-RoPE ``q·k`` of stored tokens ``lo .. n_off-1``: ``[B, Hq, n_off - lo]`` float32."""
    o = layer.owner
    b = q_pre.shape[0]
    idx = torch.arange(lo, n_off).expand(b, o.info.num_kv_heads, n_off - lo)
    keys = layer.store.gather_part("k", idx).float()  # post-RoPE: rotated at their positions when stored
    q = o.rotate(q_pre.float()[:, :, None, :], torch.tensor([pos]))[:, :, 0]
    g = o.info.group_size
    hkv = o.info.num_kv_heads
    return torch.matmul(q.reshape(b, hkv, g, -1), keys.transpose(2, 3)).reshape(b, hkv * g, -1)


def oracle_selector(layer, q_pre, lo, n_off, k, pos):
    """Exact top-k per query head of the true scores, unioned per GQA group."""
    return topk_union(true_scores(layer, q_pre, lo, n_off, pos), layer.owner.info.group_size, k, offset=lo)


def streaming_selector(layer, q_pre, lo, n_off, k, pos):
    """StreamingLLM: the most recent ``group * k`` stored tokens (the whole top-k allowance as extra window)."""
    o = layer.owner
    start = max(lo, n_off - o.info.group_size * k)
    idx = torch.arange(start, n_off)
    return [[idx] * o.info.num_kv_heads for _ in range(q_pre.shape[0])]


def quest_selector(layer, q_pre, lo, n_off, k, pos, page: int = 16):
    """Quest: pages of ``page`` post-RoPE keys bounded by per-channel min/max; the best ``ceil(k / page)`` pages
    per query head, unioned per GQA group."""
    o = layer.owner
    b = q_pre.shape[0]
    n = n_off - lo
    idx = torch.arange(lo, n_off).expand(b, o.info.num_kv_heads, n)
    keys = layer.store.gather_part("k", idx).float()  # [B, Hkv, n, D], post-RoPE
    pad = (-n) % page
    kp = torch.nn.functional.pad(keys, (0, 0, 0, pad))
    n_pages = kp.shape[2] // page
    kp = kp.reshape(b, o.info.num_kv_heads, n_pages, page, -1)
    valid = torch.arange(n_pages * page).reshape(n_pages, page) < n
    lo_b = kp.masked_fill(~valid[None, None, :, :, None], float("inf")).amin(3)
    hi_b = kp.masked_fill(~valid[None, None, :, :, None], float("-inf")).amax(3)
    q = o.rotate(q_pre.float()[:, :, None, :], torch.tensor([pos]))[:, :, 0]  # [B, Hq, D]
    g = o.info.group_size
    qg = q.reshape(b, o.info.num_kv_heads, g, 1, -1)
    bound = torch.maximum(qg * lo_b[:, :, None], qg * hi_b[:, :, None]).sum(-1)  # [B, Hkv, g, pages]
    n_take = min(n_pages, math.ceil(k / page))
    top = bound.topk(n_take, dim=-1).indices  # [B, Hkv, g, n_take]
    out = []
    for bi in range(b):
        row = []
        for h in range(o.info.num_kv_heads):
            pages = torch.unique(top[bi, h])
            tok = (pages[:, None] * page + torch.arange(page)[None]).reshape(-1)
            row.append(tok[tok < n] + lo)
        out.append(row)
    return out


SELECTORS = {"oracle": oracle_selector, "streamingllm": streaming_selector, "quest": quest_selector}
