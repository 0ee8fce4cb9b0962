"""KV codec round trips on real model KV (stories260K and fixture-hd64), header parsing, error cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvrecall.encoder import (
    LEVELS,
    ChunkHeader,
    CodecError,
    CodecProfile,
    decode,
    decode_many,
    decode_symbols,
    dequantize,
    encode,
    parse_header,
    quantize,
)
from kvrecall.encoder.quantize import layer_step_factors


def _kv(model_tok, text: str, start: int, n: int) -> torch.Tensor:
    from kvrecall.models import prefill_kv, tokenize

    model, tok = model_tok
    ids = tokenize(tok, text, start + n)
    return prefill_kv(model, ids)[:, :, :, start : start + n].contiguous()


@pytest.fixture(scope="module")
def stories_kv(stories, sotu_text):
    return _kv(stories, sotu_text, 0, 200)


@pytest.fixture(scope="module")
def stories_profile(stories, texts_path):
    from kvrecall.models import long_token_ids, prefill_kv, read_texts

    model, tok = stories
    ids = long_token_ids(tok, read_texts(texts_path / "gutenberg", limit=3), 1024)
    samples = [prefill_kv(model, ids[:512]), prefill_kv(model, ids[512:])]
    return CodecProfile.calibrate(samples, "stories260K-test")


@pytest.fixture(scope="module")
def hd64_kv(hd64, sotu_text):
    return _kv(hd64, sotu_text, 0, 96)


def _assert_roundtrip(kv, profile, level, **kw):
    data = encode(kv, profile, level)
    got = decode(data, profile, **kw)
    want = dequantize(quantize(kv, profile, level), dtype=kw.get("dtype"))
    assert got.shape == kv.shape
    assert got.dtype == (kw.get("dtype") or kv.dtype)
    assert torch.equal(got, want)
    return data, got


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("use_profile", [True, False])
def test_roundtrip_equals_quantized_every_level(stories_kv, stories_profile, level, use_profile):
    profile = stories_profile if use_profile else None
    data, got = _assert_roundtrip(stories_kv, profile, level)
    rel = float((got - stories_kv).norm() / stories_kv.norm())
    assert rel < 0.25  # a real approximation, not garbage
    assert len(data) * 8 / stories_kv.numel() < 8  # well under int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 129])
def test_dtypes_and_odd_lengths(stories_kv, stories_profile, dtype, tokens):
    kv = stories_kv[:, :, :, :tokens].to(dtype).contiguous()
    for profile in (stories_profile, None):
        _assert_roundtrip(kv, profile, "medium")


def test_hd64_fallback_and_output_dtype(hd64_kv):
    data, got = _assert_roundtrip(hd64_kv, None, "high")
    _assert_roundtrip(hd64_kv, None, "low", dtype=torch.float16)
    assert float((got - hd64_kv).norm() / hd64_kv.norm()) < 0.05


def test_levels_order_size_and_error(stories_kv, stories_profile):
    sizes, errs = [], []
    for level in LEVELS:
        data = encode(stories_kv, stories_profile, level)
        sizes.append(len(data))
        errs.append(float((decode(data, stories_profile) - stories_kv).norm()))
    assert sizes == sorted(sizes, reverse=True)
    assert errs == sorted(errs)
    assert len(LEVELS) >= 3


def test_profile_beats_fallback_on_size(stories_kv, stories_profile):
    with_p = len(encode(stories_kv, stories_profile, "medium"))
    without = len(encode(stories_kv, None, "medium"))
    assert with_p < without


def test_decode_symbols_is_the_quantized_working_form(stories_kv, stories_profile):
    data = encode(stories_kv, stories_profile, "low")
    q = decode_symbols(data, stories_profile)
    ref = quantize(stories_kv, stories_profile, "low")
    assert q.symbols.dtype == torch.int16
    assert torch.equal(q.symbols, ref.symbols)
    assert torch.equal(q.step, ref.step) and torch.equal(q.offset, ref.offset)
    assert q.profile_id == stories_profile.profile_id and q.level == "low" and q.keys_pre_rope


def test_decode_many_matches_decode(stories_kv, stories_profile, hd64_kv):
    chunks = [stories_kv[:, :, :, s : s + 64].contiguous() for s in range(0, 200, 64)]  # last one is 8 tokens
    blobs = [encode(c, stories_profile, lvl) for c, lvl in zip(chunks, ["high", "medium", "medium", "low"])]
    blobs.append(encode(stories_kv[:, :, :, :5], None, "medium"))
    outs = decode_many(blobs, stories_profile)
    for b, out in zip(blobs, outs):
        assert torch.equal(out, decode(b, stories_profile))
    # fallback chunks of two models in one call
    mixed = decode_many([encode(hd64_kv, None), encode(stories_kv, None)])
    assert mixed[0].shape == hd64_kv.shape and mixed[1].shape == stories_kv.shape


def test_outliers_beyond_calibration_range_still_roundtrip(stories_kv, stories_profile):
    kv = stories_kv.clone()
    kv[2, 0, 1, 5, 3] = 1e4  # far outside anything seen in calibration
    kv[0, 1, 0, 0, :] = -3e3
    data, got = _assert_roundtrip(kv, stories_profile, "medium")
    assert parse_header(data).n_escapes > 0
    assert abs(float(got[2, 0, 1, 5, 3]) - 1e4) < 1.0


def test_header_fields(stories_kv, stories_profile):
    data = encode(stories_kv.to(torch.float16), stories_profile, "low")
    h = parse_header(data)
    assert isinstance(h, ChunkHeader)
    assert h.shape == tuple(stories_kv.shape) and h.dtype == torch.float16 and h.level == "low"
    assert h.profile_id == stories_profile.profile_id and h.keys_pre_rope
    assert h.n_streams == h.stream_word_counts.size == h.stream_word_offsets.size
    assert h.symbols_per_stream == stories_kv.shape[3] * h.channels_per_stream
    assert h.total_len == len(data)
    assert h.payload_offset + 2 * h.payload_words + 4 == len(data)
    h2 = parse_header(encode(stories_kv, None))
    assert h2.profile_id is None and h2.tables_len > 0 and h2.scales_len > 0


def test_error_cases(stories_kv, stories_profile, hd64_kv):
    data = encode(stories_kv, stories_profile, "medium")
    with pytest.raises(CodecError, match="profile"):
        decode(data)  # needs its profile
    other = CodecProfile.calibrate([stories_kv], "other-model")
    with pytest.raises(CodecError, match="needs codec profile"):
        decode(data, other)
    with pytest.raises(CodecError, match="does not match profile"):
        encode(hd64_kv, stories_profile)
    bad_version = bytearray(data)
    bad_version[4] = 9
    with pytest.raises(CodecError, match="version 9"):
        decode(bytes(bad_version), stories_profile)
    with pytest.raises(CodecError, match="checksum"):
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 1
        decode(bytes(flipped), stories_profile)
    with pytest.raises(CodecError, match="truncated|size|checksum"):
        decode(data[:-10], stories_profile)
    with pytest.raises(CodecError, match="magic"):
        decode(b"XXXX" + data[4:], stories_profile)
    with pytest.raises(CodecError):
        decode("not bytes")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="level"):
        encode(stories_kv, None, "ultra")
    with pytest.raises(CodecError, match="shape"):
        encode(stories_kv[0])
    with pytest.raises(CodecError, match="NaN"):
        bad = stories_kv.clone()
        bad[0, 0, 0, 0, 0] = float("nan")
        encode(bad)
    with pytest.raises(CodecError, match="dtype"):
        encode(stories_kv.double())
    with pytest.raises(CodecError, match="empty"):
        encode(stories_kv[:, :, :, :0])


def test_constant_zero_and_huge_tensors(stories_kv, stories_profile):
    for kv in (torch.zeros_like(stories_kv), torch.full_like(stories_kv, 3.5)):
        data, got = _assert_roundtrip(kv, None, "medium")
        assert torch.allclose(got, kv, atol=1e-2)
    huge = stories_kv.clone()
    huge[1] = 1e30  # beyond fp16 (fallback offsets) and the int16 symbol range: lossy but still exact round trip
    for profile in (None, stories_profile):
        _assert_roundtrip(huge, profile, "low")


def test_quantize_keeps_step_per_channel_constant_over_tokens(stories_kv, stories_profile):
    q = quantize(stories_kv, stories_profile, "medium")
    assert q.step.shape == (*stories_kv.shape[:3], stories_kv.shape[4])
    np.testing.assert_array_equal(q.step.numpy(), stories_profile.step[LEVELS.index("medium")])
    # early layers get finer steps than late ones (per-layer-group allocation)
    factors = layer_step_factors(stories_kv.shape[0])
    assert np.all(np.diff(factors) >= 0) and factors[0] < factors[-1]
    assert stories_profile.info["calibration_tokens"] == 1024


def test_encode_many_gives_the_same_bytes(stories_kv, stories_profile):
    from kvrecall.encoder import encode_many

    chunks = [stories_kv[:, :, :, s : s + 64].contiguous() for s in range(0, 200, 64)]
    for profile in (stories_profile, None):
        assert encode_many(chunks, profile, "low") == [encode(c, profile, "low") for c in chunks]
    with pytest.raises(CodecError):
        encode_many(stories_kv)  # type: ignore[arg-type]


def test_native_and_numpy_coders_agree(stories_kv, stories_profile, hd64_kv, monkeypatch):
    """The optional C fast path (kvrecall.encoder.native) must give the numpy reference's bytes and tensors."""
    from kvrecall.encoder import native

    if not native.available():
        pytest.skip(f"native rANS path not built: {native.unavailable_reason()}")
    chunks = [stories_kv[:, :, :, :128].contiguous(), stories_kv[:, :, :, 128:].contiguous()]
    fast = [encode(c, stories_profile, "low") for c in chunks] + [encode(hd64_kv, None, "medium")]
    fast_dec = decode_many(fast[:2], stories_profile) + [decode(fast[2])]
    monkeypatch.setenv("KVRECALL_NATIVE", "0")
    assert not native.available()
    slow = [encode(c, stories_profile, "low") for c in chunks] + [encode(hd64_kv, None, "medium")]
    assert slow == fast
    slow_dec = decode_many(slow[:2], stories_profile) + [decode(slow[2])]
    for a, b in zip(fast_dec, slow_dec):
        assert torch.equal(a, b)
