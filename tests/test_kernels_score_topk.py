"""Triton code scoring + top-k vs the retriever's torch path (kvrecall.retriever is the reference twin)."""

from __future__ import annotations

import pytest
import torch

from kvrecall.kernels.common import KernelDTypeError, KernelIndexError, KernelInputError, KernelShapeError
from kvrecall.kernels.score_topk import (
    lut_scores_reference,
    lut_scores_triton,
    score_topk,
    score_topk_reference,
    select_from_scores_triton,
)
from kvrecall.kernels.testing import relative_error
from kvrecall.retriever.selection import select_from_scores

# (B, Hkv, group, T, D, M, K, k, sinks, window)
CASES = [
    (2, 2, 3, 300, 8, 4, 16, 20, 8, 64),
    (1, 1, 1, 5, 8, 2, 4, 3, 1, 1),  # fewer candidates than k
    (1, 2, 2, 131, 64, 16, 32, 10, 4, 7),  # odd T
    (3, 2, 2, 1, 8, 8, 8, 4, 8, 64),  # a single token (always a sink)
    (1, 2, 4, 97, 8, 4, 256, 0, 2, 3),  # k = 0: sinks + window only
]


def _inputs(case, dtype, seed, integer=False):
    b, hkv, group, t, d, m, k, _, _, _ = case
    g = torch.Generator().manual_seed(seed)
    if integer:  # exactly representable sums: scores bit-identical on both paths, many exact ties
        q = torch.randint(-2, 3, (b, hkv * group, d), generator=g).to(dtype)
        cb = torch.randint(-2, 3, (hkv, m, k, d // m), generator=g).to(dtype)
    else:
        q = torch.randn(b, hkv * group, d, generator=g).to(dtype)
        cb = torch.randn(hkv, m, k, d // m, generator=g).to(dtype)
    codes = torch.randint(0, k, (hkv, t, m), generator=g, dtype=torch.int32)
    return q, cb, codes


def _assert_same_up_to_near_ties(sel, ref, scores, group, k, tol):
    """Selections agree, except for tokens whose score is within ``tol`` of their head's k-th value."""
    b, hkv = ref.counts.shape
    t = scores.shape[-1]
    got, want = sel.mask(t), ref.mask(t)
    diff = got ^ want
    if not diff.any():
        assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.counts, ref.counts)
        return
    s = scores.reshape(b, hkv, group, t)
    kth = s.topk(min(k, t), dim=-1).values[..., -1:]
    near = ((s - kth).abs() <= tol).any(dim=2)
    assert not (diff & ~near).any(), "selections differ beyond rounding ties"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}G{c[2]}T{c[3]}D{c[4]}M{c[5]}K{c[6]}k{c[7]}")
def test_scores_and_selection_match_retriever(case, dtype):
    b, hkv, group, t, d, m, kc, k, sinks, window = case
    q, cb, codes = _inputs(case, dtype, seed=t + m)
    scores = lut_scores_triton(q, cb, codes, group)
    ref_scores = lut_scores_reference(q, cb, codes, group)
    assert scores.dtype == torch.float32 and scores.shape == (b, hkv * group, t)
    assert relative_error(scores, ref_scores) < 1e-6
    sel = score_topk(q, cb, codes, group, k, sinks, window)
    ref = score_topk_reference(q, cb, codes, group, k, sinks, window)
    assert sel.indices.dtype == torch.int64 and sel.counts.dtype == torch.int64
    _assert_same_up_to_near_ties(sel, ref, ref_scores, group, k, tol=1e-5 * float(ref_scores.abs().max()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[3]}k{c[7]}")
def test_integer_inputs_with_ties_select_identically(case):
    """With exact scores the tie rule (lower token index first) must agree bit for bit."""
    b, hkv, group, t, d, m, kc, k, sinks, window = case
    q, cb, codes = _inputs(case, torch.float32, seed=1, integer=True)
    scores = lut_scores_triton(q, cb, codes, group)
    assert torch.equal(scores, lut_scores_reference(q, cb, codes, group))
    sel = score_topk(q, cb, codes, group, k, sinks, window)
    ref = score_topk_reference(q, cb, codes, group, k, sinks, window)
    assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.counts, ref.counts)


def test_select_kernel_on_handmade_ties():
    scores = torch.tensor([[[5.0, 1.0, 3.0, 3.0, 3.0, 0.0, 3.0, 9.0]]])
    for k in range(0, 7):
        for sinks, window in ((0, 0), (1, 1), (2, 0), (0, 3)):
            sel = select_from_scores_triton(scores, 1, k, sinks, window)
            ref = select_from_scores(scores, 1, k, sinks, window)
            assert torch.equal(sel.indices, ref.indices), (k, sinks, window)
            assert torch.equal(sel.counts, ref.counts)


def test_selection_format():
    case = CASES[0]
    q, cb, codes = _inputs(case, torch.float32, seed=3)
    sel = score_topk(q, cb, codes, case[2], case[7], case[8], case[9])
    width = sel.indices.shape[2]
    assert width == int(sel.counts.max())
    for i in range(sel.counts.shape[0]):
        for j in range(sel.counts.shape[1]):
            c = int(sel.counts[i, j])
            live = sel.indices[i, j, :c]
            assert torch.all(live[1:] > live[:-1])
            assert torch.all(sel.indices[i, j, c:] == -1)


def test_bad_input_raises():
    case = CASES[0]
    q, cb, codes = _inputs(case, torch.float32, seed=0)
    g = case[2]
    with pytest.raises(KernelDTypeError):
        score_topk(q, cb, codes.float(), g, 4)
    with pytest.raises(KernelDTypeError):
        score_topk(q.long(), cb, codes, g, 4)
    with pytest.raises(KernelShapeError):
        score_topk(q, cb, codes, g + 1, 4)  # wrong group
    with pytest.raises(KernelShapeError):
        score_topk(q[..., :6], cb, codes, g, 4)  # D != M * dsub
    with pytest.raises(KernelShapeError):
        score_topk(q, cb, codes[..., :3], g, 4)
    bad = codes.clone()
    bad[0, 5, 1] = case[6]
    with pytest.raises(KernelIndexError):
        score_topk(q, cb, bad, g, 4)
    with pytest.raises(KernelInputError):
        score_topk(q, cb, codes, g, -1)
    with pytest.raises(KernelInputError):
        score_topk(q, cb, codes, g, 4, sinks=-2)
    nan_q = q.clone()
    nan_q[0, 0, 0] = float("nan")
    with pytest.raises(KernelInputError):
        score_topk(nan_q, cb, codes, g, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; the same cases run above on CPU "
                    "under TRITON_INTERPRET=1")
def test_gpu_matches_retriever():
    for case in CASES:
        q, cb, codes = (x.cuda() for x in _inputs(case, torch.float16, seed=2))
        group, k, sinks, window = case[2], case[7], case[8], case[9]
        scores = lut_scores_triton(q, cb, codes, group)
        ref_scores = lut_scores_reference(q, cb, codes, group)
        assert relative_error(scores, ref_scores) < 1e-6
        sel = score_topk(q, cb, codes, group, k, sinks, window)
        ref = score_topk_reference(q, cb, codes, group, k, sinks, window)
        _assert_same_up_to_near_ties(sel, ref, ref_scores, group, k, tol=1e-5 * float(ref_scores.abs().max()))
