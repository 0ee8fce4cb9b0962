import pytest
import torch

from kvrecall.models import (
    ModelError,
    apply_rope,
    capture_qkv,
    kv_to_cache,
    logits_with_context_kv,
    long_token_ids,
    model_fingerprint,
    model_info,
    output_cache,
    read_texts,
    rope_cos_sin,
    tokenize,
    undo_rope,
)


@pytest.mark.parametrize("which", ["stories", "hd64"])
def test_pre_rope_keys_match_the_models_cache(which, request, sotu_text):
    model, tok = request.getfixturevalue(which)
    ids = tokenize(tok, sotu_text, 200)
    kv = capture_qkv(model, ids).kv()
    info = model_info(model)
    assert kv.shape == (info.num_layers, 2, info.num_kv_heads, 200, info.head_dim)
    cache = output_cache(model(ids[None], use_cache=True))
    cos, sin = rope_cos_sin(model, torch.arange(200))
    for layer in range(info.num_layers):
        torch.testing.assert_close(apply_rope(kv[layer, 0], cos, sin), cache.layers[layer].keys[0])
        torch.testing.assert_close(kv[layer, 1], cache.layers[layer].values[0])
        torch.testing.assert_close(undo_rope(cache.layers[layer].keys[0], cos, sin), kv[layer, 0], atol=1e-4, rtol=1e-4)


def test_continuation_from_kv_equals_full_prefill(stories, sotu_text):
    model, tok = stories
    ids = tokenize(tok, sotu_text, 160)
    full = model(ids[None]).logits[0]
    kv = capture_qkv(model, ids[:120]).kv()
    got = logits_with_context_kv(model, kv, ids[120:])
    torch.testing.assert_close(got, full[120:], atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise_model_error(stories, tmp_path):
    model, _ = stories
    with pytest.raises(ModelError):
        capture_qkv(model, torch.tensor([], dtype=torch.long))
    with pytest.raises(ModelError):
        kv_to_cache(model, torch.randn(2, 2, 4, 5, 8))
    with pytest.raises(ModelError):
        model_fingerprint(tmp_path)
    with pytest.raises(ModelError):
        read_texts(tmp_path / "missing")


def test_long_token_ids_and_fingerprint(stories, stories_path, texts_path):
    _, tok = stories
    ids = long_token_ids(tok, read_texts(texts_path / "state_union"), 5000)
    assert ids.shape == (5000,) and ids[0].item() == tok.bos_token_id
    assert model_fingerprint(stories_path) == model_fingerprint(stories_path)
    with pytest.raises(ModelError):
        long_token_ids(tok, [("x", "short")], 10_000)
