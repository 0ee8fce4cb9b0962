"""Format version 2 on SmolLM2: attention sinks stored exactly, per-token value scales, the lossless mode,
version-1 chunks still read."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from kvrecall.encoder import (
    LEVELS,
    CodecError,
    CodecProfile,
    decode,
    decode_many,
    decode_symbols,
    dequantize,
    encode,
    encode_many,
    parse_chunk,
    parse_header,
    quantize,
)
from kvrecall.encoder.format import HEADER_SIZE, HEADER_SIZE_V1
from kvrecall.encoder.quantize import LOSSLESS, find_sink_tokens


@pytest.fixture(scope="module")
def smol_case(smollm2, texts_path):
    """SmolLM2 prefill KV of 256 + 32 tokens of a state_union text, and a profile calibrated on gutenberg."""
    from kvrecall.encoder.calibrate import key_importance_from_queries
    from kvrecall.models import capture_qkv, read_texts, tokenize

    model, tok = smollm2
    ids = tokenize(tok, (texts_path / "state_union" / "1946-Truman.txt").read_text()[:8000], 288)
    qkv = capture_qkv(model, ids)
    kv = qkv.kv()[:, :, :, :256].contiguous()
    calib = [capture_qkv(model, tokenize(tok, t[:8000], 256)) for _, t in read_texts(texts_path / "gutenberg", limit=2)]
    kvs = [c.kv() for c in calib]
    profile = CodecProfile.calibrate(kvs, "smollm2-test", key_importance=key_importance_from_queries(
        [c.q for c in calib], kv.shape[2]))
    return model, kv, ids[256:], profile


def test_sink_token_found_on_smollm2_and_nowhere_else(smol_case):
    _, kv, _, _ = smol_case
    assert find_sink_tokens(kv).tolist() == [0]  # the position-0 attention sink
    assert find_sink_tokens(kv[:, :, :, 1:].contiguous()).numel() == 0  # a chunk without it has none


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_smollm2_roundtrip_every_level_and_dtype(smol_case, dtype):
    _, kv, _, profile = smol_case
    x = kv[:, :, :, :96].contiguous().to(dtype)  # SmolLM2-shaped: 30 layers, 3 KV heads, head_dim 64
    levels = (*LEVELS, LOSSLESS) if dtype == torch.float32 else (LEVELS[0], LEVELS[-1], LOSSLESS)
    for level in levels:
        for prof in (profile, None):
            data = encode(x, prof, level)
            got = decode(data, prof)
            want = dequantize(quantize(x, prof, level))
            assert torch.equal(got, want), (level, prof is None)
            h = parse_header(data)
            assert h.version == 2 and h.level == level and h.value_scales == (level != LOSSLESS)
            if level == LOSSLESS:
                assert torch.equal(got, x)  # bit-exact in the input dtype
                assert h.n_exact == x.shape[3] and h.n_streams == 0
            else:
                assert h.n_exact == 1 and parse_chunk(data, prof).exact_tokens().tolist() == [0]
                assert torch.equal(got[:, :, :, 0], x[:, :, :, 0].to(h.exact_dtype).to(dtype))
                q = decode_symbols(data, prof)
                assert torch.equal(q.symbols, quantize(x, prof, level).symbols) and not q.symbols[:, :, :, 0].any()


def test_sink_exact_lowers_next_token_kl_on_smollm2(smol_case):
    """The design change this format exists for, measured for real: KL with the sink exact vs quantized."""
    from kvrecall.models import logits_with_context_kv

    model, kv, cont, profile = smol_case
    ref = torch.log_softmax(logits_with_context_kv(model, kv, cont).double(), -1)

    def kl(y):
        got = torch.log_softmax(logits_with_context_kv(model, y, cont).double(), -1)
        return float((ref.exp() * (ref - got)).sum(-1).mean())

    with_sink = kl(decode(encode(kv, profile, "low"), profile))
    without = kl(decode(encode(kv, profile, "low", exact_tokens=torch.zeros(0, dtype=torch.int64)), profile))
    assert with_sink < 0.5 * without, (with_sink, without)
    assert kl(decode(encode(kv, None, LOSSLESS))) == 0.0


def test_value_token_scales_follow_each_tokens_magnitude(smol_case):
    from kvrecall.encoder.quantize import VALUE_SCALE_TABLE, value_token_exponents

    _, kv, _, profile = smol_case
    data = encode(kv, profile, "medium")
    e = torch.from_numpy(parse_chunk(data, profile).value_exp().copy())
    assert e.shape == (kv.shape[0], kv.shape[2], kv.shape[3])
    assert torch.equal(e, value_token_exponents(kv[:, 1], torch.from_numpy(profile.offset)[:, 1]))
    assert e.min() >= -8 and e.max() <= 7 and (e != 0).float().mean() > 0.3  # real tokens vary in magnitude
    assert torch.equal(e.median(dim=-1).values, torch.zeros_like(e[..., 0]))  # relative to the median token
    # a token scaled 4x gets exponent +8 (clipped to 7): its step is 2**(7/4) times the median token's
    x = kv.clone()
    x[:, 1, :, 50] = torch.from_numpy(profile.offset)[:, 1] + 4 * (kv[:, 1, :, 50] - torch.from_numpy(profile.offset)[:, 1])
    e2 = parse_chunk(encode(x, profile, "medium"), profile).value_exp()
    assert (e2[..., 50] >= np.minimum(e.numpy()[..., 50] + 7, 7)).all()
    assert abs(float(VALUE_SCALE_TABLE[7 + 8]) - 2 ** (7 / 4)) < 1e-6


def test_encode_many_and_decode_many_with_exact_and_lossless(smol_case):
    _, kv, _, profile = smol_case
    chunks = [kv[:, :, :, :128].contiguous(), kv[:, :, :, 128:].contiguous()]
    blobs = encode_many(chunks, profile, "medium")
    assert blobs == [encode(c, profile, "medium") for c in chunks]
    assert [parse_header(b).n_exact for b in blobs] == [1, 0]
    mixed = blobs + [encode(chunks[1], None, LOSSLESS)]
    outs = decode_many(mixed, profile)
    for b, o in zip(mixed, outs):
        assert torch.equal(o, decode(b, profile))
    assert torch.equal(outs[2], chunks[1])


def _as_version1(data: bytes) -> bytes:
    """A version-2 chunk without version-2 features rewritten as the version-1 bytes it is identical to."""
    body = bytearray(data[:HEADER_SIZE_V1]) + data[HEADER_SIZE:-4]
    body[4] = 1
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def test_version1_chunks_still_decode_and_unknown_versions_are_refused(smol_case):
    _, kv, _, _ = smol_case
    plain = CodecProfile.calibrate([kv], "smollm2-v1", value_token_scales=False)  # what version 1 coded
    v2 = encode(kv, plain, "medium", exact_tokens=torch.zeros(0, dtype=torch.int64))
    h = parse_header(v2)
    assert h.n_exact == 0 and not h.value_scales
    v1 = _as_version1(v2)
    assert parse_header(v1).version == 1
    assert torch.equal(decode(v1, plain), decode(v2, plain))
    with pytest.raises(CodecError, match="version-1 chunk has version-2 flags"):
        decode(_as_version1(encode(kv[:, :, :, 1:].contiguous(), None, "medium")), None)  # value scales: v2 only
    bad = bytearray(v2)
    bad[4] = 3
    with pytest.raises(CodecError, match="version 3 .*reads versions 1, 2"):
        decode(bytes(bad), None)


def test_exact_token_input_errors(smol_case):
    _, kv, _, profile = smol_case
    with pytest.raises(CodecError, match=r"must lie in \[0, 256\)"):
        encode(kv, profile, "medium", exact_tokens=torch.tensor([300]))
    with pytest.raises(CodecError, match="1-D integer"):
        encode(kv, profile, "medium", exact_tokens=torch.tensor([0.5]))
    data = bytearray(encode(kv[:, :, :, :16].contiguous(), None, "medium", exact_tokens=torch.tensor([3, 5])))
    h = parse_header(bytes(data))
    struct.pack_into("<ii", data, h.exact_offset, 5, 3)  # not ascending
    data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[:-4])))
    with pytest.raises(CodecError, match="exact tokens are not ascending"):
        decode(bytes(data), None)
