"""Codec profile: calibration, save/load round trip, bad files, and the calibrate-codec CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kvrecall.encoder import LEVELS, CodecError, CodecProfile, decode, encode


@pytest.fixture(scope="module")
def samples(stories, texts_path):
    from kvrecall.models import long_token_ids, prefill_kv, read_texts

    model, tok = stories
    ids = long_token_ids(tok, read_texts(texts_path / "gutenberg", limit=3), 768)
    return [prefill_kv(model, ids[:512]), prefill_kv(model, ids[512:])]


@pytest.fixture(scope="module")
def profile(samples):
    return CodecProfile.calibrate(samples, "stories-test")


def test_calibrated_profile_shapes_and_rules(profile, samples):
    layers, _, heads, _, head_dim = samples[0].shape
    n = len(LEVELS)
    assert profile.step.shape == (n, layers, 2, heads, head_dim)
    assert profile.offset.shape == (layers, 2, heads, head_dim)
    assert profile.delta.shape == (n, layers, 2)
    assert np.all(profile.step > 0)
    # coarser levels have larger steps everywhere
    assert np.all(np.diff(profile.step, axis=0) > 0)
    for li in range(n):
        ts = profile.tableset(li)
        assert ts.tmap.max() < len(ts.freqs)
        assert all(int(f.sum()) == 1 << profile.scale_bits and f.min() >= 1 for f in ts.freqs)


def test_profile_id_is_stable_and_content_sensitive(profile, samples):
    again = CodecProfile.calibrate(samples, "stories-test")
    assert again.profile_id == profile.profile_id
    assert len(profile.profile_id) == 16
    assert CodecProfile.calibrate(samples, "another-model").profile_id != profile.profile_id
    assert CodecProfile.calibrate(samples[:1], "stories-test").profile_id != profile.profile_id


def test_save_load_roundtrip(profile, samples, tmp_path):
    path = profile.save(tmp_path / "p.safetensors")
    loaded = CodecProfile.load(path)
    assert loaded.profile_id == profile.profile_id
    assert loaded.model_id == profile.model_id and loaded.info == profile.info
    np.testing.assert_array_equal(loaded.step, profile.step)
    kv = samples[1][:, :, :, :100]
    data = encode(kv, profile, "medium")
    assert encode(kv, loaded, "medium") == data
    assert torch.equal(decode(data, loaded), decode(data, profile))
    assert b"pickle" not in path.read_bytes()[:64]


def test_load_rejects_bad_files(profile, tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with pytest.raises(CodecError, match="not found"):
        CodecProfile.load(tmp_path / "missing")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CodecError, match="safetensors"):
        CodecProfile.load(junk)
    good = profile.save(tmp_path / "good")
    truncated = tmp_path / "trunc"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CodecError):
        CodecProfile.load(truncated)
    tensors = load_file(str(good))
    with safe_open(str(good), framework="numpy") as f:
        meta = json.loads(f.metadata()["kvrecall"])
    # content changed but id kept -> mismatch
    t2 = dict(tensors)
    t2["step"] = tensors["step"] * 1.5
    save_file(t2, str(tmp_path / "tampered"), metadata={"kvrecall": json.dumps(meta)})
    with pytest.raises(CodecError, match="does not match its id"):
        CodecProfile.load(tmp_path / "tampered")
    # wrong version / not a profile / missing tensor / broken table
    for name, m, t in [
        ("version", {**meta, "version": 99}, tensors),
        ("format", {**meta, "format": "something-else"}, tensors),
        ("missing", meta, {k: v for k, v in tensors.items() if k != "offset"}),
        ("table", meta, {**tensors, "table_freq.0": tensors["table_freq.0"] + 1}),
        ("tmap", meta, {**tensors, "tmap": tensors["tmap"] + 10_000}),
    ]:
        save_file(t, str(tmp_path / name), metadata={"kvrecall": json.dumps(m)})
        with pytest.raises(CodecError):
            CodecProfile.load(tmp_path / name)
    save_file(tensors, str(tmp_path / "nometa"))
    with pytest.raises(CodecError, match="not a kvrecall codec profile"):
        CodecProfile.load(tmp_path / "nometa")


def test_calibrate_rejects_bad_samples(samples):
    with pytest.raises(CodecError):
        CodecProfile.calibrate([], "m")
    with pytest.raises(CodecError):
        CodecProfile.calibrate([samples[0], samples[0][:2]], "m")
    bad = samples[0].clone()
    bad[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(CodecError):
        CodecProfile.calibrate([bad], "m")


def test_importance_weights_change_key_steps(stories, samples):
    from kvrecall.encoder.calibrate import (
        calibrate_profile,
        collect_calibration_kv,
        key_importance_from_queries,
        value_importance_from_model,
    )
    from kvrecall.models import model_info

    model, tok = stories
    kvs, qs = collect_calibration_kv(model, tok, [("t", "Once upon a time there was a little dog. " * 20)], 200)
    info = model_info(model)
    kw = key_importance_from_queries(qs, info.num_kv_heads)
    vw = value_importance_from_model(model)
    assert kw.shape == vw.shape == (info.num_layers, info.num_kv_heads, info.head_dim)
    plain = calibrate_profile(kvs, "m")
    weighted = calibrate_profile(kvs, "m", key_importance=kw, value_importance=vw)
    ratio = weighted.step[1, :, 0] / plain.step[1, :, 0]
    # channels with larger query energy get finer steps
    assert np.corrcoef(np.log(ratio).ravel(), np.log(kw).ravel())[0, 1] < -0.5
    # the public entry point computes the same key weighting from the queries
    via_api = CodecProfile.calibrate(kvs, "m", query_samples=qs)
    np.testing.assert_array_equal(via_api.step, calibrate_profile(kvs, "m", key_importance=kw).step)


def test_cli_calibrate_codec_writes_loadable_profile(stories_path, texts_path, tmp_path, samples):
    from kvrecall.cli import main

    out = tmp_path / "prof.safetensors"
    rc = main(["calibrate-codec", "--model", str(stories_path), "--texts", str(texts_path / "gutenberg"),
               "--out", str(out), "--max-tokens", "600"])
    assert rc == 0
    p = CodecProfile.load(out)
    assert p.info["calibration_tokens"] == 600
    from kvrecall.models import model_fingerprint

    assert p.model_id == model_fingerprint(stories_path)
    kv = samples[1][:, :, :, :64]
    assert decode(encode(kv, p, "high"), p).shape == kv.shape
    # bad arguments give a clean non-zero exit
    assert main(["calibrate-codec", "--model", str(tmp_path), "--texts", str(texts_path), "--out", str(out)]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["calibrate-codec", "--model", str(stories_path), "--texts", str(empty), "--out", str(out)]) == 2
    shutil.rmtree(empty)
