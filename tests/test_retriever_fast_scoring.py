"""CodeScorer (positional / windowed / banded scoring of codes) and topk_union against the reference paths."""

from __future__ import annotations

import pytest
import torch

from kvrecall.retriever import KeyIndex, RetrieverError, RetrieverProfile, RetrieverSettings, lut_scores
from kvrecall.retriever.fast_scoring import SCORERS, CodeScorer, _topk_rows, topk_union
from kvrecall.retriever.rope_window import windowed_query
from kvrecall.retriever.selection import select_from_scores


def _random_profile(rope_mode="positional", layers=2, hkv=2, group=3, d=16, bits=6, seed=0) -> RetrieverProfile:
    gen = torch.Generator().manual_seed(seed)
    s = RetrieverSettings(model_id="rand", model_name="rand", num_layers=layers, num_heads=hkv * group,
                          num_kv_heads=hkv, head_dim=d, kind="vq", m=1, bits=bits, rope_mode=rope_mode,
                          window_distance=300)
    a = torch.randn(layers, hkv, d, d, generator=gen) * 0.2 + torch.eye(d)
    key_t = torch.linalg.cholesky(a @ a.transpose(-1, -2))
    query_t = torch.linalg.inv(key_t).transpose(-1, -2).contiguous()
    books = torch.randn(layers, hkv, 1, 1 << bits, d, generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    return RetrieverProfile(s, key_t, query_t, books, inv_freq)


@pytest.fixture(scope="module")
def filled():
    prof = _random_profile()
    gen = torch.Generator().manual_seed(1)
    t = 700
    index = KeyIndex(prof)
    for layer in range(2):
        index.append(layer, torch.randn(2, t, 16, generator=gen))
    codes = torch.stack([index.codes(layer) for layer in range(2)])[:, None]  # [L, 1, Hkv, T, 1]
    return prof, index, codes, t


def test_positional_equals_the_index_reference(filled):
    prof, index, codes, t = filled
    q = torch.randn(1, 6, 16)
    scorer = CodeScorer(prof, "positional")
    for layer in range(2):
        got = scorer.scores(layer, q, codes[layer], 8, t, t + 5)
        want = index.scores(layer, q, positions=torch.tensor([t + 5]))[:, :, 8:]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_windowed_equals_lut_scores_at_the_fixed_distance(filled):
    prof, index, codes, t = filled
    q = torch.randn(2, 6, 16)
    scorer = CodeScorer(prof, "windowed")
    qr = windowed_query(q, prof.inv_freq, prof.settings.window_distance)
    qt = torch.einsum("bhd,hde->bhe", qr, prof.query_transform[0][torch.arange(6) // 3])
    want = lut_scores(qt, prof.codebooks[0], index.codes(0), 3)
    got = scorer.scores(0, q, codes[0].expand(2, -1, -1, -1), 0, t, t + 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_banded_is_exact_near_and_the_band_mean_of_exact_scores_far(filled):
    prof, index, codes, t = filled
    q = torch.randn(1, 6, 16)
    pos = t + 3
    banded = CodeScorer(prof, "banded", near=100, band_ratio=2.0)
    exact = CodeScorer(prof, "positional").scores(0, q, codes[0], 0, t, pos)
    got = banded.scores(0, q, codes[0], 0, t, pos)
    bands = banded.bands(0, t, pos)
    assert bands[0] == (pos - 99, t, None) and sum(e - s for s, e, _ in bands) == t
    near = slice(pos - 99, t)
    torch.testing.assert_close(got[..., near], exact[..., near], rtol=1e-4, atol=1e-4)
    # the whole band structure: tokens are covered once, contiguous, in order of distance
    starts = [s for s, _, _ in bands]
    assert starts == sorted(starts, reverse=True) and bands[-1][0] == 0 and len(bands) >= 3
    # a far band's LUT score of a code is that code's exact score averaged over the band's distances
    for code in torch.randint(0, 1 << prof.settings.bits, (3,)).tolist():
        same = torch.full_like(codes[0], code)
        exact_c = CodeScorer(prof, "positional").scores(0, q, same, 0, t, pos)
        got_c = banded.scores(0, q, same, 0, t, pos)
        for s, e, d in bands[1:]:
            assert d == pos - (s + e - 1) / 2
            want = exact_c[..., s:e].mean(-1, keepdim=True).expand(-1, -1, e - s)
            torch.testing.assert_close(got_c[..., s:e], want, rtol=1e-3, atol=1e-4)
    # the LUT approximation keeps most of the ranking
    top_exact = set(exact[0, 0].topk(40).indices.tolist())
    top_banded = set(got[0, 0].topk(40).indices.tolist())
    assert len(top_exact & top_banded) >= 10


def test_banded_with_near_covering_everything_is_positional(filled):
    prof, _, codes, t = filled
    q = torch.randn(1, 6, 16)
    a = CodeScorer(prof, "banded", near=10_000).scores(1, q, codes[1], 8, t, t)
    b = CodeScorer(prof, "positional").scores(1, q, codes[1], 8, t, t)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n,k", [(50, 7), (9000, 300), (20000, 600), (5000, 5000)])
def test_topk_rows_is_exact(n, k):
    scores = torch.randn(6, n)
    got = _topk_rows(scores, k)
    want = scores.topk(min(k, n), dim=-1).values
    torch.testing.assert_close(scores.gather(1, got).sort(-1, descending=True).values, want)


def test_topk_union_matches_select_from_scores():
    scores = torch.randn(2, 6, 5000)
    got = topk_union(scores, 3, 200, offset=0)
    ref = select_from_scores(scores, 3, 200, sinks=0, window=0)
    for b in range(2):
        for h in range(2):
            want = ref.indices[b, h, : ref.counts[b, h]]
            assert torch.equal(got[b][h], want)


def test_scorer_rejects_bad_settings():
    with pytest.raises(RetrieverError, match="absolute"):
        CodeScorer(_random_profile("absolute"))
    with pytest.raises(RetrieverError):
        CodeScorer(_random_profile(), "lsh")
    with pytest.raises(RetrieverError):
        CodeScorer(_random_profile(), near=0)
    with pytest.raises(RetrieverError):
        CodeScorer(_random_profile(), band_ratio=1.0)


@pytest.mark.parametrize("method", ["banded", "positional", "windowed"])
@pytest.mark.parametrize("batch,bits", [(1, 6), (2, 6), (1, 12)])
def test_fast_scores_equal_the_reference_twin_over_decode_steps(method, batch, bits):
    """``scores`` (cached band index, updated incrementally) equals ``scores_reference`` at every step of a decode
    that appends tokens, moves the query, crosses band boundaries and grows the codes tensor (12 bits with many
    narrow bands: the index outgrows int16 and is kept as int32)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    prof = _random_profile(seed=seed % 1000, bits=bits)
    gen = torch.Generator().manual_seed(seed)
    scorer = CodeScorer(prof, method, near=24 if bits == 6 else 3, band_ratio=1.7 if bits == 6 else 1.3)
    k = 1 << prof.settings.bits
    t0, steps = 300, 40
    codes = torch.randint(0, k, (batch, 2, t0 + steps, 1), generator=gen)
    for step in range(steps):
        hi = t0 + step
        pos = hi + 2
        if step == 25:  # the cache reallocates its code buffer: a new tensor, same rows
            codes = codes.clone()
        for layer in range(2):
            q = torch.randn(batch, 6, 16, generator=gen)
            lo = int(torch.randint(0, 9, (), generator=gen))
            got = scorer.scores(layer, q, codes, lo, hi, pos)
            want = scorer.scores_reference(layer, q, codes, lo, hi, pos)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"seed {seed} step {step} layer {layer}")


@pytest.mark.parametrize("shape,group,k", [((1, 6, 50), 3, 7), ((2, 6, 9000), 3, 300), ((1, 9, 20000), 3, 600),
                                          ((2, 4, 4096), 2, 4096), ((1, 3, 100), 3, 0)])
def test_topk_union_equals_its_reference_twin(shape, group, k):
    from kvrecall.retriever.fast_scoring import topk_union_reference

    scores = torch.randn(*shape)
    got = topk_union(scores, group, k, offset=5)
    want = topk_union_reference(scores, group, k, offset=5)
    for b in range(shape[0]):
        for h in range(shape[1] // group):
            assert torch.equal(got[b][h], want[b][h])


def test_padded_selection_holds_each_list_in_order_and_marks_padding():
    from kvrecall.retriever.fast_scoring import padded_selection

    lengths = torch.randint(0, 30, (2, 3))
    chosen = [[torch.randperm(100)[: int(n)].sort().values for n in row] for row in lengths]
    idx, valid = padded_selection(chosen)
    assert idx.shape == valid.shape == (2, 3, int(lengths.max()))
    for b in range(2):
        for h in range(3):
            n = int(lengths[b, h])
            assert torch.equal(idx[b, h, :n], chosen[b][h]) and valid[b, h, :n].all() and not valid[b, h, n:].any()
    empty_idx, empty_valid = padded_selection([[torch.empty(0, dtype=torch.int64)] * 3])
    assert empty_idx.shape == empty_valid.shape == (1, 3, 0)


def test_many_bands_of_12_bit_codes_stay_exact():
    prof = _random_profile(bits=12, seed=3)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    scorer = CodeScorer(prof, "banded", near=24, band_ratio=2.0)
    codes = torch.randint(0, 1 << 12, (1, 2, 1000, 1), generator=gen)
    n_bands = []
    for pos in range(200, 1001, 100):  # bands grow with the distance
        q = torch.randn(1, 6, 16, generator=gen)
        got = scorer.scores(0, q, codes, 4, min(pos, 1000), pos)
        torch.testing.assert_close(got, scorer.scores_reference(0, q, codes, 4, min(pos, 1000), pos),
                                   rtol=1e-4, atol=1e-4)
        n_bands.append(sum(d is not None for _, _, d in scorer.bands(4, min(pos, 1000), pos)))
    assert n_bands[0] < n_bands[-1] and n_bands[-1] >= 5


@pytest.mark.parametrize("method", SCORERS)
def test_scores_of_a_packed_code_buffer_equal_those_of_the_tensor(method):
    from kvrecall.retriever.code_buffer import CodeBuffer

    prof = _random_profile(bits=10, seed=5)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    codes = torch.randint(0, 1 << 10, (1, 2, 3001, 1), generator=gen)
    buf = CodeBuffer(1, 2, 1, 10)
    buf.append(codes[:, :, :1777])
    buf.append(codes[:, :, 1777:])
    assert buf.packed
    scorer = CodeScorer(prof, method, near=100, band_ratio=1.5)
    q = torch.randn(1, 6, 16, generator=gen)
    torch.testing.assert_close(scorer.scores(1, q, buf, 5, 3001, 3050), scorer.scores(1, q, codes, 5, 3001, 3050))
    torch.testing.assert_close(scorer.scores_reference(0, q, buf, 5, 3001, 3050),
                               scorer.scores_reference(0, q, codes, 5, 3001, 3050))


def _union_sets(chosen):
    return [[set(h.tolist()) for h in row] for row in chosen]


@pytest.mark.parametrize("method", SCORERS)
def test_candidates_of_a_short_range_are_the_exact_topk_union(method):
    """Below max(4096, 8 * count) tokens the shortlist is each head's exact top-count, unioned per group."""
    prof = _random_profile(bits=8, seed=7)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    scorer = CodeScorer(prof, method, near=64, band_ratio=2.0)
    codes = torch.randint(0, 256, (2, 2, 3000, 1), generator=gen)
    q = torch.randn(2, 6, 16, generator=gen)
    idx, valid = scorer.candidates(1, q, codes, 5, 3000, 3010, 200)
    want = topk_union(scorer.scores(1, q, codes, 5, 3000, 3010), 3, 200, offset=5)
    for b in range(2):
        for h in range(2):
            assert torch.equal(idx[b, h][valid[b, h]], want[b][h])
            assert (idx[b, h][~valid[b, h]] == 5).all()


@pytest.mark.parametrize("method", ["banded", "windowed"])
def test_candidates_of_a_long_range_threshold_each_head_on_a_strided_sample(method):
    """Above the limit: a token is a candidate exactly when some head of its group scores it at or above that
    head's threshold, the ceil(count / 8)-th best score of every 8th token; each head keeps about ``count``."""
    from kvrecall.retriever.fast_scoring import SAMPLE_STRIDE

    prof = _random_profile(bits=10, seed=11)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    scorer = CodeScorer(prof, method, near=500, band_ratio=1.8)
    n_tok, lo, count = 24000, 3, 900
    codes = torch.randint(0, 1 << 10, (1, 2, n_tok, 1), generator=gen)
    q = torch.randn(1, 6, 16, generator=gen)
    idx, valid = scorer.candidates(0, q, codes, lo, n_tok, n_tok + 1, count)
    scores = scorer.scores(0, q, codes, lo, n_tok, n_tok + 1).reshape(1, 2, 3, -1)
    rank = -(-count // SAMPLE_STRIDE)
    thr = scores[..., ::SAMPLE_STRIDE].topk(rank, dim=-1).values[..., -1:]
    kept = scores >= thr  # [1, Hkv, g, n]
    for h in range(2):
        want = kept[0, h].any(0).nonzero().squeeze(1) + lo
        assert torch.equal(idx[0, h][valid[0, h]], want)
        per_head = kept[0, h].sum(-1).float()
        assert ((per_head - count).abs() < 0.25 * count).all(), per_head


def test_compact_mask_lists_each_rows_true_columns_in_order():
    from kvrecall.retriever.fast_scoring import compact_mask

    mask = torch.rand(2, 3, 500) < torch.rand(2, 3, 1)
    mask[1, 2] = False  # an empty row
    idx, valid = compact_mask(mask, offset=7)
    assert idx.shape == valid.shape == (2, 3, int(mask.sum(-1).max()))
    for b in range(2):
        for h in range(3):
            n = int(mask[b, h].sum())
            assert torch.equal(idx[b, h, :n], mask[b, h].nonzero().squeeze(1) + 7)
            assert valid[b, h, :n].all() and not valid[b, h, n:].any() and (idx[b, h, n:] == 7).all()
    e_idx, e_valid = compact_mask(torch.zeros(1, 2, 9, dtype=torch.bool))
    assert e_idx.shape == e_valid.shape == (1, 2, 0)


@pytest.mark.parametrize("method", ["banded", "windowed"])
def test_lut_kernel_scores_and_shortlists_like_torch(method):
    """CodeScorer(lut_scores=the Triton LUT kernel, interpreted) gives the torch path's scores, and the same
    shortlist of a long range (scores of one far band equal, so the sampled thresholds and unions agree)."""
    from kvrecall.kernels.score_topk import lut_scores_triton  # interpreted without a GPU (tests/conftest.py)

    prof = _random_profile(bits=8, seed=13)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    torch_scorer = CodeScorer(prof, method, near=300, band_ratio=2.0)
    kernel_scorer = CodeScorer(prof, method, near=300, band_ratio=2.0, lut_scores=lut_scores_triton)
    codes = torch.randint(0, 256, (2, 2, 6000, 1), generator=gen)
    q = torch.randn(2, 6, 16, generator=gen)
    got = kernel_scorer.scores(1, q, codes, 4, 1500, 1510)
    torch.testing.assert_close(got, torch_scorer.scores(1, q, codes, 4, 1500, 1510), rtol=1e-5, atol=1e-5)
    idx_k, valid_k = kernel_scorer.candidates(0, q, codes, 4, 6000, 6001, 400)
    idx_t, valid_t = torch_scorer.candidates(0, q, codes, 4, 6000, 6001, 400)
    for b in range(2):
        for h in range(2):
            a, t = set(idx_k[b, h][valid_k[b, h]].tolist()), set(idx_t[b, h][valid_t[b, h]].tolist())
            assert len(a ^ t) <= 2, (len(a), len(t), len(a ^ t))  # float rounding at a threshold at most
