"""Query-aware codes on real KV, sparse attention equal to dense at full budget, and the metrics."""

from __future__ import annotations

import pytest
import torch

from kvrecall.models import capture_qkv, long_token_ids, read_texts, tokenize
from kvrecall.retriever import KeyIndex, RetrieverError, calibrate, sparse_attention, sparse_decode_logits
from kvrecall.retriever.methods import IndexMethod, OracleMethod, QuestMethod, RandomMethod, StreamingMethod
from kvrecall.retriever.metrics import kl_and_ppl, selection_metrics
from kvrecall.models import rope_parameters
from kvrecall.retriever.rope_window import windowed_query
from kvrecall.retriever.scoring import exact_scores
from kvrecall.retriever.selection import select_from_scores


@pytest.fixture(scope="module")
def held_out(stories, sotu_text):
    model, tok = stories
    ids = tokenize(tok, sotu_text, 400)
    return ids, capture_qkv(model, ids)


@pytest.fixture(scope="module")
def cal_ids(stories, texts_path):
    return long_token_ids(stories[1], read_texts(texts_path / "gutenberg"), 3072)


@pytest.mark.parametrize("rope_mode", ["windowed", "positional"])
def test_query_aware_codes_beat_plain_codes_at_equal_bits(stories, held_out, cal_ids, rope_mode):
    """E[(q·k - q·k̂)²] over held-out real queries/keys is lower with the Cholesky transform (same bits)."""
    model, _ = stories
    _, qkv = held_out
    inv, sc = rope_parameters(model)
    errors = {}
    for qa in (True, False):
        prof = calibrate(model, cal_ids, model_id="t", kind="pq", m=2, bits=5, chunk=512, niter=8,
                         rope_mode=rope_mode, window_distance=256, query_aware=qa, progress=False)
        index = KeyIndex(prof)
        index.append_all(qkv.k)
        total = 0.0
        for layer in range(qkv.k.shape[0]):
            q = windowed_query(qkv.q[layer].transpose(0, 1), inv, 256, sc)  # [T, Hq, D]
            approx = exact_scores(q, index.decoded_keys(layer), 2)
            exact = exact_scores(q, qkv.k[layer], 2)
            total += float(((approx - exact) ** 2).mean())
        errors[qa] = total
    assert errors[True] < 0.9 * errors[False], errors


def test_sparse_decode_with_everything_selected_equals_dense(stories, held_out):
    model, _ = stories
    ids, qkv = held_out
    inv, sc = rope_parameters(model)
    t0 = 380
    before = model.config._attn_implementation
    logits = sparse_decode_logits(model, qkv.kv()[..., :t0, :], ids[t0:], OracleMethod(inv, sc, 2, 8), 10_000)
    assert model.config._attn_implementation == before
    torch.testing.assert_close(logits, qkv.logits[t0:], rtol=1e-4, atol=1e-4)
    tight = sparse_decode_logits(model, qkv.kv()[..., :t0, :], ids[t0:], StreamingMethod(2), 1, sinks=1, window=2)
    assert (tight - qkv.logits[t0:]).abs().max() > 1e-2  # the selection really restricts attention


def test_sparse_decode_runs_every_method(stories, held_out, cal_ids):
    model, _ = stories
    ids, qkv = held_out
    inv, sc = rope_parameters(model)
    prof = calibrate(model, cal_ids, model_id="t", kind="pq", m=2, bits=4, chunk=512, niter=2, progress=False)
    t0 = 390
    targets = torch.cat([ids[t0 + 1 :], torch.tensor([-1])])
    kls = {}
    for method in [OracleMethod(inv, sc, 2, 8), IndexMethod(prof), QuestMethod(inv, sc, 2, 8), StreamingMethod(2), RandomMethod(2)]:
        logits = sparse_decode_logits(model, qkv.kv()[..., :t0, :], ids[t0:], method, 0.05, sinks=4, window=8)
        kl, ppl_d, ppl_s = kl_and_ppl(qkv.logits[t0:], logits, targets)
        assert kl >= 0 and ppl_d > 0 and ppl_s > 0
        kls[method.name] = kl
    assert kls["oracle"] < kls["random"]


def test_sparse_attention_equals_attention_over_gathered_tokens():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    sel = select_from_scores(torch.randn(1, 4, 30), 2, 3, sinks=2, window=4)
    out = sparse_attention(q, k, v, sel, 0.35)
    for h in range(4):
        kv = h // 2
        idx = sel.indices[0, kv, : sel.counts[0, kv]]
        w = torch.softmax(q[0, h, 0] @ k[0, kv, idx].T * 0.35, -1)
        torch.testing.assert_close(out[0, h, 0], w @ v[0, kv, idx], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_attention(q, k, v, None, 0.35),
                               torch.softmax(q @ k.repeat_interleave(2, 1).transpose(2, 3) * 0.35, -1) @ v.repeat_interleave(2, 1))
    with pytest.raises(RetrieverError):
        sparse_attention(torch.randn(1, 3, 1, 8), k, v, None, 1.0)


def test_selection_metrics_bounds():
    torch.manual_seed(1)
    scores, values = torch.randn(4, 100) * 3, torch.randn(2, 100, 8)
    everything = select_from_scores(scores[None], 2, 100, 0, 0)
    oracle = select_from_scores(scores[None], 2, 5, 2, 4)
    rand = select_from_scores(torch.randn(1, 4, 100), 2, 5, 2, 4)
    full = selection_metrics(scores, values, everything, oracle, 5, 2, 1.0, 2, 4)
    torch.testing.assert_close(full["mass"], torch.ones(4, dtype=torch.float64))
    assert float(full["attn_rel_err"].max()) < 1e-9 and float(full["topk_recall"].min()) == 1.0
    orc = selection_metrics(scores, values, oracle, oracle, 5, 2, 1.0, 2, 4)
    rnd = selection_metrics(scores, values, rand, oracle, 5, 2, 1.0, 2, 4)
    assert float(orc["topk_recall"].min()) == 1.0
    assert float(orc["mass"].mean()) > float(rnd["mass"].mean())
