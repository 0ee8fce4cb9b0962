"""StreamSession: sliding-window encoding against a full prefill, a planted fact answered after it left the window
(SmolLM2-135M-Instruct), inputs_embeds streams, close/reopen from a real kvstore server, ask before append, spill
to disk with nothing lost, bad input."""

from __future__ import annotations

import pytest
import torch

from kvrecall.models import long_token_ids, prefill_kv, read_texts
from kvrecall.stream_session import StreamError, StreamSession

CODE = "48213"


@pytest.fixture(scope="module")
def hd64_ids(hd64, texts_path):
    _, tok = hd64
    return long_token_ids(tok, read_texts(texts_path / "gutenberg"), 700)


@pytest.fixture(scope="module")
def server():
    from kvrecall.kvstore import BackgroundServer, KVStoreClient, ServerConfig

    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, ram_bytes=128 << 20)) as srv:
        client = KVStoreClient(srv.target)
        yield client
        client.close()


def _stream(model, ids, step=100, **kw):
    s = StreamSession(model, **kw)
    for i in range(0, ids.numel(), step):
        s.append(input_ids=ids[i : i + step])
    return s


def test_window_covering_the_stream_is_a_full_prefill(hd64, hd64_ids):
    model, _ = hd64
    ids = hd64_ids[:300]
    s = _stream(model, ids, step=70, window=512, block=32, sinks=4, level="exact")
    assert s.n_tokens == 300 and not s.block_ranges
    kv = prefill_kv(model, ids)
    got = torch.cat([s.sink_kv, s.win_kv], dim=3)
    torch.testing.assert_close(got, kv, rtol=1e-4, atol=1e-4)
    question = hd64_ids[300:310]
    out = s.ask(question, max_new_tokens=6)
    ref = model.generate(hd64_ids[None, :310], max_new_tokens=6, do_sample=False, temperature=None, top_p=None,
                         top_k=None)
    assert out.tolist() == ref[0, 310:].tolist()[: out.numel()] and s.n_tokens == 300  # question not appended


def test_blocks_leave_the_window_compressed_and_come_back(hd64, hd64_ids):
    model, _ = hd64
    s = _stream(model, hd64_ids[:600], window=128, block=32, sinks=4, top_blocks=3)
    n_blocks = len(s.block_ranges)
    assert s.win_kv.shape[3] <= 128 and n_blocks == (600 - 4 - s.win_kv.shape[3]) // 32
    assert s.block_ranges[0] == (4, 36) and all(e - b == 32 for b, e in s.block_ranges)
    assert s.stats()["ram_block_bytes"] < 0.5 * n_blocks * 32 * 4 * 2 * 2 * 64 * 4  # codec beats fp32 rows 2x+
    s.ask(hd64_ids[600:610], max_new_tokens=3)
    assert all(len(row) == 3 for row in s.last.blocks)
    assert s.last.context_tokens == 4 + 3 * 32 + s.win_kv.shape[3]


def test_inputs_embeds_stream_equals_token_stream(hd64, hd64_ids):
    model, _ = hd64
    ids = hd64_ids[:260]
    by_ids = _stream(model, ids, step=90, window=96, block=32, sinks=4, level="exact")
    by_emb = StreamSession(model, window=96, block=32, sinks=4, level="exact")
    emb = model.get_input_embeddings()(ids)[None].detach()
    for i in range(0, 260, 90):
        by_emb.append(inputs_embeds=emb[:, i : i + 90])
    torch.testing.assert_close(by_emb.win_kv, by_ids.win_kv, rtol=1e-5, atol=1e-5)
    assert by_emb.block_ranges == by_ids.block_ranges and by_emb.block_token_ids[0] is None
    frames = StreamSession(model, window=64, block=32, sinks=4)  # synthetic frames, no tokens at all
    for _ in range(4):
        frames.append(inputs_embeds=torch.randn(1, 48, model.config.hidden_size) * 0.02)
    assert frames.n_tokens == 192 and len(frames.block_ranges) == 4
    assert frames.ask(ids[:8], max_new_tokens=2).numel() == 2


def test_ask_before_append_answers_from_nothing(hd64, hd64_ids):
    model, _ = hd64
    s = StreamSession(model, window=64, block=32)
    q = hd64_ids[:12]
    out = s.ask(q, max_new_tokens=4)
    assert s.last.empty and s.last.context_tokens == 0 and s.last.blocks == [[]] * model.config.num_hidden_layers
    ref = model.generate(q[None], max_new_tokens=4, do_sample=False, temperature=None, top_p=None, top_k=None)
    assert out.tolist() == ref[0, 12:].tolist()[: out.numel()]


@pytest.fixture(scope="module")
def hd64_profile(hd64, hd64_ids):
    from kvrecall.retriever import calibrate

    model, _ = hd64
    return calibrate(model, hd64_ids[:512], model_id="t", bits=6, niter=3, chunk=512, progress=False)


def test_code_scorer_through_retrieval_cache(hd64, hd64_ids, hd64_profile):
    """Codes score blocks; at answer budget 1.0 the RetrievalCache answer equals the dense assembled-cache one."""
    model, _ = hd64
    s = _stream(model, hd64_ids[:500], window=96, block=32, sinks=4, top_blocks=3, retriever_profile=hd64_profile)
    assert s.scorer == "codes" and len(s._codes) == len(s.block_ranges)
    assert s._codes[0].shape[:3] == (model.config.num_hidden_layers, model.config.num_key_value_heads, 32)
    q = hd64_ids[500:510]
    via_retrieval = s.ask(q, max_new_tokens=4)
    chosen = s.last.blocks
    assert all(len(row) == 3 for row in chosen) and model.config._attn_implementation == "sdpa"
    s.retriever_profile, s.scorer = None, (lambda sess, ids: torch.zeros(len(sess.block_ranges)))
    s.ask(q, max_new_tokens=1)  # ties: scores of the external scorer are used as they are
    s.scorer = lambda sess, ids: torch.stack([torch.isin(torch.arange(len(sess.block_ranges)),
                                                         torch.tensor(row)).float() for row in chosen])
    dense = s.ask(q, max_new_tokens=4)  # the same blocks per layer, plain DynamicCache
    assert s.last.blocks == chosen and dense.tolist() == via_retrieval.tolist()


def test_close_and_reopen_from_the_store(hd64, hd64_ids, server):
    model, _ = hd64
    s = _stream(model, hd64_ids[:400], window=96, block=32, sinks=4, top_blocks=2, store=server)
    assert s.stats()["blocks_in_store"] == len(s.block_ranges) > 0 and s.stats()["ram_block_bytes"] == 0
    before = s.ask(hd64_ids[400:410], max_new_tokens=4)
    blocks_before = s.last.blocks
    s.close()
    with pytest.raises(StreamError, match="closed"):
        s.append(input_ids=hd64_ids[:5])
    s2 = StreamSession.open(model, server, s.session_id)
    assert s2.n_tokens == 400 and s2.block_ranges == s.block_ranges
    assert s2.ask(hd64_ids[400:410], max_new_tokens=4).tolist() == before.tolist()
    assert s2.last.blocks == blocks_before
    # continuing the reopened stream matches a stream that was never closed
    s2.append(input_ids=hd64_ids[400:500])
    ref = _stream(model, hd64_ids[:500], window=96, block=32, sinks=4, top_blocks=2)
    assert s2.block_ranges == ref.block_ranges
    torch.testing.assert_close(s2.win_kv, ref.win_kv, rtol=1e-4, atol=1e-4)
    with pytest.raises(StreamError, match="no stream session"):
        StreamSession.open(model, server, "never-written")


def test_spill_to_disk_loses_nothing(hd64, hd64_ids, tmp_path):
    model, _ = hd64
    ram = _stream(model, hd64_ids[:500], window=96, block=32, sinks=4, top_blocks=3)
    spill = _stream(model, hd64_ids[:500], window=96, block=32, sinks=4, top_blocks=3, ram_bytes=20_000,
                    spill_dir=tmp_path)
    st = spill.stats()
    assert st["blocks_on_disk"] > 0 and st["ram_block_bytes"] <= 20_000
    assert st["blocks_on_disk"] + st["blocks_in_ram"] == len(ram.block_ranges)
    assert len(list(tmp_path.glob("block-*.bin"))) == st["blocks_on_disk"]
    for i in range(len(ram.block_ranges)):
        assert spill.tier.get(i) == ram.tier.get(i)
    q = hd64_ids[500:510]
    assert spill.ask(q, max_new_tokens=4).tolist() == ram.ask(q, max_new_tokens=4).tolist()
    assert spill.last.blocks == ram.last.blocks


def test_bad_input(hd64, hd64_ids):
    model, _ = hd64
    with pytest.raises(StreamError, match="window"):
        StreamSession(model, window=16, block=32)
    with pytest.raises(StreamError, match="retriever_profile"):
        StreamSession(model, scorer="codes")
    with pytest.raises(StreamError, match="positions"):
        StreamSession(model, positions="absolute")
    with pytest.raises(StreamError, match="rerank"):
        StreamSession(model, rerank=0)
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(StreamError, match="rerank_fraction"):
            StreamSession(model, rerank_fraction=bad)
    s = StreamSession(model, window=64, block=32)
    with pytest.raises(StreamError, match="exactly one"):
        s.append()
    with pytest.raises(StreamError, match="exactly one"):
        s.append(input_ids=hd64_ids[:4], inputs_embeds=torch.zeros(1, 4, model.config.hidden_size))
    with pytest.raises(StreamError, match="inputs_embeds"):
        s.append(inputs_embeds=torch.zeros(4, model.config.hidden_size))
    with pytest.raises(StreamError, match="input_ids"):
        s.append(input_ids=torch.tensor([0, 10**9]))
    with pytest.raises(StreamError, match="question_ids"):
        s.ask(torch.tensor([], dtype=torch.long))


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smol_stream(smollm2, texts_path):
    """~2,100 tokens of a book with a passcode planted early, streamed with a 256-token window."""
    from kvrecall.rag_prompt import PromptLayout, plant_passcode

    model, tok = smollm2
    layout = PromptLayout(tok)
    text = read_texts(texts_path / "gutenberg")[0][1][5000:14000]
    ids = layout.encode(plant_passcode(text, 0.25, CODE))
    s = StreamSession(model, window=256, block=64, top_blocks=4, scorer="mean-key", selection="per-layer")
    s.append(input_ids=layout.head_ids)
    for i in range(0, ids.numel(), 256):
        s.append(input_ids=ids[i : i + 256])
    question = torch.cat([layout.encode("\n\nWhat is the passcode?"), layout.encode(layout._post)])
    fact = [i for i, b in enumerate(s.block_token_ids) if CODE in tok.decode(b.tolist())]
    return s, tok, question, fact


def test_planted_fact_answered_after_it_left_the_window(smol_stream):
    s, tok, question, fact = smol_stream
    assert s.n_tokens > 2000 and fact and s.block_ranges[fact[-1]][1] < s.n_tokens - 256  # long gone
    answer = tok.decode(s.ask(question, max_new_tokens=12).tolist())
    assert CODE in answer
    hit = sum(any(f in row for f in fact) for row in s.last.blocks)
    assert hit > 0  # layers whose retrieved blocks hold the fact (13 of 30 when measured)
    s.top_blocks = 0  # window only: the fact is gone
    try:
        assert CODE not in tok.decode(s.ask(question, max_new_tokens=12).tolist())
    finally:
        s.top_blocks = 4


def test_external_embedding_scorer_finds_the_fact(smol_stream):
    from kvrecall.embedder import Embedder
    from kvrecall.stream_scoring import EmbeddingBlockScorer

    s, tok, question, fact = smol_stream
    previous = s.scorer
    s.scorer = EmbeddingBlockScorer(Embedder("all-MiniLM-L6-v2"), tok)
    try:
        answer = tok.decode(s.ask(question, max_new_tokens=12).tolist())
    finally:
        s.scorer = previous
    assert any(f in s.last.blocks[0] for f in fact) and CODE in answer


def test_positional_code_scores_equal_decoded_keys_at_true_distances(hd64, hd64_ids, hd64_profile):
    """``scorer="codes-positional"``: each block's score is the attention mass its tokens get when their decoded
    keys sit at their true stream positions and the question at the stream's end (exact within ``near``)."""
    from kvrecall.models import apply_rope, rope_tables

    model, _ = hd64
    s = _stream(model, hd64_ids[:500], window=96, block=32, sinks=4, top_blocks=3, retriever_profile=hd64_profile,
                scorer="codes-positional")
    info = s.info
    q = torch.randn(info.num_layers, model.config.num_attention_heads, 5, info.head_dim)
    got = s._block_scores(q, hd64_ids[500:505])
    codes = torch.cat(s._codes, dim=2)  # [L, Hkv, n, 1]
    first, n = s.block_ranges[0][0], codes.shape[2]
    decoded = torch.einsum("lhkd,lhed->lhke", hd64_profile.codebooks[:, :, 0], hd64_profile.query_transform)
    inv_freq = hd64_profile.inv_freq
    cos_k, sin_k = rope_tables(inv_freq, torch.arange(first, first + n), 1.0)
    cos_q, sin_q = rope_tables(inv_freq, torch.tensor([s.n_tokens]), 1.0)
    g = q.shape[1] // info.num_kv_heads
    for layer in range(info.num_layers):
        keys = torch.stack([decoded[layer, h][codes[layer, h, :, 0].long()] for h in range(info.num_kv_heads)])
        keys = apply_rope(keys, cos_k, sin_k).repeat_interleave(g, dim=0)  # [Hq, n, D]
        qr = apply_rope(q[layer].float(), cos_q, sin_q)  # [Hq, tokens, D]
        w = torch.softmax(qr @ keys.transpose(1, 2) / info.head_dim ** 0.5, dim=-1)  # [Hq, tokens, n]
        want = w.reshape(*w.shape[:2], n // 32, 32).sum(-1).amax(dim=(0, 1))  # best head and token
        torch.testing.assert_close(got[layer], want, rtol=1e-3, atol=1e-5)
    assert s.ask(hd64_ids[500:510], max_new_tokens=2).numel() == 2


def test_rerank_rescores_the_candidates_from_their_decoded_keys(hd64, hd64_ids, hd64_profile):
    """``rerank``: the first stage's ``top_blocks * rerank`` best blocks are rescored from their exact keys
    (queries at ``STREAM_RERANK_DISTANCE``: the largest mass any head and question token gives the block); the
    answer loads the best of those."""
    from kvrecall import defaults
    from kvrecall.models import apply_rope, rope_tables

    model, _ = hd64
    s = _stream(model, hd64_ids[:600], window=96, block=32, sinks=4, top_blocks=2, rerank=3, level="exact",
                retriever_profile=hd64_profile)
    info, n_blocks = s.info, len(s.block_ranges)
    g = model.config.num_attention_heads // info.num_kv_heads
    q = torch.randn(info.num_layers, model.config.num_attention_heads, 5, info.head_dim)
    first = s._block_scores(q, hd64_ids[600:605])
    decoded: dict = {}
    got = s._rerank_scores(first, q, 6, decoded)
    candidates = sorted(s._select(first, 6)[0])
    assert sorted(decoded) == candidates and len(candidates) == 6  # global selection: one set for all layers
    assert torch.isinf(got[:, [b for b in range(n_blocks) if b not in candidates]]).all()
    cos, sin = rope_tables(hd64_profile.inv_freq, torch.tensor([defaults.STREAM_RERANK_DISTANCE]), 1.0)
    blocks = torch.cat([s._decode_block(s.tier.get(c)) for c in candidates], dim=3)  # [L, 2, Hkv, 6 * 32, D]
    for layer in range(info.num_layers):
        for j, b in enumerate(candidates):
            best = 0.0
            for h in range(q.shape[1]):
                keys = blocks[layer, 0, h // g].float()
                w = torch.softmax(apply_rope(q[layer, h].float(), cos, sin) @ keys.T / info.head_dim ** 0.5, -1)
                best = max(best, float(w[:, j * 32 : (j + 1) * 32].sum(-1).max()))
            assert abs(float(got[layer, b]) - best) < 1e-4
    s.ask(hd64_ids[600:610], max_new_tokens=1)
    assert all(len(row) == 2 for row in s.last.blocks)


def test_rerank_shortlist_grows_with_the_stream(hd64, hd64_ids, hd64_profile):
    """The shortlist is ``max(top_blocks * rerank, ceil(rerank_fraction * n_blocks))`` blocks, and ``ask``
    rescores exactly that many."""
    model, _ = hd64
    s = _stream(model, hd64_ids[:600], window=96, block=32, sinks=4, top_blocks=2, rerank=2, level="exact",
                retriever_profile=hd64_profile, rerank_fraction=0.5)
    n_blocks = len(s.block_ranges)
    assert n_blocks >= 12 and s.n_candidates(n_blocks) == -(-n_blocks // 2)
    assert s.n_candidates(6) == 4 and s.n_candidates(3) == 3  # the floor, then every block
    seen = []
    rerank_scores = s._rerank_scores
    s._rerank_scores = lambda scores, q, n, decoded: seen.append(n) or rerank_scores(scores, q, n, decoded)
    s.ask(hd64_ids[600:610], max_new_tokens=1)
    assert seen == [-(-n_blocks // 2)]
