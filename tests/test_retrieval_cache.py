"""RetrievalCache in model.generate: dense equality at full budget, O(selected) gathers, offload bookkeeping,
byte accounting, unsupported inputs, chunked prefill, from_kv, batch > 1 (stories260K and SmolLM2-135M)."""

from __future__ import annotations

import pytest
import torch

from kvrecall.models import cache_kwargs, long_token_ids, prefill_kv, read_texts
from kvrecall.retrieval_cache import RetrievalCache, RetrievalError
from kvrecall.retriever import RetrieverError, calibrate
from kvrecall.retriever.codebooks import encode


def _profile(model, tok, texts_path, tokens=1024, bits=6, chunk=512, **kw):
    ids = long_token_ids(tok, read_texts(texts_path / "gutenberg"), tokens)
    return calibrate(model, ids, model_id="test", bits=bits, niter=3, chunk=chunk, progress=False, **kw)


@pytest.fixture(scope="module")
def stories_setup(stories, texts_path):
    model, tok = stories
    prof = _profile(model, tok, texts_path)
    ids = long_token_ids(tok, read_texts(texts_path / "state_union"), 200)[None]
    dense = model.generate(ids, max_new_tokens=24, do_sample=False)
    yield model, tok, prof, ids, dense
    model.set_attn_implementation("sdpa")


def _generate(model, ids, cache, n=16, **kw):
    kw.setdefault("do_sample", False)
    try:
        return model.generate(ids, max_new_tokens=n, **cache_kwargs(model, cache), **kw)
    finally:
        cache.restore_attention()


def test_full_budget_reproduces_dense_greedy_stories(stories_setup):
    model, _, prof, ids, dense = stories_setup
    cache = RetrievalCache(model, prof, budget=1.0, sinks=4, window=16)
    out = _generate(model, ids, cache, n=24)
    assert torch.equal(out, dense)
    st = cache.stats()
    assert st["tokens"] == ids.shape[1] + 23 and st["decode_steps"] == 23
    assert model.config._attn_implementation == "sdpa"


def test_full_budget_through_triton_path_interpreted(stories_setup):
    model, _, prof, ids, dense = stories_setup
    cache = RetrievalCache(model, prof, budget=1.0, sinks=4, window=16, backend="triton")
    out = _generate(model, ids, cache, n=2)
    assert torch.equal(out, dense[:, : ids.shape[1] + 2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned offload store, kernels)")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_decoding_matches_dense_and_fetches_stored_rows(stories_setup, backend):
    import copy

    model, _, prof, ids, _ = stories_setup
    gpu = copy.deepcopy(model).cuda()
    ids = ids.cuda()
    dense = gpu.generate(ids, max_new_tokens=8, do_sample=False)
    cache = RetrievalCache(gpu, prof, budget=1.0, sinks=4, window=16, backend=backend, offload="exact")
    assert torch.equal(_generate(gpu, ids, cache, n=8), dense)
    layer = cache.layers[0]
    assert layer.win_k.is_cuda and layer.codes.nbytes > 0 and layer.store._parts["k"].data.is_pinned()
    cache = RetrievalCache(gpu, prof, budget=5, sinks=4, window=16, backend=backend, offload="int8")
    out = _generate(gpu, ids, cache, n=8)
    assert out.shape == dense.shape and cache.stats()["fetched_bytes"] > 0


def test_gathered_rows_are_the_selection_not_the_context(stories_setup):
    model, _, prof, ids, _ = stories_setup
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    cache = RetrievalCache(model, prof, budget=5, sinks=4, window=16, rerank=1.0)
    _generate(model, ids, cache, n=6)
    for layer in cache.layers:
        assert 5 <= layer.last_gathered <= 5 * group  # top-5 per query head, unioned over the group
        assert layer.last_attended == 4 + layer.last_gathered + 16
        assert layer.last_attended < layer.length / 4
    assert cache.stats()["mean_selected"] <= 4 + 16 + 5 * group


@pytest.mark.parametrize("form,row_bytes", [("float16", 2 * 8), ("int8", 8 + 4), ("int4", 4 + 4)])
def test_a_decode_step_fetches_only_its_rows_in_stored_form(stories_setup, form, row_bytes):
    model, _, prof, ids, _ = stories_setup
    b, hkv = 1, model.config.num_key_value_heads
    cache = RetrievalCache(model, prof, budget=5, sinks=4, window=16, rerank=1.0, offload=form)
    try:
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))  # prefill: nothing read back from the store
            assert all(layer.store.fetched_rows == 0 for layer in cache.layers)
            model(torch.tensor([[11]]), **cache_kwargs(model, cache))  # a decode step
            before = {id(layer): (layer.store.fetched_rows, layer.store.fetched_bytes) for layer in cache.layers}
            model(torch.tensor([[7]]), **cache_kwargs(model, cache))  # the step measured
    finally:
        cache.restore_attention()
    for layer in cache.layers:
        rows0, bytes0 = before[id(layer)]
        fetched = 2 * b * hkv * layer.last_gathered  # padded width per KV head, keys and values
        assert layer.store.fetched_rows - rows0 == fetched
        assert layer.store.fetched_bytes - bytes0 == fetched * row_bytes
        assert fetched < 2 * b * hkv * layer.length / 4
    assert cache.stats()["fetched_bytes"] == sum(layer.store.fetched_bytes for layer in cache.layers)


def test_tokens_leaving_the_window_reach_store_and_index(stories_setup):
    model, _, prof, ids, _ = stories_setup
    cache = RetrievalCache(model, prof, budget=1.0, sinks=4, window=16)
    out = _generate(model, ids, cache, n=24)  # generated tokens leave the window too
    kv = prefill_kv(model, out[0, :-1])  # pre-RoPE keys of every token the cache has seen
    for i, layer in enumerate(cache.layers):
        n_off = layer.store.length
        assert n_off == layer.length - 16 == out.shape[1] - 1 - 16 > ids.shape[1]
        idx = torch.arange(n_off).expand(1, kv.shape[2], n_off)
        k, v = layer.store.gather(idx)  # keys post-RoPE, rotated at their positions when stored
        post = cache.rotate(kv[i, 0], torch.arange(kv.shape[3]))
        torch.testing.assert_close(k[0], post[:, :n_off], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.unrotate(k[0], torch.arange(n_off)), kv[i, 0, :, :n_off],
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v[0], kv[i, 1, :, :n_off], rtol=1e-4, atol=1e-4)
        kt = torch.einsum("htd,hde->hte", kv[i, 0, :, :n_off], prof.key_transform[i])
        want = torch.stack([encode(kt[h], prof.codebooks[i, h]) for h in range(kt.shape[0])])
        agree = (layer.codes.range(0, n_off)[0] == want).float().mean()
        assert agree > 0.98  # nearest centroid of keys equal up to float rounding
        torch.testing.assert_close(layer.win_k[0], post[:, n_off:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form,row_bytes", [("exact", 4 * 8), ("float16", 2 * 8), ("int8", 8 + 4), ("int4", 4 + 4)])
def test_resident_and_offloaded_byte_accounting(stories_setup, form, row_bytes):
    model, _, prof, ids, _ = stories_setup
    cache = RetrievalCache(model, prof, budget=0.1, sinks=4, window=16, offload=form)
    _generate(model, ids, cache, n=2)
    st = cache.stats()
    layers, hkv, d = model.config.num_hidden_layers, model.config.num_key_value_heads, 8
    tokens = ids.shape[1] + 1
    n_off = tokens - 16
    assert st["tokens"] == tokens
    assert st["offloaded_bytes"] == layers * hkv * n_off * 2 * row_bytes  # K and V rows
    code_bytes = layers * hkv * 4096 * 1  # 6-bit codes stored as uint8, capacity grown in 4096-token steps
    rows = layers * hkv * (4 + 16) * d * 2 * (4 if form == "exact" else 2)  # sinks + window, K, V: fp32 / fp16
    assert st["resident_bytes"] == code_bytes + rows
    assert st["dense_fp16_bytes"] == layers * 2 * hkv * d * 2 * tokens
    assert st["codebook_bytes"] == layers * hkv * 64 * d * 4
    assert set(st["timings_ms"]) >= {"score", "select", "gather", "attend"}


def test_quantized_offload_stays_close_to_dense(stories_setup):
    model, _, prof, ids, dense = stories_setup
    cache = RetrievalCache(model, prof, budget=1.0, sinks=4, window=16, offload="int8")
    out = _generate(model, ids, cache, n=8)
    assert (out[0, -8:] == dense[0, ids.shape[1] : ids.shape[1] + 8]).float().mean() >= 0.75


def test_chunked_prefill_gives_the_same_first_token(stories_setup):
    model, _, prof, ids, dense = stories_setup
    firsts = []
    for chunk in (50, 100_000):
        cache = RetrievalCache(model, prof, budget=0.1, sinks=4, window=16, prefill_chunk=chunk)
        firsts.append(_generate(model, ids, cache, n=1)[0, -1])
    assert firsts[0] == firsts[1] == dense[0, ids.shape[1]]
    # generate's own prefill chunking (the whole forward) feeds earlier chunks back from the store
    cache = RetrievalCache(model, prof, budget=1.0, sinks=4, window=16, prefill_chunk=64)
    out = _generate(model, ids, cache, n=4, prefill_chunk_size=cache.prefill_chunk)
    assert torch.equal(out, dense[:, : ids.shape[1] + 4])


def test_from_kv_continues_like_dense(stories_setup):
    model, _, prof, ids, dense = stories_setup
    kv = prefill_kv(model, ids[0, :-1])
    cache = RetrievalCache.from_kv(model, prof, kv, budget=1.0, sinks=4, window=16)
    assert cache.get_seq_length() == ids.shape[1] - 1
    out = _generate(model, ids, cache, n=8)
    assert torch.equal(out, dense[:, : ids.shape[1] + 8])
    with pytest.raises(RetrievalError):
        RetrievalCache.from_kv(model, prof, kv[:, :, :1], budget=1.0)
    with pytest.raises(RetrievalError):
        RetrievalCache.from_kv(model, prof, kv, last_position=3)


def test_batch_of_equal_length_prompts(stories_setup):
    model, tok, prof, ids, _ = stories_setup
    batch = torch.cat([ids, ids.flip(1)])  # two different prompts of equal length
    dense = model.generate(batch, max_new_tokens=6, do_sample=False)
    cache = RetrievalCache(model, prof, budget=1.0, sinks=4, window=16)
    assert torch.equal(_generate(model, batch, cache, n=6), dense)
    cache = RetrievalCache(model, prof, budget=0.05, sinks=4, window=16)
    out = _generate(model, batch, cache, n=3)
    assert out.shape == (2, ids.shape[1] + 3) and cache.stats()["batch"] == 2


def test_unsupported_inputs_raise(stories_setup, hd64):
    model, _, prof, ids, _ = stories_setup
    cache = RetrievalCache(model, prof, budget=0.1)
    mask = torch.ones(2, ids.shape[1], dtype=torch.long)
    mask[1, :5] = 0
    with pytest.raises(RetrievalError, match="padded"):
        _generate(model, torch.cat([ids, ids]), cache, n=2, attention_mask=mask)
    with pytest.raises(RetrievalError, match="beam"):
        _generate(model, ids, RetrievalCache(model, prof, budget=0.1), n=3, num_beams=2)
    # sampling is supported (selection does not depend on it); generate expands the batch before the prefill
    out = _generate(model, ids, RetrievalCache(model, prof, budget=0.1), n=2, num_return_sequences=2, do_sample=True)
    assert out.shape == (2, ids.shape[1] + 2)
    for bad in ({"budget": 0.0}, {"budget": -3}, {"budget": "all"}, {"sinks": -1}, {"window": 0},
                {"offload": "int3"}, {"scorer": "lsh"}, {"backend": "cuda"}, {"prefill_chunk": 0}):
        with pytest.raises((RetrievalError, RetrieverError)):
            RetrievalCache(model, prof, **bad)
    with pytest.raises(RetrievalError, match="profile"):
        RetrievalCache(hd64[0], prof)  # profile of another model shape
    model.set_attn_implementation("sdpa")


def test_absolute_profile_is_rejected(stories, texts_path):
    model, tok = stories
    prof = _profile(model, tok, texts_path, tokens=600, bits=4, kind="pq", m=2, rope_mode="absolute",
                    query_aware=False)
    with pytest.raises(RetrieverError, match="pre-RoPE"):
        RetrievalCache(model, prof)
    model.set_attn_implementation("sdpa")


def test_full_budget_reproduces_dense_greedy_smollm2(texts_path):
    from kvrecall.models import load_model
    from kvrecall.models import ModelError

    try:
        model, tok = load_model("smollm2-135m")
    except ModelError as exc:  # pragma: no cover - the converted cache is provisioned on CI machines
        pytest.skip(f"smollm2-135m unavailable: {exc}")
    prof = _profile(model, tok, texts_path, tokens=256, bits=4, chunk=256)
    text = read_texts(texts_path / "gutenberg")[3][1]
    msgs = [{"role": "user", "content": text[:1500] + "\n\nWho is this passage about?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ids = ids[:, -1000:] if ids.shape[1] > 1000 else ids
    dense = model.generate(ids, max_new_tokens=8, do_sample=False)
    cache = RetrievalCache(model, prof, budget=1.0, sinks=8, window=64)
    out = _generate(model, ids, cache, n=8)
    assert torch.equal(out, dense)


def test_rerank_over_every_token_is_the_oracle_selection(stories_setup):
    """rerank so large that every stored token is a candidate: exact top-k of exact rows = the oracle selector."""
    from kvrecall.retrieval_baselines import oracle_selector

    model, _, prof, ids, _ = stories_setup
    cache = RetrievalCache(model, prof, budget=6, sinks=4, window=16, offload="exact", rerank=1000.0)
    out = _generate(model, ids, cache, n=8)
    oracle = RetrievalCache(model, prof, budget=6, sinks=4, window=16, offload="exact", selector=oracle_selector)
    want = _generate(model, ids, oracle, n=8)
    assert torch.equal(out, want)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer in cache.layers:  # every stored token gathered as a candidate; attended rows bounded by k per head
        assert layer.last_gathered == layer.n_off - 4 and layer.last_attended <= 4 + 6 * group + 16
    assert cache.stats()["mean_selected"] == pytest.approx(oracle.stats()["mean_selected"])


def test_rerank_two_keeps_the_budget_and_rejects_bad_values(stories_setup):
    model, _, prof, ids, _ = stories_setup
    cache = RetrievalCache(model, prof, budget=5, sinks=4, window=16, rerank=2.0, rerank_floor=0)
    _generate(model, ids, cache, n=4)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer in cache.layers:
        assert layer.last_gathered <= 10 * group and layer.last_attended <= 4 + 5 * group + 16
    for bad in (0.5, "2", True, float("nan")):
        with pytest.raises(RetrievalError, match="rerank"):
            RetrievalCache(model, prof, rerank=bad)


def test_resident_rows_are_16_bit_unless_offload_is_exact():
    from kvrecall.retrieval_store import resident_row_dtype

    assert resident_row_dtype(torch.float32, "exact") == torch.float32
    assert resident_row_dtype(torch.float32, "int8") == torch.float16
    assert resident_row_dtype(torch.bfloat16, "int4") == torch.bfloat16
    assert resident_row_dtype(torch.float16, "float16") == torch.float16


def test_rerank_floor_sets_the_least_candidates_per_head(stories_setup):
    """With ``rerank > 1`` the codes pick ``max(ceil(rerank * k), rerank_floor)`` candidates per query head: the
    rows gathered at a step cover that many per head (unioned over the GQA group), and attention stays at top-k."""
    model, _, prof, ids, _ = stories_setup
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    cache = RetrievalCache(model, prof, budget=3, sinks=4, window=16, rerank=2.0, rerank_floor=40)
    _generate(model, ids, cache, n=3)
    for layer in cache.layers:
        assert layer.n_off - 4 > 40 and 40 <= layer.last_gathered <= 40 * group
        assert layer.last_attended <= 4 + 3 * group + 16
    for bad in (-1, 2.5, True):
        with pytest.raises(RetrievalError, match="rerank_floor"):
            RetrievalCache(model, prof, rerank_floor=bad)


def test_rope_rows_equal_rope_tables_and_are_shared(stories_setup):
    from kvrecall.models import rope_tables

    model, _, prof, _, _ = stories_setup
    a = RetrievalCache(model, prof)
    b = RetrievalCache(model, prof)
    a.restore_attention()
    pos = torch.randint(0, 9000, (2, 3, 50))
    cos, sin = a.rope_rows(pos)
    want_cos, want_sin = rope_tables(a.inv_freq, pos.reshape(-1), a.rope_scaling)
    assert cos.shape == (2, 3, 50, a.inv_freq.numel() * 2)
    assert torch.equal(cos.reshape(-1, cos.shape[-1]), want_cos) and torch.equal(sin.reshape(-1, sin.shape[-1]), want_sin)
    b.rope_rows(torch.tensor([5]))
    assert b.stats()["rope_table_bytes"] == a.stats()["rope_table_bytes"] >= 2 * 9000 * cos.shape[-1] * 4


@pytest.mark.parametrize("form", ["exact", "float16", "int8", "int4"])
def test_store_dot_and_mix_equal_gather_then_compute(form):
    """OffloadStore.dot / mix (scores and weighted values without a dequantized copy) equal computing them on
    the gathered rows."""
    from kvrecall.retrieval_store import OffloadStore

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    store = OffloadStore(2, 3, 16, form, torch.float32, pin=False)
    for n in (100, 1, 333):  # appends grow the buffers
        store.append(torch.randn(2, 3, n, 16, generator=gen), torch.randn(2, 3, n, 16, generator=gen))
    idx = torch.randint(0, store.length, (2, 3, 57), generator=gen)
    q = torch.randn(2, 3, 4, 16, generator=gen)
    w = torch.softmax(torch.randn(2, 3, 4, 57, generator=gen), -1)
    k, v = store.gather(idx)
    torch.testing.assert_close(store.dot(idx, q), torch.matmul(q, k.transpose(2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(store.mix(idx, w), torch.matmul(w, v), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned store, staged copies)")
@pytest.mark.parametrize("form", ["float16", "int8", "int4"])
def test_gpu_store_reads_equal_the_host_reads(form):
    """Rows quantized on the GPU and copied down, then fetched back through pinned staging, give the same
    scores, weighted values and rows as reading them on the host."""
    from kvrecall.retrieval_store import OffloadStore

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    store = OffloadStore(1, 3, 64, form, torch.float16, pin=True)
    for n in (300, 1, 4000):
        store.append(torch.randn(1, 3, n, 64, generator=gen).half().cuda(),
                     torch.randn(1, 3, n, 64, generator=gen).half().cuda())
    idx = torch.randint(0, store.length, (1, 3, 257), generator=gen)
    q = torch.randn(1, 3, 3, 64, generator=gen)
    w = torch.softmax(torch.randn(1, 3, 3, 257, generator=gen), -1)
    for _ in range(3):  # staging slots rotate
        torch.testing.assert_close(store.dot(idx, q.cuda()).cpu(), store.dot(idx, q), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(store.mix(idx, w.cuda()).cpu(), store.mix(idx, w), rtol=1e-3, atol=1e-3)
    k_gpu, v_gpu = store.gather(idx, "cuda")
    k_cpu, v_cpu = store.gather(idx)
    assert torch.equal(k_gpu.cpu(), k_cpu) and torch.equal(v_gpu.cpu(), v_cpu)


@pytest.mark.parametrize("scaling", [1.0, 1.7])
def test_unrotate_inverts_rotate_at_any_attention_scaling(stories_setup, scaling):
    """Stored keys are the model's post-RoPE keys (RoPE tables times attention_scaling); codes need the
    pre-RoPE ones back: unrotate(rotate(k)) == k, and rotate is the model's own rotation."""
    from kvrecall.models import apply_rope, rope_tables

    model, _, prof, _, _ = stories_setup
    cache = RetrievalCache(model, prof, budget=0.1)
    cache.rope_scaling = scaling  # as a model with a scaled rotary embedding (e.g. YaRN) would report it
    x = torch.randn(1, 2, 40, model.config.hidden_size // model.config.num_attention_heads)
    pos = torch.arange(100, 140)
    cos, sin = rope_tables(cache.inv_freq, pos, scaling)
    torch.testing.assert_close(cache.rotate(x, pos), apply_rope(x, cos, sin))
    torch.testing.assert_close(cache.unrotate(cache.rotate(x, pos), pos), x, rtol=1e-5, atol=1e-5)
    cache.restore_attention()


def test_rerank_attends_exactly_the_rows_it_keeps(stories_setup):
    """A rerank step attends sinks + the rows its exact top-k keeps (per KV head, of any count) + window and
    nothing else: replaying its kept rows through a selector without rerank gives the same logits."""
    model, _, prof, ids, dense = stories_setup
    kept = {}

    def record(layer, q_pre, chosen, lo, n_off, k, pos):
        kept[(layer.layer_idx, pos)] = [[c.clone() for c in row] for row in chosen]

    def replay(layer, q_pre, lo, n_off, k, pos):
        return kept[(layer.layer_idx, pos)]

    feed = dense[:, ids.shape[1]:ids.shape[1] + 6]
    logits = {}
    for name in ("rerank", "replay"):
        cache = RetrievalCache(model, prof, budget=4, sinks=4, window=16, offload="int8", rerank=3.0,
                               rerank_floor=0, selector=None if name == "rerank" else replay)
        if name == "rerank":
            cache.probe = record
        try:
            with torch.no_grad():
                model(ids, **cache_kwargs(model, cache), use_cache=True)
                out = [model(feed[:, i:i + 1], **cache_kwargs(model, cache), use_cache=True).logits[0, -1]
                       for i in range(feed.shape[1])]
        finally:
            cache.restore_attention()
        logits[name] = torch.stack(out)
    counts = {len(h) for rows in kept.values() for row in rows for h in row}
    assert len(counts) > 1  # KV heads kept different numbers of rows: padding was exercised
    torch.testing.assert_close(logits["rerank"], logits["replay"], rtol=1e-4, atol=1e-4)


def test_triton_backend_scores_codes_with_the_lut_kernel(stories_setup, monkeypatch):
    """backend="triton" (interpreted) decodes a top-k budget like the torch backend: the far bands scored by the
    Triton LUT kernel; without a rerank the fetched rows attended by the sparse attention kernel (keys and values
    fetched once each), with one the rerank's scores reused."""
    from kvrecall.kernels import sparse_attention

    model, _, prof, ids, _ = stories_setup
    calls = []
    original = sparse_attention.sparse_decode_attention

    def counting(*args, **kwargs):
        calls.append(args[1].shape[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(sparse_attention, "sparse_decode_attention", counting)
    for rerank in (1.0, 2.0):
        outs, fetched = {}, {}
        for backend in ("torch", "triton"):
            calls.clear()
            cache = RetrievalCache(model, prof, budget=6, sinks=4, window=16, offload="exact", backend=backend,
                                   near=32, rerank=rerank, rerank_floor=0)
            assert (cache.scorer.lut_scores is not None) == (backend == "triton")
            outs[backend] = _generate(model, ids, cache, n=3)
            fetched[backend] = cache.stats()["fetched_bytes"]
            kernel_steps = len(calls)
            assert kernel_steps == (2 * model.config.num_hidden_layers if backend == "triton" and rerank == 1.0
                                    else 0)
        assert torch.equal(outs["torch"], outs["triton"])
        assert fetched["torch"] == fetched["triton"]  # the same rows cross, once
