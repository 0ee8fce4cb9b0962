"""ContextCache into model.generate, with SmolLM2-135M and a real kvstore server on loopback.

Prompts stay at 160 tokens with 64-token chunks so the whole module runs in well under a minute on two cores.
"""

import warnings

import pytest
import torch

from kvrecall.context_cache import ContextCache, ContextCacheError
from kvrecall.encoder import decode, encode
from kvrecall.loading_meter import ThroughputMeter
from kvrecall.models import cache_kwargs, prefill_kv, read_texts

CHUNK = 64
NEW = 6


def _greedy(model, ids, n=NEW, **kw):
    return model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=n, do_sample=False,
                          temperature=None, top_p=None, top_k=None, **kw)


@pytest.fixture(scope="module")
def smol():
    from kvrecall.models import ModelError, load_model

    try:
        return load_model("smollm2-135m")
    except ModelError as exc:  # pragma: no cover - the converted model is provisioned with the environment
        pytest.skip(f"smollm2-135m unavailable: {exc}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from kvrecall.kvstore import BackgroundServer, ServerConfig

    disk = tmp_path_factory.mktemp("store")
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, disk_dir=disk, ram_bytes=128 << 20)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from kvrecall.kvstore import KVStoreClient

    with KVStoreClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def prompt(smol, texts_path):
    """A chat prompt of 160 tokens, its prefill KV and its greedy continuation."""
    model, tok = smol
    text = read_texts(texts_path / "gutenberg")[0][1][5000:6200]
    msgs = [{"role": "user", "content": text + "\n\nSummarize this in one sentence."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ids = torch.cat([ids[0, :140], ids[0, -20:]])  # 160 tokens ending in the question and the assistant turn
    return ids, prefill_kv(model, ids), _greedy(model, ids)


def test_store_load_round_trip_includes_the_partial_chunk(client, prompt):
    ids, kv, _ = prompt
    cc = ContextCache(client, "t-roundtrip", None, "medium", chunk_tokens=CHUNK)
    first = cc.store(None, ids, kv=kv)
    assert (first.chunks, first.stored) == (3, 3) and first.bytes_written == first.bytes_by_level["medium"] > 0
    again = cc.store(None, ids, kv=kv)
    assert again.stored == 0 and again.bytes_written == 0  # present: nothing re-encoded
    loaded = cc.load(ids)
    assert loaded.tokens == 160 and loaded.bytes_read == first.bytes_written
    expect = torch.cat([decode(encode(kv[:, :, :, i : i + CHUNK])) for i in range(0, 160, CHUNK)], dim=3)
    assert torch.equal(loaded.kv, expect)
    assert cc.load(ids[None]).tokens == 160  # [1, tokens] is accepted too


def test_lossless_level_generates_exactly_like_recompute_without_refeeding(smol, client, prompt):
    model, _ = smol
    ids, kv, ref = prompt
    cc = ContextCache(client, "t-exact", None, "exact", chunk_tokens=CHUNK)
    cc.store(model, ids)  # prefills itself
    cache, n = cc.load_cache(model, ids)
    assert n == ids.numel() - 1 and cache.get_seq_length() == n  # the whole prompt is cached: one token left
    model.generate(ids[None], max_new_tokens=3, do_sample=False, temperature=None, top_p=None, top_k=None,
                   **cache_kwargs(model, cache))
    assert cache.get_seq_length() == ids.numel() + 2  # only the last prompt token was fed, not the whole prompt
    out = cc.generate(model, ids, max_new_tokens=NEW)
    assert torch.equal(out, ref)
    assert cc.last_report.levels == {"exact": 3} and cc.last_report.bytes_read > 0


def test_prefix_shared_by_two_prompts_is_reused(smol, client, prompt):
    model, _ = smol
    ids, kv, _ = prompt
    cc = ContextCache(client, "t-prefix", None, "exact", chunk_tokens=CHUNK)
    cc.store(None, ids, kv=kv)
    other = torch.cat([ids[:140], ids[-30:].flip(0)])  # same first 140 tokens, another ending
    cache, n = cc.load_cache(model, other)
    assert n == 128  # two full chunks; the third differs, the partial chunk belongs to the other prompt
    assert torch.equal(cc.generate(model, other, max_new_tokens=6), _greedy(model, other, 6))


def test_context_shorter_than_one_chunk(smol, client, prompt):
    model, _ = smol
    ids = prompt[0][-40:]
    cc = ContextCache(client, "t-short", None, "exact", chunk_tokens=CHUNK)
    assert cc.load_cache(model, ids) == (None, 0)  # nothing stored yet
    stored = cc.store(model, ids)
    assert (stored.chunks, stored.stored) == (1, 1)
    cache, n = cc.load_cache(model, ids)
    assert n == 39 and cache.get_seq_length() == 39
    assert torch.equal(cc.generate(model, ids, max_new_tokens=6), _greedy(model, ids, 6))


def test_missing_chunk_in_the_middle_loads_up_to_it_and_prefills_the_rest(smol, client, prompt):
    model, _ = smol
    ids, kv, ref = prompt
    cc = ContextCache(client, "t-missing", None, "exact", chunk_tokens=CHUNK)
    cc.store(None, ids, kv=kv)
    assert client.delete([cc.keys(ids)[1]]) == 1
    cache, n = cc.load_cache(model, ids)
    assert n == CHUNK and cc.last_report.stored_tokens == CHUNK
    out = cc.generate(model, ids, max_new_tokens=NEW)
    assert torch.equal(out, ref)
    assert cc.last_report.timings["prefill_s"] > 0


def test_store_asks_the_store_before_prefilling(smol, client, prompt):
    """A context whose chunks are all present is not prefilled again; a missing one is, and is written."""
    model, _ = smol
    ids, kv, _ = prompt
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        cc = ContextCache(client, "t-prefill-once", None, "medium", chunk_tokens=CHUNK)
        first = cc.store(model, ids)
        assert first.stored == 3 and first.prefill_s > 0 and len(calls) == 1
        again = cc.store(model, ids)
        assert (again.chunks, again.stored, again.prefill_s) == (3, 0, 0.0) and len(calls) == 1
        longer = torch.cat([ids, ids[:10]])  # a new final chunk: prefilled, only that chunk written
        grown = cc.store(model, longer)
        assert grown.stored == 1 and len(calls) == 2
    finally:
        hook.remove()


def test_store_down_recomputes_with_one_warning(smol, prompt):
    from kvrecall.kvstore import KVStoreClient
    from kvrecall.kvstore.testing import free_port

    model, _ = smol
    ids, kv, ref = prompt
    with KVStoreClient(f"127.0.0.1:{free_port()}", retries=0, timeout_s=2.0) as dead:
        cc = ContextCache(dead, "t-down", None, "exact", chunk_tokens=CHUNK)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = cc.generate(model, ids, max_new_tokens=NEW)
        assert torch.equal(out, ref)
        assert [w.category for w in caught] == [RuntimeWarning] and "kvstore unavailable" in str(caught[0].message)
        with pytest.warns(RuntimeWarning, match="nothing stored"):
            assert cc.store(None, ids, kv=kv).stored == 0


def test_auto_picks_per_chunk_from_measured_bandwidth(smol, client, prompt):
    model, _ = smol
    ids, kv, ref = prompt
    fast = ThroughputMeter(bandwidth_Bps=1e10, prefill_tokens_per_s=100.0)
    cc = ContextCache(client, "t-auto", None, "auto", chunk_tokens=CHUNK, auto_levels=("exact", "low"), meter=fast)
    stored = cc.store(None, ids, kv=kv)
    assert stored.stored == 6 and stored.bytes_by_level["low"] < stored.bytes_by_level["exact"] / 4
    cache, n = cc.load_cache(model, ids)
    report = cc.last_report
    assert n == 159 and sum(report.levels.values()) == 3 and report.expected_s > 0 and report.actual_s > 0
    assert all(set(c.estimates) == {"exact", "low", "recompute"} for c in report.choices)
    # A link so slow that any transfer loses to prefill: the controller recomputes from the first chunk.
    slow = ThroughputMeter(bandwidth_Bps=10.0, prefill_tokens_per_s=1e4)
    cc_slow = ContextCache(client, "t-auto", None, "auto", chunk_tokens=CHUNK, auto_levels=("exact", "low"),
                           meter=slow)
    assert cc_slow.load_cache(model, ids) == (None, 0)
    assert [c.choice for c in cc_slow.last_report.choices] == ["recompute"]
    assert torch.equal(cc_slow.generate(model, ids, max_new_tokens=NEW), ref)
    # The quality floor excludes "low": only the lossless level may be loaded.
    strict = ContextCache(client, "t-auto", None, "auto", chunk_tokens=CHUNK, auto_levels=("exact", "low"),
                          quality={"exact": 0.0, "low": 0.2}, max_quality_loss=0.05,
                          meter=ThroughputMeter(bandwidth_Bps=1e5, prefill_tokens_per_s=1.0))
    strict.load_cache(model, ids)
    assert strict.last_report.levels == {"exact": 3}


def test_load_retrieval_cache_lossless_matches_retrieval_from_prefill(smol, client, prompt, texts_path):
    from kvrecall.models import long_token_ids
    from kvrecall.retrieval_cache import RetrievalCache
    from kvrecall.retriever import calibrate

    model, tok = smol
    ids, kv, _ = prompt
    calib = long_token_ids(tok, read_texts(texts_path / "gutenberg")[1:], 512)
    profile = calibrate(model, calib, model_id="t", bits=6, niter=3, chunk=512, progress=False)
    cc = ContextCache(client, "t-retrieval", None, "exact", chunk_tokens=CHUNK)
    cc.store(None, ids, kv=kv)
    outs = []
    try:
        for make in (lambda: cc.load_retrieval_cache(model, ids, profile, budget=0.1, sinks=4, window=16),
                     lambda: RetrievalCache.from_kv(model, profile, kv[:, :, :, :-1], budget=0.1, sinks=4, window=16)):
            rcache = make()
            assert rcache.get_seq_length() == ids.numel() - 1
            outs.append(model.generate(ids[None], max_new_tokens=6, do_sample=False, temperature=None, top_p=None,
                                       top_k=None, **cache_kwargs(model, rcache)))
            rcache.restore_attention()
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(outs[0], outs[1])


def test_bad_arguments(client, prompt):
    ids, kv, _ = prompt
    for kwargs in ({"level": "no-such-level"}, {"chunk_tokens": 0}, {"level": "auto", "auto_levels": ("x",)},
                   {"level": "auto", "auto_levels": ()}, {"decode_workers": 0}, {"max_quality_loss": -1.0}):
        with pytest.raises(ContextCacheError):
            ContextCache(client, "m", None, **kwargs)
    with pytest.raises(ContextCacheError):
        ContextCache(client, "", None)
    cc = ContextCache(client, "m", None)
    with pytest.raises(ContextCacheError):
        cc.store(None, ids[:10], kv=kv[:, :, :, :11])
    with pytest.raises(ContextCacheError):
        cc.store(None, ids)  # neither a model nor kv
    with pytest.raises(ContextCacheError):
        cc.load(ids[None].repeat(2, 1))
    with pytest.raises(ContextCacheError):
        cc.load(ids.float())


def test_raw_chunks_round_trip_and_reject_damage():
    from kvrecall.loading_raw import RawChunkError, decode_raw, encode_raw, is_raw

    x = torch.randn(2, 2, 3, 5, 8)
    exact = encode_raw(x, "exact")
    assert is_raw(exact) and torch.equal(decode_raw(exact), x)
    half = decode_raw(bytearray(encode_raw(x, "fp16")))
    assert half.dtype == torch.float16 and torch.equal(half, x.half())
    assert decode_raw(encode_raw(x.bfloat16(), "exact"), dtype=torch.float32).dtype == torch.float32
    for bad in (exact[:-4], b"KVRAW\x01" + exact[6:7] + b"\x00" * 3, b"nope" * 10):
        with pytest.raises(RawChunkError):
            decode_raw(bad)
    with pytest.raises(RawChunkError):
        encode_raw(x, "int3")
    with pytest.raises(RawChunkError):
        encode_raw(x[0], "fp16")
