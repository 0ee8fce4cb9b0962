"""Attention over selected tokens (torch) and teacher-forced sparse decoding of a Hugging Face model.

:func:`sparse_decode_logits` registers an attention function with transformers' ``AttentionInterface``; while
active, every layer's decode step attends only to the tokens its selection method picks (per KV head; the query
heads of a GQA group share the union). With a selection that holds every token it equals dense attention.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Callable

import torch

from kvrecall.retriever.errors import RetrieverError
from kvrecall.models import rope_parameters
from kvrecall.retriever.rope_window import unrotate
from kvrecall.retriever.selection import Selection, resolve_budget, selection_mask

__all__ = ["sparse_attention", "sparse_attention_mode", "attention_implementation", "sparse_decode_logits",
           "ATTENTION_NAME"]

ATTENTION_NAME = "kvrecall_sparse"
_ACTIVE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("kvrecall_sparse_selector", default=None)


def sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: Selection | None, scaling: float
) -> torch.Tensor:
    """Softmax attention restricted to selected tokens.

    Parameters
    ----------
    query : Tensor[B, Hq, Q, D] (post-RoPE)
    key, value : Tensor[B, Hkv, T, D] (post-RoPE keys)
    selection : Selection with ``indices [B, Hkv, S]`` over the ``T`` tokens, or None for all tokens.
        Every query position sees the same selected set (decode: ``Q == 1``).

    Returns
    -------
    Tensor[B, Hq, Q, D]
    """
    b, hq, _, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    if hq % hkv:
        raise RetrieverError(f"{hq} query heads do not group onto {hkv} KV heads")
    group = hq // hkv
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    logits = torch.matmul(query, k.transpose(2, 3)) * scaling
    if selection is not None:
        keep = selection_mask(selection, t).repeat_interleave(group, dim=1)[:, :, None, :]  # [B, Hq, 1, T]
        logits = logits.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, v)


def _attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    selector = _ACTIVE.get()
    if selector is None:
        raise RetrieverError(f"attention implementation {ATTENTION_NAME!r} used outside sparse_attention_mode")
    if query.shape[2] != 1:
        raise RetrieverError(f"sparse attention runs decode steps one token at a time, got {query.shape[2]} queries")
    selection = selector(module.layer_idx, query, key)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = sparse_attention(query, key, value, selection, scale)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _attention_function)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def attention_implementation(model, name: str):
    """Within the block ``model`` runs attention implementation ``name`` (``model.set_attn_implementation``);
    the previous implementation is restored afterwards, also on error."""
    old = model.config._attn_implementation  # reading is public enough; writing goes through the model's API
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@contextmanager
def sparse_attention_mode(model, selector: Callable[[int, torch.Tensor, torch.Tensor], Selection | None]):
    """Within the block, ``model``'s attention calls ``selector(layer, query [1,Hq,1,D], key [1,Hkv,T,D])``.

    ``query`` and ``key`` are post-RoPE, ``key`` includes the current token. The selector returns a
    :class:`Selection` over the ``T`` tokens (or None: attend to all).
    """
    _register()
    with attention_implementation(model, ATTENTION_NAME):
        token = _ACTIVE.set(selector)
        try:
            yield
        finally:
            _ACTIVE.reset(token)


@torch.no_grad()
def sparse_decode_logits(
    model, kv: torch.Tensor, cont_ids: torch.Tensor, method, budget: int | float, sinks: int = 8, window: int = 64
) -> torch.Tensor:
    """Teacher-forced decoding of ``cont_ids`` after a context given as KV, attending only to selected tokens.

    Parameters
    ----------
    kv : Tensor[layers, 2, kv_heads, T0, head_dim] — the context's KV, keys pre-RoPE (dense, exact).
    cont_ids : Tensor[n] — tokens fed one per step at positions ``T0 .. T0 + n - 1``.
    method : a selection method (see :mod:`kvrecall.retriever.methods`); it is reset with the context keys
        and new keys are appended as they are generated.
    budget : top-k per query head (int) or fraction of the current length (float); sinks and window on top.

    Returns
    -------
    Tensor[n, vocab], float32 — logits at each continuation position.
    """
    from kvrecall.models import cache_kwargs, kv_to_cache

    inv_freq, scaling = rope_parameters(model)
    method.reset(kv[:, 0].float())
    cache = kv_to_cache(model, kv)
    t0 = kv.shape[3]
    device = next(model.parameters()).device

    def selector(layer: int, query: torch.Tensor, key: torch.Tensor) -> Selection:
        t = key.shape[2]
        have = method.length(layer)
        if t > have:
            new = unrotate(key[0, :, have:], inv_freq, torch.arange(have, t), scaling)
            method.append(layer, new)
        q_pre = unrotate(query[0, :, 0:1], inv_freq, torch.tensor([t - 1]), scaling)[:, 0]  # [Hq, D]
        return method.select(layer, q_pre[None], resolve_budget(budget, t), sinks, window)

    logits = []
    with sparse_attention_mode(model, selector):
        for i, tok in enumerate(cont_ids.tolist()):
            pos = torch.tensor([[t0 + i]], device=device)
            out = model(torch.tensor([[tok]], device=device), position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
            logits.append(out.logits[0, -1].float())
    return torch.stack(logits)
