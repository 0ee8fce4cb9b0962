"""Exact ground truth for LUT scoring, selection and the FAISS path (faiss contrib style)."""

from __future__ import annotations

import pytest
import torch

from kvrecall.retriever import KeyIndex, RetrieverError, RetrieverProfile, RetrieverSettings, lut_scores, select_from_scores
from kvrecall.retriever.codebooks import decode, encode, pack_faiss_codes, train_codebook
from kvrecall.models import rope_tables
from kvrecall.retriever.rope_window import rotate, windowed_query
from kvrecall.retriever.scoring import exact_scores
from kvrecall.retriever.selection import resolve_budget, selection_mask

L, HQ, HKV, D = 2, 4, 2, 8
GROUP = HQ // HKV
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def every_key_profile(keys: torch.Tensor, rope_mode: str, bits: int = 8) -> RetrieverProfile:
    """Identity transforms and a codebook whose first T centroids are the keys themselves (rest far away)."""
    n_layers, hkv, t, d = keys.shape
    k = 1 << bits
    books = torch.full((n_layers, hkv, 1, k, d), 1e3) + torch.arange(k, dtype=torch.float32)[:, None]
    books[:, :, 0, :t] = keys
    eye = torch.eye(d).expand(n_layers, hkv, d, d).contiguous()
    settings = RetrieverSettings(model_id="test", model_name="test", num_layers=n_layers, num_heads=hkv * GROUP,
                                 num_kv_heads=hkv, head_dim=d, kind="vq", m=1, bits=bits, rope_mode=rope_mode,
                                 window_distance=300, query_aware=True)
    return RetrieverProfile(settings, eye.clone(), eye.clone(), books, INV_FREQ.clone())


def reference_select(scores, group, k, sinks, window):
    """Plain-python oracle selection: per head sort by (-score, index), take k, union, add fixed."""
    b, hq, t = scores.shape
    out = []
    for bi in range(b):
        rows = []
        for kv in range(hq // group):
            chosen = {i for i in range(t) if i < sinks or i >= t - window}
            for h in range(kv * group, (kv + 1) * group):
                cand = [i for i in range(t) if not (i < sinks or i >= t - window)]
                cand.sort(key=lambda i: (-float(scores[bi, h, i]), i))
                chosen.update(cand[:k])
            rows.append(sorted(chosen))
        out.append(rows)
    return out


def test_lut_scores_equal_decoded_dot_products():
    torch.manual_seed(0)
    for m, bits, dtype in [(1, 6, torch.int16), (2, 4, torch.uint8), (4, 3, torch.int32), (8, 2, torch.int64)]:
        books = torch.randn(HKV, m, 1 << bits, D // m)
        codes = torch.randint(0, 1 << bits, (HKV, 50, m)).to(dtype)
        q = torch.randn(3, HQ, D)
        keys = torch.stack([decode(codes[h], books[h]) for h in range(HKV)])
        torch.testing.assert_close(lut_scores(q, books, codes, GROUP), exact_scores(q, keys, GROUP), rtol=1e-5, atol=1e-5)


def test_lut_scores_rejects_bad_shapes():
    books = torch.randn(HKV, 2, 16, D // 2)
    codes = torch.zeros(HKV, 10, 2, dtype=torch.int64)
    with pytest.raises(RetrieverError):
        lut_scores(torch.randn(1, HQ, D), books, codes, 3)
    with pytest.raises(RetrieverError):
        lut_scores(torch.randn(1, HQ, D + 2), books, codes, GROUP)
    with pytest.raises(RetrieverError):
        lut_scores(torch.randn(1, HQ, D), books, codes.float(), GROUP)


@pytest.mark.parametrize("rope_mode", ["windowed", "absolute", "positional"])
def test_every_key_codebook_gives_exact_scores_and_oracle_selection(rope_mode):
    torch.manual_seed(1)
    t = 200
    keys = torch.randn(L, HKV, t, D)
    coded = rotate(keys, INV_FREQ, torch.arange(t)) if rope_mode == "absolute" else keys  # absolute codes post-RoPE
    index = KeyIndex(every_key_profile(coded, rope_mode))
    index.append_all(keys)
    assert torch.equal(index.codes(0)[..., 0].long(), torch.arange(t).expand(HKV, t))
    q = torch.randn(1, HQ, D)
    pos = torch.tensor([t - 1])
    if rope_mode == "windowed":
        exact = exact_scores(windowed_query(q, INV_FREQ, 300), keys[1], GROUP)
    else:
        exact = exact_scores(rotate(q.transpose(0, 1), INV_FREQ, pos).transpose(0, 1),
                             rotate(keys[1], INV_FREQ, torch.arange(t)), GROUP)
    torch.testing.assert_close(index.scores(1, q, positions=pos), exact, rtol=1e-4, atol=1e-4)
    for budget in (5, 0.1):
        sel = index.select(1, q, budget, sinks=4, window=16, positions=pos)
        ref = select_from_scores(exact, GROUP, resolve_budget(budget, t), 4, 16)
        assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.counts, ref.counts)
        if rope_mode != "positional":
            faiss_sel = index.select(1, q, budget, sinks=4, window=16, positions=pos, backend="faiss")
            assert torch.equal(faiss_sel.indices, ref.indices)
        else:
            with pytest.raises(RetrieverError):
                index.select(1, q, budget, positions=pos, backend="faiss")


def test_select_from_scores_matches_reference_with_ties():
    gen = torch.Generator().manual_seed(2)
    for trial in range(20):
        t = int(torch.randint(1, 40, (1,), generator=gen))
        scores = torch.randint(0, 5, (2, HQ, t), generator=gen).float()  # many ties
        k, sinks, window = int(torch.randint(0, 12, (1,), generator=gen)), trial % 4, trial % 7
        sel = select_from_scores(scores, GROUP, k, sinks, window)
        ref = reference_select(scores, GROUP, k, sinks, window)
        for b in range(2):
            for h in range(HKV):
                n = int(sel.counts[b, h])
                assert sel.indices[b, h, :n].tolist() == ref[b][h]
                assert (sel.indices[b, h, n:] == -1).all()


def test_sink_and_window_scores_are_ignored():
    scores = torch.zeros(1, HQ, 30)
    scores[..., :2] = 100.0  # sinks, always in, must not use up the top-k
    scores[..., -3:] = 100.0
    scores[..., 10] = 5.0
    sel = select_from_scores(scores, GROUP, 1, sinks=2, window=3)
    assert sel.indices[0, 0].tolist() == [0, 1, 10, 27, 28, 29]


def test_selection_rejects_bad_input():
    with pytest.raises(RetrieverError):
        select_from_scores(torch.tensor([[[float("nan"), 1.0]]]), 1, 1)
    with pytest.raises(RetrieverError):
        select_from_scores(torch.zeros(1, 3, 5), 2, 1)
    for bad in (-1, 0.0, 1.5, float("nan"), True, "3"):
        with pytest.raises(RetrieverError):
            resolve_budget(bad, 100)
    assert resolve_budget(0.03, 1000) == 30 and resolve_budget(7, 1000) == 7


def test_selection_mask_round_trip():
    scores = torch.randn(2, HQ, 50)
    sel = select_from_scores(scores, GROUP, 6, 2, 4)
    mask = selection_mask(sel, 50)
    assert torch.equal(mask.sum(-1), sel.counts)


def test_faiss_packing_matches_faiss_encoder():
    import faiss
    import numpy as np

    x = torch.randn(3000, D)
    for m, bits in [(1, 10), (2, 8), (4, 3)]:
        books = train_codebook(x, m, bits, niter=2)
        pq = faiss.ProductQuantizer(D, m, bits)
        faiss.copy_array_to_vector(books.numpy().ravel(), pq.centroids)
        ours = pack_faiss_codes(encode(x[:200], books), bits)
        assert (ours == pq.compute_codes(np.ascontiguousarray(x[:200].numpy()))).mean() > 0.99


def test_append_in_pieces_equals_one_append():
    torch.manual_seed(3)
    keys = torch.randn(L, HKV, 120, D)
    prof = every_key_profile(keys, "windowed")
    whole, pieces = KeyIndex(prof), KeyIndex(prof)
    whole.append_all(keys)
    for start in range(0, 120, 7):
        for layer in range(L):
            pieces.append(layer, keys[layer, :, start : start + 7])
    for layer in range(L):
        assert torch.equal(whole.codes(layer), pieces.codes(layer))
    with pytest.raises(RetrieverError):
        whole.append(0, torch.randn(HKV + 1, 3, D))
    with pytest.raises(RetrieverError):
        whole.codes(0, length=500)


def test_rope_tables_match_the_model(stories):
    from kvrecall.models import rope_cos_sin
    from kvrecall.models import rope_parameters

    model, _ = stories
    inv, scale = rope_parameters(model)
    pos = torch.tensor([0, 1, 17, 511, 2048, 40000])
    cos, sin = rope_cos_sin(model, pos)
    mine_cos, mine_sin = rope_tables(inv, pos, scale)
    torch.testing.assert_close(mine_cos, cos, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mine_sin, sin, rtol=1e-4, atol=1e-4)


def test_windowed_scores_equal_exact_scores_at_distance_w():
    torch.manual_seed(4)
    q, k = torch.randn(HQ, D), torch.randn(HQ, D)
    for p, w in [(5000, 2048), (300, 64), (64, 64), (10, 0)]:
        true = (rotate(q[:, None], INV_FREQ, torch.tensor([p]))[:, 0] * rotate(k[:, None], INV_FREQ, torch.tensor([p - w]))[:, 0]).sum(-1)
        windowed = (windowed_query(q, INV_FREQ, w) * k).sum(-1)
        torch.testing.assert_close(windowed, true, rtol=1e-4, atol=1e-4)
        other = (rotate(q[:, None], INV_FREQ, torch.tensor([p]))[:, 0] * rotate(k[:, None], INV_FREQ, torch.tensor([p - w + 3]))[:, 0]).sum(-1)
        assert not torch.allclose(windowed, other, atol=1e-3)


def test_public_select_and_append_codes_validation():
    from kvrecall.retriever import select

    torch.manual_seed(5)
    keys = torch.randn(L, HKV, 40, D)
    index = KeyIndex(every_key_profile(keys, "windowed"))
    index.append_all(keys)
    sel = select(index, 0, torch.randn(1, HQ, D), 3, sinks=1, window=2)
    assert sel.indices.shape[:2] == (1, HKV) and int(sel.counts.min()) >= 4
    for bad in (torch.full((HKV, 2, 1), 256), torch.zeros(HKV, 2, 2, dtype=torch.int64), torch.zeros(HKV, 2, 1)):
        with pytest.raises(RetrieverError):
            index.append_codes(0, bad)
    with pytest.raises(RetrieverError):
        index.select(0, torch.randn(1, HQ, D), 3, backend="gpu")
    with pytest.raises(RetrieverError):
        index.append(7, keys[0])
