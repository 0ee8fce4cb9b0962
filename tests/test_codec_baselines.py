"""Round-trip and faithfulness tests of the bench's baseline codecs (bench/codec_baselines.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cb = _load("codec_baselines")
cm = _load("codec_metrics")


def _kv(layers=3, heads=2, tokens=40, head_dim=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, heads, tokens, head_dim, generator=g)


# ---------------------------------------------------------------- arithmetic coder


def _ideal_bits(sym: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    bounds = cb._cdf_bounds(cdf)
    s = sym.astype(np.int64)
    freq = np.take_along_axis(bounds, s + 1, 1) - np.take_along_axis(bounds, s, 1)
    return (-np.log2(freq / 65536.0)).sum(1)


@pytest.mark.parametrize("tokens", [1, 2, 17, 256])
def test_arith_roundtrip_and_length_near_ideal(tokens):
    rng = np.random.default_rng(tokens)
    streams = 40
    probs = rng.dirichlet(np.full(31, 0.2), size=streams)
    sym = np.stack([rng.choice(31, size=tokens, p=p) for p in probs]).astype(np.uint8)
    cdf = cb._cachegen_cdf(sym, 32)
    payload, lengths = cb.arith_encode(sym, cdf)
    assert lengths.sum() == len(payload)
    np.testing.assert_array_equal(cb.arith_decode(payload, lengths, cdf, tokens), sym)
    # An arithmetic coder spends the ideal code length plus at most ~2 flush bits, rounded up to whole bytes.
    assert np.all(lengths <= np.ceil((_ideal_bits(sym, cdf) + 2.01) / 8) + 1)


def _reference_encode_one(sym: list[int], cdf: list[int]) -> bytes:
    """Scalar transcription of LMCache's ``encode_kernel`` (csrc/ac_enc.cu) for one stream, bit by bit."""
    low, high, pending, out = 0, 0xFFFFFFFF, 0, []

    def put(bit: int) -> None:
        nonlocal pending
        out.append(bit)
        out.extend([1 - bit] * pending)
        pending = 0

    max_symbol = len(cdf) - 2
    for s in sym:
        span = high - low + 1
        c_low = cdf[s]
        c_high = 0x10000 if s == max_symbol else cdf[s + 1]
        high = (low - 1 + ((span * c_high) >> 16)) & 0xFFFFFFFF
        low = (low + ((span * c_low) >> 16)) & 0xFFFFFFFF
        while True:
            if high < 0x80000000:
                put(0)
                low, high = (low << 1) & 0xFFFFFFFF, ((high << 1) | 1) & 0xFFFFFFFF
            elif low >= 0x80000000:
                put(1)
                low, high = (low << 1) & 0xFFFFFFFF, ((high << 1) | 1) & 0xFFFFFFFF
            elif low >= 0x40000000 and high < 0xC0000000:
                pending += 1
                low, high = (low << 1) & 0x7FFFFFFF, ((high << 1) | 0x80000001) & 0xFFFFFFFF
            else:
                break
    pending += 1
    put(0 if low < 0x40000000 else 1)
    out.extend([0] * (-len(out) % 8))
    return bytes(int("".join(map(str, out[i : i + 8])), 2) for i in range(0, len(out), 8))


def test_arith_encoder_matches_lmcache_kernel_bit_for_bit():
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.full(31, 0.1), size=12)
    sym = np.stack([rng.choice(31, size=90, p=p) for p in probs]).astype(np.uint8)
    cdf = cb._cachegen_cdf(sym, 32)
    payload, lengths = cb.arith_encode(sym, cdf)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for i in range(len(sym)):
        expected = _reference_encode_one(sym[i].tolist(), cdf[i].tolist())
        assert payload[starts[i] : starts[i + 1]].tobytes() == expected


def test_arith_rare_symbols_and_constant_streams():
    tokens = 64
    sym = np.zeros((4, tokens), np.uint8)
    sym[1] = 30  # top symbol of a 32-bin alphabet
    sym[2, ::7] = 31  # the alphabet's last symbol (frequency floor only in a skewed table)
    sym[3] = np.arange(tokens) % 31
    cdf = cb._cachegen_cdf(sym, 32)
    skew = cb._cachegen_cdf(np.zeros((4, 1000), np.uint8), 32)  # symbol 31 gets the minimum frequency of 1/65536
    for table in (cdf, skew):
        payload, lengths = cb.arith_encode(sym, table)
        np.testing.assert_array_equal(cb.arith_decode(payload, lengths, table, tokens), sym)


def test_arith_decode_rejects_inconsistent_lengths():
    sym = np.ones((2, 8), np.uint8)
    cdf = cb._cachegen_cdf(sym, 16)
    payload, lengths = cb.arith_encode(sym, cdf)
    with pytest.raises(cb.BaselineError):
        cb.arith_decode(payload[:-1], lengths, cdf, 8)


def test_cdf_matches_lmcache_kernel_formula():
    # calculate_cdf: cdf[i] = (0xFFFF - max_bins) * count(sym < i) / tokens (integer) + i
    sym = np.array([[0, 0, 1, 3]], np.uint8)
    cdf = cb._cachegen_cdf(sym, 4)
    scale = 0xFFFF - 4
    expected = [0, scale * 2 // 4 + 1, scale * 3 // 4 + 2, scale * 3 // 4 + 3, scale * 4 // 4 + 4]
    assert cdf.tolist() == [expected]


# ---------------------------------------------------------------- CacheGen


def test_cachegen_bins_reproduce_released_config_at_32_layers():
    k, v = cb.cachegen_bins(32, "2")
    assert k.tolist() == [32] * 10 + [16] * 22
    assert v.tolist() == [32] * 2 + [16] * 30
    k5, v5 = cb.cachegen_bins(5, "2")
    assert k5.tolist() == [32, 32, 16, 16, 16] and v5.tolist() == [32, 16, 16, 16, 16]
    k1, _ = cb.cachegen_bins(32, "1")
    assert sorted(set(k1.tolist())) == [12, 16]
    with pytest.raises(cb.BaselineError):
        cb.cachegen_bins(5, "4")


@pytest.mark.parametrize("level", ["1", "2", "3"])
def test_cachegen_decodes_exactly_the_released_quantizer(level):
    kv = _kv(layers=4, heads=2, tokens=300, head_dim=8).half().float()  # fp16 cache, as served
    codec = cb.CacheGenCodec(level)
    out = codec.decode(codec.encode(kv))
    # Independent reference of LMCache's torch_quant_vectorized + do_dequantize, per 256-token chunk.
    key_bins, value_bins = cb.cachegen_bins(4, level)
    x = kv.permute(1, 0, 3, 2, 4).reshape(2, 4, 300, 16)
    ref = torch.empty_like(x)
    for kind, bins in ((0, key_bins), (1, value_bins)):
        mx = torch.tensor(bins // 2 - 1, dtype=torch.float32)[:, None, None]
        amax = x[kind].abs().amax(-1, keepdim=True)
        q = torch.round(x[kind] * (mx / amax) + mx)
        ref[kind] = (q - mx) / mx * amax
    ref = ref.reshape(2, 4, 300, 2, 8).permute(1, 0, 3, 2, 4)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_cachegen_counts_every_byte():
    L, H, T, D = 3, 2, 300, 8
    codec = cb.CacheGenCodec("2")
    data = codec.encode(_kv(L, H, T, D))
    side = codec.side_info_bytes(L, H, T, D)
    # per chunk and K/V: fp16 absmax per (layer, token), a 33-entry int16 CDF and an int32 length per stream
    assert side == 16 + sum(2 * (L * t * 2 + L * H * D * (33 * 2 + 4)) for t in (256, 44))
    assert len(data) > side


def test_cachegen_rejects_corrupt_streams():
    codec = cb.CacheGenCodec("2")
    data = codec.encode(_kv(tokens=20))
    with pytest.raises(cb.BaselineError):
        codec.decode(data[:-3])
    with pytest.raises(cb.BaselineError):
        codec.decode(b"XXXX" + data[4:])
    with pytest.raises(cb.BaselineError):
        codec.decode(data + b"\0")
    broken = bytearray(data)
    off = 16 + 3 * 20 * 2  # start of the key CDF table of chunk 0
    broken[off : off + 4] = b"\xff\x7f\x00\x00"
    with pytest.raises(cb.BaselineError):
        codec.decode(bytes(broken))


@settings(max_examples=30, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000), flip=st.integers(min_value=0, max_value=10_000))
def test_baselines_never_crash_on_damaged_input(cut, flip):
    kv = _kv(layers=2, heads=1, tokens=33, head_dim=8)
    for codec in cb.baseline_codecs(quick=True):
        data = codec.encode(kv)
        damaged = bytearray(data[: cut % (len(data) + 1)])
        if damaged:
            damaged[flip % len(damaged)] ^= 0x5A
        try:
            out = codec.decode(bytes(damaged))
        except cb.BaselineError:
            continue
        assert out.shape == kv.shape


# ---------------------------------------------------------------- simple baselines


def test_fp16_and_zstd_are_lossless_after_fp16():
    kv = _kv()
    for codec in (cb.Fp16Codec(), cb.Fp16ZstdCodec(3)):
        data = codec.encode(kv)
        torch.testing.assert_close(codec.decode(data), kv.half().float(), rtol=0, atol=0)
    assert len(cb.Fp16Codec().encode(kv)) == 16 + kv.numel() * 2


def test_int8_per_token_error_and_size():
    kv = _kv(layers=2, heads=4, tokens=50, head_dim=8)
    codec = cb.Int8TokenCodec()
    data = codec.encode(kv)
    assert len(data) == 16 + 2 * 2 * 50 * 2 + kv.numel()
    out = codec.decode(data)
    flat = kv.permute(0, 1, 3, 2, 4).flatten(3)
    scale = (flat.abs().amax(-1, keepdim=True) / 127).half().float()
    err = (out - kv).permute(0, 1, 3, 2, 4).flatten(3).abs()
    assert torch.all(err <= scale / 2 + 1e-6)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("tokens", [64, 70])
def test_kivi_groups_error_bound_and_residual(bits, tokens):
    L, H, D = 2, 2, 16
    kv = _kv(L, H, tokens, D)
    codec = cb.KiviCodec(bits)
    data = codec.encode(kv)
    out = codec.decode(data)
    tq = 64
    # keys: per channel, groups of 32 tokens; error <= half a step of that group's fp16 scale (+ fp16 zero rounding)
    k = kv[:, 0, :, :tq].reshape(L, H, 2, 32, D)
    step = ((k.amax(3) - k.amin(3)) / (2**bits - 1)).half().float()
    kerr = (out[:, 0, :, :tq] - kv[:, 0, :, :tq]).reshape(L, H, 2, 32, D).abs().amax(3)
    assert torch.all(kerr <= step / 2 + 2e-3)
    # values: per token, groups of 32 channels of heads*head_dim
    v = kv[:, 1, :, :tq].permute(0, 2, 1, 3).reshape(L, tq, 1, 32)
    vstep = ((v.amax(-1) - v.amin(-1)) / (2**bits - 1)).half().float()
    verr = (out[:, 1, :, :tq] - kv[:, 1, :, :tq]).permute(0, 2, 1, 3).reshape(L, tq, 1, 32).abs().amax(-1)
    assert torch.all(verr <= vstep / 2 + 2e-3)
    # KIVI's full-precision residual: the incomplete last group stays fp16
    torch.testing.assert_close(out[:, :, :, tq:], kv[:, :, :, tq:].half().float(), rtol=0, atol=0)
    groups = L * H * 2 * D + L * tq * 1
    assert len(data) == 16 + groups * 4 + (L * H * tq * D * 2 * bits) // 8 + L * 2 * H * (tokens - tq) * D * 2


def test_baselines_reject_bad_shapes():
    for codec in cb.baseline_codecs(quick=True):
        with pytest.raises(cb.BaselineError):
            codec.encode(torch.zeros(2, 3, 1, 4, 8))
        with pytest.raises(cb.BaselineError):
            codec.encode(torch.zeros(2, 2, 1, 0, 8))


def test_all_zero_input_decodes_to_zero():
    kv = torch.zeros(2, 2, 1, 40, 8)
    for codec in cb.baseline_codecs(quick=True):
        out = codec.decode(codec.encode(kv))
        assert torch.all(out == 0), codec.name


# ---------------------------------------------------------------- metrics


def test_attention_output_matches_sdpa_and_entropy():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 3, 8, generator=g)
    k, v = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1))
    torch.testing.assert_close(cm.attention_output(q, k, v), ref)
    assert math.isclose(cm.empirical_entropy_bits(np.array([0, 1, 0, 1])), 4.0)
    assert cm.empirical_entropy_bits(np.array([3, 3, 3])) == 0.0


def test_next_token_stats_zero_for_identical_logits():
    logits = torch.randn(5, 11)
    kl, n, nll = cm.next_token_stats(logits, logits, torch.arange(5))
    assert kl == 0.0 and n == 5 and nll > 0


# ---------------------------------------------------------------- the bench end to end (real model, real text)


def test_bench_quick_runs_on_real_model(stories_path, texts_path, tmp_path):
    codec_bench = _load("codec")
    out = tmp_path / "q.json"
    rc = codec_bench.main(["--quick", "--models", str(stories_path), "--n-texts", "1", "--repeats", "1",
                           "--texts", str(texts_path / "state_union"), "--calib-texts", str(texts_path / "gutenberg"),
                           "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {(r["codec"], r["level"]): r for r in result["rows"]}
    assert abs(rows[("fp16", "-")]["bits_per_element"] - 16) < 0.01
    assert rows[("fp16", "-")]["kl"] < 1e-5
    assert rows[("int8-token", "-")]["kl"] < rows[("cachegen", "2")]["kl"]
    ours = [r for r in result["rows"] if r["codec"] == "kvrecall"]
    if ours:  # levels are listed finest first: the finest must cost more bits and lose less
        assert ours[0]["bits_per_element"] > ours[-1]["bits_per_element"] and ours[0]["kl"] < ours[-1]["kl"]
    assert rows[("int8-token", "-")]["kl"] < rows[("kivi-2bit", "g32")]["kl"]
    for r in result["rows"]:
        for key in ("model", "codec", "level", "bits_per_element", "kv_rel_err", "attn_rel_err", "kl",
                    "ppl_delta_pct", "encode_MBps", "decode_MBps"):
            assert key in r
    assert "targets" in result and out.with_suffix(".png").is_file()


def test_coder_overhead_of_fallback_chunks_is_measured_against_their_own_tables():
    enc = pytest.importorskip("kvrecall.encoder")
    if not hasattr(enc, "encode"):
        pytest.skip("kvrecall.encoder has no encode yet")
    codec_bench = _load("codec")
    ours = codec_bench.OurCodec(enc, None, "medium")
    blobs = [ours.encode(_kv(layers=2, heads=2, tokens=256, head_dim=16, seed=s)) for s in range(2)]
    result = codec_bench.coder_overhead({"x": (ours, blobs)})
    assert result is not None
    # a fallback chunk carries its own tables, so pooling per table over chunks is the per-chunk entropy
    assert result["pooled_pct"] == pytest.approx(result["per_chunk_pct"])
    # the coder cannot beat the ideal code length of its own tables (beyond a few bits of state)
    assert -0.1 < result["table_ideal_pct"] < 5.0
    assert result["table_ideal_pct"] <= result["pooled_pct"] + 1e-9


@pytest.mark.parametrize("post_rope", [False, True])
def test_harness_scores_an_identity_codec_as_lossless(stories, texts_path, post_rope):
    codec_bench = _load("codec")
    model, tok = stories

    class Identity(cb.BaselineCodec):
        def encode(self, kv):
            return kv.clone()

        def decode(self, data):
            return data

    case = codec_bench.build_cases(model, tok, texts_path / "state_union", 1, 64, 16)[0]
    acc = cm.RowAccumulator()
    codec_bench.measure(model, Identity("identity", "-", post_rope), case, 32, 1, acc)
    assert acc.kv.value == 0.0 and acc.attn.value < 1e-12
    assert acc.kl_sum / acc.kl_n < 1e-10 and abs(acc.nll - acc.nll_ref) < 1e-6
    # and a real codec is scored as lossy on the same case
    acc8 = cm.RowAccumulator()
    codec_bench.measure(model, cb.KiviCodec(2), case, 32, 1, acc8)
    assert acc8.kv.value > 0.01 and acc8.kl_sum / acc8.kl_n > 1e-6
