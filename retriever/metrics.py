"""Retrieval quality metrics for one decode query: attention-mass recall, top-k recall, output error, KL."""

from __future__ import annotations

import torch

from kvrecall.retriever.errors import RetrieverError
from kvrecall.retriever.selection import Selection, fixed_token_mask, selection_mask

__all__ = ["selection_metrics", "kl_and_ppl"]


def selection_metrics(
    true_scores: torch.Tensor,
    values: torch.Tensor,
    selection: Selection,
    oracle: Selection,
    k: int,
    group: int,
    scaling: float,
    sinks: int,
    window: int,
) -> dict[str, torch.Tensor]:
    """Per-query-head metrics of one decode query.

    Parameters
    ----------
    true_scores : Tensor[Hq, T] — exact post-RoPE ``q·k`` (unscaled) for this query over its context.
    values : Tensor[Hkv, T, D]
    selection, oracle : Selection with B = 1 over the T tokens (method and exact top-k at the same budget).
    k : top-k per head used for both.

    Returns
    -------
    dict of Tensor[Hq]: ``mass`` (softmax weight inside the selection), ``oracle_mass``, ``topk_recall``
    (share of the head's exact top-k non-fixed tokens that the selection holds), ``attn_rel_err``
    (relative L2 error of the attention output over the selection vs over all tokens).
    """
    hq, t = true_scores.shape
    if values.shape[1] != t:
        raise RetrieverError(f"values hold {values.shape[1]} tokens, scores {t}")
    probs = torch.softmax(true_scores.double() * scaling, dim=-1)  # [Hq, T]
    head_to_kv = torch.arange(hq) // group
    sel = selection_mask(selection, t)[0][head_to_kv]  # [Hq, T]
    orc = selection_mask(oracle, t)[0][head_to_kv]
    mass = (probs * sel).sum(-1)
    oracle_mass = (probs * orc).sum(-1)
    fixed = fixed_token_mask(t, sinks, window)
    kk = min(k, int((~fixed).sum()))
    if kk > 0:
        cand_scores = true_scores.masked_fill(fixed, float("-inf"))
        top = cand_scores.topk(kk, dim=-1).indices  # [Hq, kk]
        topk_recall = sel.gather(1, top).double().mean(-1)
    else:
        topk_recall = torch.ones(hq, dtype=torch.float64)
    v = values.double()[head_to_kv]  # [Hq, T, D]
    full = torch.einsum("ht,htd->hd", probs, v)
    p_sel = probs * sel
    p_sel = p_sel / p_sel.sum(-1, keepdim=True).clamp_min(1e-300)
    part = torch.einsum("ht,htd->hd", p_sel, v)
    rel = (part - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-30)
    return {"mass": mass, "oracle_mass": oracle_mass, "topk_recall": topk_recall, "attn_rel_err": rel}


def kl_and_ppl(dense_logits: torch.Tensor, sparse_logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
    """Mean next-token KL(dense || sparse) and perplexities.

    Parameters
    ----------
    dense_logits, sparse_logits : Tensor[n, vocab]
    targets : Tensor[n] — next tokens (use -1 where there is none; they are left out of perplexity).

    Returns
    -------
    (kl, ppl_dense, ppl_sparse)
    """
    if dense_logits.shape != sparse_logits.shape or dense_logits.shape[0] != targets.shape[0]:
        raise RetrieverError("logits and targets disagree in shape")
    lp = torch.log_softmax(dense_logits.double(), -1)
    lq = torch.log_softmax(sparse_logits.double(), -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    ok = targets >= 0
    if not ok.any():
        return kl, float("nan"), float("nan")
    tgt = targets[ok].long()
    nll_p = -lp[ok].gather(1, tgt[:, None]).mean()
    nll_q = -lq[ok].gather(1, tgt[:, None]).mean()
    return kl, float(nll_p.exp()), float(nll_q.exp())
