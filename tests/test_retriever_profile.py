"""Retriever profile: calibration, save/load round trip, and clear errors for bad files and mismatches."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrecall.models import long_token_ids, model_fingerprint, read_texts
from kvrecall.retriever import RetrieverError, RetrieverProfile, calibrate


@pytest.fixture(scope="module")
def small_profile(stories, stories_path, texts_path):
    model, tok = stories
    ids = long_token_ids(tok, read_texts(texts_path / "gutenberg"), 1024)
    return calibrate(model, ids, model_id=model_fingerprint(stories_path), model_name="stories260K",
                     kind="pq", m=2, bits=4, chunk=512, niter=3, progress=False)


def test_round_trip(small_profile, tmp_path, stories, stories_path):
    path = tmp_path / "p.safetensors"
    small_profile.save(path)
    loaded = RetrieverProfile.load(path, model=stories[0], model_path=stories_path)
    assert loaded.settings == small_profile.settings
    for name in ("key_transform", "query_transform", "codebooks", "inv_freq"):
        assert torch.equal(getattr(loaded, name), getattr(small_profile, name))
    assert loaded.bits_per_key == 8


def test_transforms_are_inverse_and_codebooks_shaped(small_profile):
    s = small_profile.settings
    prod = small_profile.key_transform @ small_profile.query_transform.transpose(-1, -2)  # L L^{-1} = I
    torch.testing.assert_close(prod, torch.eye(s.head_dim).expand_as(prod), rtol=1e-3, atol=1e-3)
    assert small_profile.codebooks.shape == (s.num_layers, s.num_kv_heads, 2, 16, s.head_dim // 2)


def test_missing_and_corrupted_files(small_profile, tmp_path):
    with pytest.raises(RetrieverError, match="not found"):
        RetrieverProfile.load(tmp_path / "nope.safetensors")
    path = tmp_path / "p.safetensors"
    small_profile.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RetrieverError):
        RetrieverProfile.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(RetrieverError, match="not a readable"):
        RetrieverProfile.load(tmp_path / "junk.safetensors")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_raise_retriever_error(tmp_path, blob):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    with pytest.raises(RetrieverError):
        RetrieverProfile.load(path)


def _rewrite(path, out, meta_fn=None, tensor_fn=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_fn:
        meta = meta_fn(meta)
    if tensor_fn:
        tensors = tensor_fn(tensors)
    save_file(tensors, str(out), metadata=meta)


def test_tampered_files(small_profile, tmp_path):
    path = tmp_path / "p.safetensors"
    small_profile.save(path)
    bad = tmp_path / "bad.safetensors"

    def set_setting(key, value):
        def fn(meta):
            m = json.loads(meta["kvrecall_retriever"])
            m["settings"][key] = value
            return {"kvrecall_retriever": json.dumps(m)}
        return fn

    cases = [
        (dict(meta_fn=lambda m: {}), "metadata"),
        (dict(meta_fn=lambda m: {"kvrecall_retriever": "{not json"}), "JSON"),
        (dict(meta_fn=set_setting("bits", 5)), "shape"),
        (dict(meta_fn=set_setting("kind", "lsh")), "kind"),
        (dict(meta_fn=set_setting("rope_mode", "none")), "rope_mode"),
        (dict(meta_fn=set_setting("surprise", 1)), "unknown"),
        (dict(tensor_fn=lambda t: {**t, "codebooks": t["codebooks"].double()}), "dtype"),
        (dict(tensor_fn=lambda t: {k: v for k, v in t.items() if k != "inv_freq"}), "missing"),
        (dict(tensor_fn=lambda t: {**t, "codebooks": t["codebooks"] * float("nan")}), "NaN"),
    ]
    for kwargs, message in cases:
        _rewrite(path, bad, **kwargs)
        with pytest.raises(RetrieverError, match=message):
            RetrieverProfile.load(bad)


def test_model_mismatch(small_profile, tmp_path, hd64, hd64_path):
    path = tmp_path / "p.safetensors"
    small_profile.save(path)
    with pytest.raises(RetrieverError, match="head_dim"):
        RetrieverProfile.load(path, model=hd64[0])
    with pytest.raises(RetrieverError, match="fingerprint"):
        RetrieverProfile.load(path, model_path=hd64_path)


def test_calibration_rejects_bad_settings(stories):
    model, _ = stories
    ids = torch.arange(100) % 500
    with pytest.raises(RetrieverError):
        calibrate(model, ids, model_id="x", kind="pq", m=3, bits=4, progress=False)  # 3 does not divide 8
    with pytest.raises(RetrieverError):
        calibrate(model, ids, model_id="x", kind="vq", bits=12, progress=False)  # too few tokens
    with pytest.raises(RetrieverError):
        calibrate(model, ids, model_id="x", kind="lsh", progress=False)
    with pytest.raises(RetrieverError):
        calibrate(model, ids, model_id="x", kind="pq", m=2, bits=4, rope_mode="nope", progress=False)


def test_cli_calibrate_retriever(tmp_path, stories_path, texts_path, capsys):
    from kvrecall.cli import main

    out = tmp_path / "cli.safetensors"
    rc = main(["calibrate-retriever", "--model", str(stories_path), "--texts", str(texts_path / "gutenberg"),
               "--out", str(out), "--kind", "pq", "--m", "4", "--bits", "3", "--tokens", "600", "--chunk", "300",
               "--niter", "2", "--no-progress"])
    assert rc == 0 and out.is_file()
    prof = RetrieverProfile.load(out, model_path=stories_path)
    assert prof.settings.bits_per_key == 12 and prof.settings.rope_mode == "positional"
    assert "wrote" in capsys.readouterr().out
    rc = main(["calibrate-retriever", "--model", str(tmp_path), "--texts", str(texts_path), "--out", str(out), "--no-progress"])
    assert rc == 2 and "error" in capsys.readouterr().err


def test_cli_calibrate_retriever_bad_input_is_one_line_and_exit_2(tmp_path, texts_path, capsys):
    from kvrecall.cli import main

    out = tmp_path / "x.safetensors"
    for argv in (["--model", "no-such-model", "--texts", str(texts_path)],
                 ["--model", "smollm2-135m", "--texts", str(tmp_path / "missing")],
                 ["--model", "smollm2-135m", "--texts", str(texts_path), "--tokens", "0"]):
        rc = main(["calibrate-retriever", *argv, "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("calibrate-retriever: error:") and err.count("\n") == 1, err
    assert not out.exists()


def test_calibrate_defaults_come_from_kvrecall_defaults():
    import inspect

    from kvrecall import defaults

    params = inspect.signature(calibrate).parameters
    assert params["rope_mode"].default == defaults.RETRIEVER_ROPE_MODE == "positional"
    assert params["bits"].default == defaults.RETRIEVER_BITS
    assert params["kind"].default == defaults.RETRIEVER_KIND
