"""Gather + dequantize + RoPE + sparse decode attention (GQA, split-K, numerically stable softmax).

For every sequence ``b`` and KV head ``h`` the query heads of that GQA group attend over the tokens of a
selection (``kvrecall.retriever.selection.Selection``: ``indices[b, h, :counts[b, h]]``, ascending, padded with
-1). Keys may be stored pre-RoPE (rotated at their true positions while loaded) and K/V may be KIVI int8/int4
(:mod:`kvrecall.kernels.kivi`, dequantized while loaded). The output equals dense attention restricted to the
same token set; an empty selection gives a zero output row.

Two KV addressing modes:

* ``gathered=False``: ``k``/``v`` hold the whole context ``[B, Hkv, T, D]`` and token ``indices[b, h, s]`` is
  read from row ``indices[b, h, s]``.
* ``gathered=True``: ``k``/``v`` hold only the selected rows ``[B, Hkv, R >= S, D]`` (as delivered by
  :mod:`kvrecall.kernels.fetch`): row ``s`` holds token ``indices[b, h, s]``. Positions for RoPE and the key
  quantization group still come from ``indices``; per-token value scales are indexed by row like the codes,
  per-group key scales by token.

Layout of the launch: one program per ``(b, h, split)``; each walks its share of the selection in blocks of
``BLOCK_S`` tokens with an online softmax in float32 and writes a partial ``(m, l, acc)``; a second kernel merges
the splits (flash-decoding).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvrecall.models import apply_rope
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
from kvrecall.kernels.kivi import KiviRows, dequantize_keys, dequantize_values
from kvrecall.kernels.rope import RopeSpec

__all__ = [
    "sparse_decode_attention",
    "sparse_decode_attention_quantized",
    "sparse_decode_attention_reference",
    "sparse_decode_attention_quantized_reference",
]

LOG2E = 1.4426950408889634
# GPU launch defaults: with 8 warps and 16-token blocks the float32 tl.dot variant compiles for sm_90 with no
# register spills at head_dim 128 and GQA group 4 (python -m kvrecall.kernels.compile_check). Untuned on hardware.
GPU_BLOCK_S = 16
GPU_NUM_WARPS = 8
INDEX_DTYPES = (torch.int64, torch.int32)


# ----------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _load_channels(base, row_off, d, d_mask, row_mask, BITS: tl.constexpr):
    """Load channels ``d`` of rows ``row_off`` (element offsets of each row) as raw codes or values."""
    mask = row_mask[:, None] & d_mask[None, :]
    if BITS == 4:
        byte = tl.load(base + row_off[:, None] + (d // 2)[None, :], mask=mask, other=0).to(tl.int32)
        return ((byte >> ((d % 2) * 4)[None, :]) & 15).to(tl.float32)
    else:
        return tl.load(base + row_off[:, None] + d[None, :], mask=mask, other=0).to(tl.float32)


@triton.jit
def _sparse_decode_kernel(
    Q, K, V, KS, KZ, VS, VZ, IDX, CNT, COS, SIN, INV_FREQ,
    ACC, M, L,
    num_kv_heads, num_q_heads, selection_width, tokens_per_split, num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ksb, stride_ksh, stride_ksg,
    stride_vsb, stride_vsh,
    stride_ib, stride_ih,
    position_offset, attention_scaling, qk_scale_log2,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, BITS: tl.constexpr, KEY_GROUP: tl.constexpr,
    ROPE: tl.constexpr, GATHERED: tl.constexpr, USE_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)

    count = tl.load(CNT + b * num_kv_heads + h).to(tl.int32)
    count = tl.minimum(count, selection_width)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, count)

    g = tl.arange(0, GROUP_PAD)
    g_mask = g < GROUP
    q_heads = h * GROUP + g
    d_lo = tl.arange(0, HALF_PAD)
    lo_mask = d_lo < HALF
    d_hi = d_lo + HALF
    d_all = tl.arange(0, DIM_PAD)
    all_mask = d_all < 2 * HALF

    q_rows = Q + b * stride_qb + q_heads[:, None] * stride_qh
    qm = g_mask[:, None] & lo_mask[None, :]
    q_lo = tl.load(q_rows + d_lo[None, :], mask=qm, other=0.0).to(tl.float32) * qk_scale_log2
    q_hi = tl.load(q_rows + d_hi[None, :], mask=qm, other=0.0).to(tl.float32) * qk_scale_log2

    m_i = tl.full([GROUP_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    idx_base = IDX + b * stride_ib + h * stride_ih
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < end
        tok = tl.load(idx_base + s, mask=s_mask, other=0).to(tl.int64)
        if GATHERED:
            row = s.to(tl.int64)
        else:
            row = tok

        k_lo = _load_channels(k_base, row * stride_kt, d_lo, lo_mask, s_mask, BITS)
        k_hi = _load_channels(k_base, row * stride_kt, d_hi, lo_mask, s_mask, BITS)
        if BITS != 0:
            grp = (tok // KEY_GROUP)[:, None] * stride_ksg
            ks_base = b * stride_ksb + h * stride_ksh + grp
            km = s_mask[:, None] & lo_mask[None, :]
            k_lo = k_lo * tl.load(KS + ks_base + d_lo[None, :], mask=km, other=0.0).to(tl.float32) \
                + tl.load(KZ + ks_base + d_lo[None, :], mask=km, other=0.0).to(tl.float32)
            k_hi = k_hi * tl.load(KS + ks_base + d_hi[None, :], mask=km, other=0.0).to(tl.float32) \
                + tl.load(KZ + ks_base + d_hi[None, :], mask=km, other=0.0).to(tl.float32)
        if ROPE != 0:
            pos = tok + position_offset
            rm = s_mask[:, None] & lo_mask[None, :]
            if ROPE == 1:
                cos = tl.load(COS + pos[:, None] * HALF + d_lo[None, :], mask=rm, other=0.0)
                sin = tl.load(SIN + pos[:, None] * HALF + d_lo[None, :], mask=rm, other=0.0)
            else:
                inv = tl.load(INV_FREQ + d_lo, mask=lo_mask, other=0.0)
                angle = pos.to(tl.float32)[:, None] * inv[None, :]
                cos = tl.cos(angle) * attention_scaling
                sin = tl.sin(angle) * attention_scaling
            k_rot_lo = k_lo * cos - k_hi * sin
            k_hi = k_hi * cos + k_lo * sin
            k_lo = k_rot_lo

        # scores in log2 units: [GROUP_PAD, BLOCK_S]
        if USE_DOT:
            scores = tl.dot(q_lo, tl.trans(k_lo), input_precision="ieee") \
                + tl.dot(q_hi, tl.trans(k_hi), input_precision="ieee")
        else:
            scores = tl.sum(q_lo[:, None, :] * k_lo[None, :, :], axis=2) \
                + tl.sum(q_hi[:, None, :] * k_hi[None, :, :], axis=2)
        scores = tl.where(s_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v = _load_channels(v_base, row * stride_vt, d_all, all_mask, s_mask, BITS)
        if BITS != 0:
            vrow = b * stride_vsb + h * stride_vsh + row
            v = v * tl.load(VS + vrow, mask=s_mask, other=0.0).to(tl.float32)[:, None] \
                + tl.load(VZ + vrow, mask=s_mask, other=0.0).to(tl.float32)[:, None]
        if USE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    part = (b * num_q_heads + q_heads) * num_splits + split
    tl.store(M + part, m_i, mask=g_mask)
    tl.store(L + part, l_i, mask=g_mask)
    tl.store(ACC + part[:, None] * DIM_PAD + d_all[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _combine_splits_kernel(ACC, M, L, OUT, num_splits, stride_ob, stride_oh, num_q_heads,
                           HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // num_q_heads
    hq = pid % num_q_heads
    sp = tl.arange(0, SPLITS_PAD)
    sp_mask = sp < num_splits
    d = tl.arange(0, DIM_PAD)
    m = tl.load(M + pid * num_splits + sp, mask=sp_mask, other=-1.0e30)
    l = tl.load(L + pid * num_splits + sp, mask=sp_mask, other=0.0)
    acc = tl.load(ACC + (pid * num_splits + sp)[:, None] * DIM_PAD + d[None, :], mask=sp_mask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max)
    denom = tl.sum(l * w, axis=0)
    num = tl.sum(acc * w[:, None], axis=0)
    out = tl.where(denom > 0, num / tl.where(denom > 0, denom, 1.0), 0.0)
    tl.store(OUT + b * stride_ob + hq * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d < HEAD_DIM)


# ------------------------------------------------------------------------------------------------ validation
def _check_selection(indices, counts, b: int, hkv: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("indices", indices, dtypes=INDEX_DTYPES, ndim=3, last_dim_contiguous=True)
    check_tensor("indices", indices, shape=(b, hkv, None))
    check_tensor("counts", counts, dtypes=INDEX_DTYPES, shape=(b, hkv))
    return indices, counts.contiguous()


def _check_index_values(indices, counts, rows: int, gathered: bool, rope: RopeSpec | None,
                        key_groups: int | None, key_group_size: int) -> None:
    """One host sync: counts in range and every live index addresses existing rows / tables / scale groups."""
    width = indices.shape[2]
    if counts.numel() == 0:
        return
    bad_count = ((counts < 0) | (counts > width)).any()
    live = torch.arange(width, device=indices.device) < counts.clamp(0, width)[..., None]
    tok = torch.where(live, indices.long(), torch.zeros((), dtype=torch.long, device=indices.device))
    limit = None if gathered else rows
    if rope is not None and rope.max_positions is not None:
        table_limit = rope.max_positions - rope.position_offset
        limit = table_limit if limit is None else min(limit, table_limit)
    if key_groups is not None:
        group_limit = key_groups * key_group_size
        limit = group_limit if limit is None else min(limit, group_limit)
    bad_index = (tok < 0).any()
    if limit is not None:
        bad_index = bad_index | (tok >= limit).any()
    flags = torch.stack((bad_count, bad_index)).tolist()
    if flags[0]:
        raise KernelIndexError(f"counts must lie in [0, {width}] (the selection width)")
    if flags[1]:
        raise KernelIndexError(
            f"a selected index is negative or >= {limit} (rows, RoPE table positions or key scale groups available)"
        )


def _check_query_and_rope(q, hkv: int, d: int, rope: RopeSpec | None, device) -> int:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    b, hq, qd = q.shape
    if qd != d:
        raise KernelShapeError(f"q has head_dim {qd} but the cache has {d}")
    if d % 2:
        raise KernelShapeError(f"head_dim must be even, got {d}")
    if hkv < 1 or hq % hkv:
        raise KernelShapeError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if rope is not None:
        if not isinstance(rope, RopeSpec):
            raise KernelInputError(f"rope must be a RopeSpec or None, got {type(rope).__name__}")
        if rope.half_dim * 2 != d:
            raise KernelShapeError(f"RoPE is for head_dim {rope.half_dim * 2}, cache has {d}")
        check_same_device(q=q, rope=rope.inv_freq if rope.cos_half is None else rope.cos_half)
    return hq // hkv


def _num_splits(batch_heads: int, width: int, block: int, device: torch.device) -> int:
    blocks = max(1, -(-width // block))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, -(-2 * sms // max(batch_heads, 1)))
    else:
        want = 4
    return int(min(blocks, want, 64))


# ------------------------------------------------------------------------------------------------- launcher
def _launch(q, k, v, ks, kz, vs, vz, indices, counts, *, rope, sm_scale, gathered, num_splits, bits, key_group,
            block_s, use_dot):
    b, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    width = indices.shape[2]
    out = torch.empty_like(q)
    if b == 0 or hq == 0:
        return out
    cuda = q.device.type == "cuda"
    use_dot = True if use_dot is None else bool(use_dot)
    if block_s is None:
        block_s = GPU_BLOCK_S if cuda else 32
    block_s = max(16 if use_dot else 1, next_power_of_2(block_s))  # tl.dot needs every dimension >= 16
    pad = (lambda n: max(16, next_power_of_2(n))) if use_dot else next_power_of_2
    if num_splits is None:
        num_splits = _num_splits(b * hkv, width, block_s, q.device)
    num_splits = max(1, int(num_splits))
    tokens_per_split = max(block_s, -(-max(width, 1) // num_splits))
    tokens_per_split = -(-tokens_per_split // block_s) * block_s
    num_splits = max(1, -(-max(width, 1) // tokens_per_split))

    dim_pad = pad(d)
    acc = torch.empty((b, hq, num_splits, dim_pad), dtype=torch.float32, device=q.device)
    m = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    l = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    scale = (1.0 / math.sqrt(d)) if sm_scale is None else float(sm_scale)
    dummy = q  # placeholder pointer for disabled features (never dereferenced)
    rope_mode = 0 if rope is None else (1 if rope.cos_half is not None else 2)
    cos = rope.cos_half if rope_mode == 1 else dummy
    sin = rope.sin_half if rope_mode == 1 else dummy
    inv = rope.inv_freq if rope_mode == 2 else dummy
    quant = bits != 0
    _sparse_decode_kernel[(b * hkv, num_splits)](
        q, k, v, ks if quant else dummy, kz if quant else dummy, vs if quant else dummy, vz if quant else dummy,
        indices, counts, cos, sin, inv,
        acc, m, l,
        hkv, hq, width, tokens_per_split, num_splits,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        ks.stride(0) if quant else 0, ks.stride(1) if quant else 0, ks.stride(2) if quant else 0,
        vs.stride(0) if quant else 0, vs.stride(1) if quant else 0,
        indices.stride(0), indices.stride(1),
        0 if rope is None else rope.position_offset,
        1.0 if rope is None else rope.attention_scaling,
        scale * LOG2E,
        GROUP=group, GROUP_PAD=pad(group),
        HALF=d // 2, HALF_PAD=pad(d // 2), DIM_PAD=dim_pad,
        BLOCK_S=block_s, BITS=bits, KEY_GROUP=max(key_group, 1),
        ROPE=rope_mode, GATHERED=bool(gathered), USE_DOT=use_dot,
        num_warps=GPU_NUM_WARPS if cuda else 4,
    )
    _combine_splits_kernel[(b * hq,)](
        acc, m, l, out, num_splits, out.stride(0), out.stride(1), hq,
        HEAD_DIM=d, DIM_PAD=dim_pad, SPLITS_PAD=next_power_of_2(num_splits),
    )
    return out


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    rope: RopeSpec | None = None,
    sm_scale: float | None = None,
    gathered: bool = False,
    num_splits: int | None = None,
    block_s: int | None = None,
    use_dot: bool | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Decode attention of each query head over its KV head's selected tokens (float K/V).

    Parameters
    ----------
    q : Tensor[B, Hq, D], float32/float16/bfloat16
        Queries, already rotated at their own position.
    k, v : Tensor[B, Hkv, T, D], float32/float16/bfloat16
        Keys (pre-RoPE when ``rope`` is given, else used as they are) and values; any strides with the last
        dimension contiguous. With ``gathered=True``: ``[B, Hkv, R, D]`` with row ``s`` holding token
        ``indices[b, h, s]`` and ``R >= S``.
    indices : Tensor[B, Hkv, S], int64/int32
        Selected token indices; entries at ``s >= counts[b, h]`` are ignored (padding, conventionally -1).
    counts : Tensor[B, Hkv], int64/int32
        Number of live entries per row, ``0 <= counts <= S``.
    rope : RopeSpec, optional
        Rotate keys at positions ``index + rope.position_offset`` while loading them.
    sm_scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    gathered : bool
        See the module docstring.
    num_splits, block_s : int, optional
        Launch tuning (split-K count, tokens per inner block); defaults depend on the device.
    use_dot : bool, optional
        Contract with ``tl.dot`` in exact float32 (``input_precision="ieee"``; default) or with broadcast
        multiply + sum. Both compute the same float32 math.
    validate : bool
        Check index values (one host sync). Shapes, dtypes and devices are always checked.

    Returns
    -------
    Tensor[B, Hq, D], dtype of ``q``
        Zero rows where the selection is empty.
    """
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4, last_dim_contiguous=True)
    b, hkv, rows, d = k.shape
    check_tensor("v", v, dtypes=FLOAT_DTYPES, shape=(b, hkv, rows, d), last_dim_contiguous=True)
    _check_query_and_rope(q, hkv, d, rope, q.device)
    check_tensor("q", q, shape=(b, None, d))
    indices, counts = _check_selection(indices, counts, b, hkv)
    device = check_same_device(q=q, k=k, v=v, indices=indices, counts=counts)
    if gathered and indices.shape[2] > rows:
        raise KernelShapeError(f"gathered rows ({rows}) fewer than the selection width ({indices.shape[2]})")
    check_launchable(_sparse_decode_kernel, device)
    if validate:
        _check_index_values(indices, counts, rows, gathered, rope, None, 1)
    return _launch(q, k, v, None, None, None, None, indices, counts, rope=rope, sm_scale=sm_scale,
                   gathered=gathered, num_splits=num_splits, bits=0, key_group=1, block_s=block_s,
                   use_dot=use_dot)


def sparse_decode_attention_quantized(
    q: torch.Tensor,
    kv: KiviRows,
    indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    rope: RopeSpec | None = None,
    sm_scale: float | None = None,
    gathered: bool = False,
    num_splits: int | None = None,
    block_s: int | None = None,
    use_dot: bool | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """As :func:`sparse_decode_attention`, reading KIVI int8/int4 K/V and dequantizing on the fly.

    With ``gathered=True``, ``kv.k_codes``/``kv.v_codes`` are ``[B, Hkv, R, W]`` selected rows and
    ``kv.v_scale``/``kv.v_zero`` ``[B, Hkv, R]`` their per-token scales, while ``kv.k_scale``/``kv.k_zero`` stay
    the whole context's ``[B, Hkv, NG, D]`` per-group tables (they are small and live on the device).
    """
    if not isinstance(kv, KiviRows):
        raise KernelInputError(f"kv must be a KiviRows, got {type(kv).__name__}")
    kv.validate(gathered=gathered)
    b, hkv, rows, d = kv.shape
    _check_query_and_rope(q, hkv, d, rope, q.device)
    check_tensor("q", q, shape=(b, None, d))
    indices, counts = _check_selection(indices, counts, b, hkv)
    device = check_same_device(q=q, k_codes=kv.k_codes, v_codes=kv.v_codes, k_scale=kv.k_scale,
                               k_zero=kv.k_zero, v_scale=kv.v_scale, v_zero=kv.v_zero,
                               indices=indices, counts=counts)
    if gathered and indices.shape[2] > rows:
        raise KernelShapeError(f"gathered rows ({rows}) fewer than the selection width ({indices.shape[2]})")
    check_launchable(_sparse_decode_kernel, device)
    if validate:
        _check_index_values(indices, counts, rows, gathered, rope, kv.k_scale.shape[2], kv.group_size)
    return _launch(q, kv.k_codes, kv.v_codes, kv.k_scale, kv.k_zero, kv.v_scale, kv.v_zero, indices, counts,
                   rope=rope, sm_scale=sm_scale, gathered=gathered, num_splits=num_splits, bits=kv.bits,
                   key_group=kv.group_size, block_s=block_s, use_dot=use_dot)


# ------------------------------------------------------------------------------------------------ references
def sparse_decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    rope: RopeSpec | None = None,
    sm_scale: float | None = None,
    gathered: bool = False,
) -> torch.Tensor:
    """Plain torch twin of :func:`sparse_decode_attention` (float32 math, same contract)."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    width = indices.shape[2]
    live = torch.arange(width, device=q.device) < counts.to(q.device)[..., None]  # [B, Hkv, S]
    tok = torch.where(live, indices.long(), torch.zeros((), dtype=torch.long, device=q.device))
    rows = torch.arange(width, device=q.device).expand_as(tok) if gathered else tok
    gather = rows[..., None].expand(b, hkv, width, d)
    keys = torch.gather(k.float(), 2, gather)
    values = torch.gather(v.float(), 2, gather)
    if rope is not None:
        cos, sin = rope.cos_sin(tok)
        keys = apply_rope(keys, cos, sin)
    scale = (1.0 / math.sqrt(d)) if sm_scale is None else float(sm_scale)
    qg = q.float().reshape(b, hkv, group, d)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, keys) * scale
    scores = scores.masked_fill(~live[:, :, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty selection: all -inf -> NaN -> 0
    out = torch.einsum("bhgs,bhsd->bhgd", weights, values)
    return out.reshape(b, hq, d).to(q.dtype)


def sparse_decode_attention_quantized_reference(
    q: torch.Tensor,
    kv: KiviRows,
    indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    rope: RopeSpec | None = None,
    sm_scale: float | None = None,
    gathered: bool = False,
) -> torch.Tensor:
    """Plain torch twin of :func:`sparse_decode_attention_quantized` (dequantize, then attend)."""
    if not gathered:
        keys, values = dequantize_keys(kv), dequantize_values(kv)
    else:
        width = indices.shape[2]
        live = torch.arange(width, device=q.device) < counts.to(q.device)[..., None]
        tok = torch.where(live, indices.long(), torch.zeros((), dtype=torch.long, device=q.device))
        from kvrecall.kernels.kivi import unpack_int4

        codes_k = (unpack_int4(kv.k_codes) if kv.bits == 4 else kv.k_codes)[:, :, :width].float()
        grp = (tok // kv.group_size)[..., None].expand(*tok.shape, kv.head_dim)
        keys = codes_k * torch.gather(kv.k_scale.float(), 2, grp) + torch.gather(kv.k_zero.float(), 2, grp)
        codes_v = (unpack_int4(kv.v_codes) if kv.bits == 4 else kv.v_codes)[:, :, :width].float()
        values = codes_v * kv.v_scale.float()[:, :, :width, None] + kv.v_zero.float()[:, :, :width, None]
    return sparse_decode_attention_reference(q, keys, values, indices, counts, rope=rope, sm_scale=sm_scale,
                                             gathered=gathered)
