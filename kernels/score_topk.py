"""Code scoring + top-k selection: the Triton twin of the retriever's torch path.

Three steps, matching :func:`kvrecall.retriever.scoring.lut_scores` followed by
:func:`kvrecall.retriever.selection.select_from_scores`:

1. ``_lut_kernel``: ``lut[b, h, m, c] = <q[b, h, m-th sub-vector], codebooks[h // group, m, c]>`` (float32).
2. ``_gather_scores_kernel``: ``scores[b, h, t] = sum_m lut[b, h, m, codes[h // group, t, m]]`` (float32,
   summed over ``m`` in order).
3. The k-th largest candidate score per query head comes from ``torch.topk`` (sinks and window excluded), then
   ``_select_kernel`` (one program per ``(b, kv head)``) walks the tokens once: a token is taken for a query head
   if its score beats that head's k-th value, or equals it and is among the first ``k - #greater`` such tokens
   (ties go to the lower token index, the retriever's rule); the union over the GQA group plus the first
   ``sinks`` and last ``window`` tokens is compacted in ascending order with a running prefix sum.

The result is a :class:`kvrecall.retriever.selection.Selection` (``indices [B, Hkv, S]`` ascending padded with
-1, ``S`` = the largest count; ``counts [B, Hkv]``). Scores may differ from the torch path in the last bits
(different summation order inside the LUT), so selections agree exactly except where two scores are within
rounding of each head's k-th value; with exactly representable inputs they agree bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrecall.kernels.common import (
    FLOAT_DTYPES,
    KernelIndexError,
    KernelInputError,
    KernelShapeError,
    check_launchable,
    check_same_device,
    check_tensor,
    next_power_of_2,
)

__all__ = ["lut_scores_triton", "score_topk", "score_topk_reference", "lut_scores_reference"]

CODE_DTYPES = (torch.int32, torch.int64, torch.uint8, torch.int16)


# ----------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _lut_kernel(Q, CB, LUT, num_q_heads, num_codes,
                stride_qb, stride_qh, stride_cbh, stride_cbm, stride_cbk,
                GROUP: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
                DSUB: tl.constexpr, DSUB_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // num_q_heads
    hq = pid % num_q_heads
    hkv = hq // GROUP
    m = tl.arange(0, M_PAD)
    j = tl.arange(0, DSUB_PAD)
    c = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mm = m < M
    jm = j < DSUB
    cm = c < num_codes
    q = tl.load(Q + b * stride_qb + hq * stride_qh + m[:, None] * DSUB + j[None, :],
                mask=mm[:, None] & jm[None, :], other=0.0).to(tl.float32)
    cb_ptr = CB + hkv * stride_cbh + m[:, None, None] * stride_cbm + c[None, :, None] * stride_cbk + j[None, None, :]
    cb_mask = mm[:, None, None] & cm[None, :, None] & jm[None, None, :]
    cb = tl.load(cb_ptr, mask=cb_mask, other=0.0).to(tl.float32)
    lut = tl.sum(q[:, None, :] * cb, axis=2)  # [M_PAD, BLOCK_K]
    tl.store(LUT + (pid * M + m[:, None]) * num_codes + c[None, :], lut, mask=mm[:, None] & cm[None, :])


@triton.jit
def _gather_scores_kernel(LUT, CODES, SCORES, num_q_heads, num_tokens, num_codes,
                          stride_ch, stride_ct,
                          GROUP: tl.constexpr, M: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    hq = pid % num_q_heads
    hkv = hq // GROUP
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < num_tokens
    code_row = CODES + hkv * stride_ch + t.to(tl.int64) * stride_ct
    lut_row = LUT + pid * M * num_codes
    acc = tl.zeros([BLOCK_T], tl.float32)
    for m in tl.static_range(M):  # in order over m, like the torch path
        code = tl.load(code_row + m, mask=tm, other=0).to(tl.int64)
        acc += tl.load(lut_row + m * num_codes + code, mask=tm, other=0.0)
    tl.store(SCORES + pid * num_tokens + t, acc, mask=tm)


@triton.jit
def _select_kernel(SCORES, KTH, NEED, OUT_IDX, OUT_CNT, num_kv_heads, num_tokens, out_width, sinks, window_start,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // num_kv_heads
    hkv = pid % num_kv_heads
    g = tl.arange(0, GROUP_PAD)
    gm = g < GROUP
    head = b * num_kv_heads * GROUP + hkv * GROUP + g  # flat (b, hq) row of each query head of the group
    kth = tl.load(KTH + head, mask=gm, other=0.0)
    need = tl.load(NEED + head, mask=gm, other=0)  # equal-to-kth tokens each head still takes
    seen_equal = tl.zeros([GROUP_PAD], tl.int32)
    written = tl.full([], 0, tl.int32)
    for t0 in range(0, num_tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < num_tokens
        fixed = (t < sinks) | (t >= window_start)
        cand = tm & (fixed == 0)
        s = tl.load(SCORES + head[:, None] * num_tokens + t[None, :], mask=gm[:, None] & tm[None, :], other=0.0)
        live = gm[:, None] & cand[None, :]
        greater = live & (s > kth[:, None])
        equal = live & (s == kth[:, None])
        rank = seen_equal[:, None] + tl.cumsum(equal.to(tl.int32), axis=1)
        take = greater | (equal & (rank <= need[:, None]))
        seen_equal += tl.sum(equal.to(tl.int32), axis=1)
        flag = ((tl.max(take.to(tl.int32), axis=0) > 0) | fixed) & tm
        flag_i = flag.to(tl.int32)
        slot = written + tl.cumsum(flag_i, axis=0) - 1
        tl.store(OUT_IDX + pid * out_width + slot, t.to(tl.int64), mask=flag)
        written += tl.sum(flag_i, axis=0)
    tl.store(OUT_CNT + pid, written.to(tl.int64))


# ------------------------------------------------------------------------------------------------ host side
def _check_scoring_inputs(q, codebooks, codes, group: int, validate: bool):
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("codebooks", codebooks, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("codes", codes, dtypes=CODE_DTYPES, ndim=3)
    b, hq, d = q.shape
    hkv, m, k, dsub = codebooks.shape
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or hq != hkv * group:
        raise KernelShapeError(f"group={group!r} does not map {hq} query heads onto {hkv} KV heads")
    if m * dsub != d:
        raise KernelShapeError(f"codebooks split D={m * dsub} ({m} x {dsub}) but q has D={d}")
    if codes.shape[0] != hkv or codes.shape[2] != m:
        raise KernelShapeError(f"codes {tuple(codes.shape)} must be [Hkv={hkv}, T, M={m}]")
    if k < 1:
        raise KernelShapeError("codebooks need at least one centroid")
    device = check_same_device(q=q, codebooks=codebooks, codes=codes)
    check_launchable(_lut_kernel, device)
    if validate and codes.numel():
        lo, hi = torch.aminmax(codes)
        if int(lo) < 0 or int(hi) >= k:
            raise KernelIndexError(f"codes must lie in [0, {k}), found [{int(lo)}, {int(hi)}]")
    return q.contiguous(), codebooks.contiguous(), codes.contiguous()


def lut_scores_triton(
    q: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, group: int, *, validate: bool = True
) -> torch.Tensor:
    """Approximate scores of every coded key for every query head (Triton twin of ``retriever.lut_scores``).

    Parameters
    ----------
    q : Tensor[B, Hq, D], float32/float16/bfloat16
    codebooks : Tensor[Hkv, M, K, D // M], float
    codes : Tensor[Hkv, T, M], int32/int64/uint8/int16, values in ``[0, K)``
    group : int
        Query heads per KV head.
    validate : bool
        Check code values (one host sync).

    Returns
    -------
    Tensor[B, Hq, T], float32
    """
    q, codebooks, codes = _check_scoring_inputs(q, codebooks, codes, group, validate)
    b, hq, d = q.shape
    hkv, m, k, dsub = codebooks.shape
    t = codes.shape[1]
    scores = torch.empty((b, hq, t), dtype=torch.float32, device=q.device)
    if b == 0 or hq == 0 or t == 0:
        return scores
    lut = torch.empty((b * hq, m, k), dtype=torch.float32, device=q.device)
    block_k = min(next_power_of_2(k), max(1, 4096 // (next_power_of_2(m) * next_power_of_2(dsub))))
    _lut_kernel[(b * hq, triton.cdiv(k, block_k))](
        q, codebooks, lut, hq, k,
        q.stride(0), q.stride(1), codebooks.stride(0), codebooks.stride(1), codebooks.stride(2),
        GROUP=group, M=m, M_PAD=next_power_of_2(m), DSUB=dsub, DSUB_PAD=next_power_of_2(dsub), BLOCK_K=block_k,
    )
    block_t = 1024 if q.device.type == "cuda" else 256
    _gather_scores_kernel[(b * hq, triton.cdiv(t, block_t))](
        lut, codes, scores, hq, t, k, codes.stride(0), codes.stride(1),
        GROUP=group, M=m, BLOCK_T=block_t,
    )
    return scores


def _check_selection_args(k: int, sinks: int, window: int) -> None:
    for name, value in (("k", k), ("sinks", sinks), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KernelInputError(f"{name} must be an int >= 0, got {value!r}")


def select_from_scores_triton(scores: torch.Tensor, group: int, k: int, sinks: int = 8, window: int = 64):
    """Top-``k`` per query head, union per GQA group, plus sinks and window (Triton twin of
    ``retriever.select_from_scores``; same tie rule).

    Parameters
    ----------
    scores : Tensor[B, Hq, T], float32

    Returns
    -------
    kvrecall.retriever.selection.Selection
    """
    from kvrecall.retriever.selection import Selection

    check_tensor("scores", scores, dtypes=(torch.float32,), ndim=3)
    _check_selection_args(k, sinks, window)
    b, hq, t = scores.shape
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or hq % group:
        raise KernelShapeError(f"group={group!r} does not divide {hq} query heads")
    check_launchable(_select_kernel, scores.device)
    scores = scores.contiguous()
    if torch.isnan(scores).any():
        raise KernelInputError("scores contain NaN (non-finite queries or codebooks?)")
    hkv = hq // group
    device = scores.device
    window_start = t - window
    fixed = (torch.arange(t, device=device) < sinks) | (torch.arange(t, device=device) >= window_start)
    n_cand = t - int(fixed.sum())
    k_eff = min(k, n_cand)
    flat = scores.reshape(b * hq, t)
    if k_eff > 0:
        masked = flat.masked_fill(fixed, float("-inf"))
        kth = masked.topk(k_eff, dim=-1).values[:, -1].contiguous()
        greater = ((flat > kth[:, None]) & ~fixed).sum(-1)
        need = (k_eff - greater).to(torch.int32).contiguous()
    else:  # nothing to pick: no score beats +inf, and no equal token is taken
        kth = torch.full((b * hq,), float("inf"), device=device)
        need = torch.zeros((b * hq,), dtype=torch.int32, device=device)
    out_width = max(1, min(t, (t - n_cand) + group * k_eff))
    out_idx = torch.full((b * hkv, out_width), -1, dtype=torch.int64, device=device)
    out_cnt = torch.zeros((b * hkv,), dtype=torch.int64, device=device)
    if b * hkv and t:
        block_t = 1024 if device.type == "cuda" else 128
        _select_kernel[(b * hkv,)](
            flat, kth, need, out_idx, out_cnt, hkv, t, out_width, sinks, window_start,
            GROUP=group, GROUP_PAD=next_power_of_2(group), BLOCK_T=block_t,
        )
    counts = out_cnt.reshape(b, hkv)
    width = int(counts.max()) if counts.numel() else 0
    indices = out_idx[:, :width].reshape(b, hkv, width).contiguous()
    return Selection(indices=indices, counts=counts)


def score_topk(
    q: torch.Tensor,
    codebooks: torch.Tensor,
    codes: torch.Tensor,
    group: int,
    k: int,
    sinks: int = 8,
    window: int = 64,
    *,
    validate: bool = True,
):
    """LUT scoring + top-k + GQA union + sinks + window in Triton.

    Parameters
    ----------
    q : Tensor[B, Hq, D]
    codebooks : Tensor[Hkv, M, K, D // M]
    codes : Tensor[Hkv, T, M], integer
    group : int
        Query heads per KV head.
    k : int
        Tokens per query head chosen by score (sinks and window excluded, then added).
    sinks, window : int
        First ``sinks`` and last ``window`` tokens are always selected.
    validate : bool
        Check code values (one host sync).

    Returns
    -------
    kvrecall.retriever.selection.Selection
        ``indices [B, Hkv, S]`` int64 ascending padded with -1, ``counts [B, Hkv]`` int64.
    """
    _check_selection_args(k, sinks, window)
    scores = lut_scores_triton(q, codebooks, codes, group, validate=validate)
    return select_from_scores_triton(scores, group, k, sinks, window)


def lut_scores_reference(q: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, group: int) -> torch.Tensor:
    """The retriever's torch scoring (:func:`kvrecall.retriever.scoring.lut_scores`)."""
    from kvrecall.retriever.scoring import lut_scores

    return lut_scores(q, codebooks, codes, group)


def score_topk_reference(q, codebooks, codes, group: int, k: int, sinks: int = 8, window: int = 64):
    """The retriever's torch path: ``select_from_scores(lut_scores(...))`` (the reference twin)."""
    from kvrecall.retriever.selection import select_from_scores

    return select_from_scores(lut_scores_reference(q, codebooks, codes, group), group, k, sinks, window)
