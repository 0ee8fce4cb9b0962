"""rANS decode kernel vs the CPU codec (kvrecall.encoder is the reference twin): identical symbols and values.

Under TRITON_INTERPRET=1 the kernel's loop runs once per symbol of a stream (numpy ops over a block of streams),
so chunks stay small: with T * D < 2048 a stream holds T * D symbols (the encoder then uses G = D). Streams of the
encoder's full 2,048-symbol target run in the GPU test.
"""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrecall.encoder import CodecError, CodecProfile, encode, parse_header
from kvrecall.kernels import rans_decode
from kvrecall.kernels.common import KernelDTypeError, KernelInputError, KernelShapeError
from kvrecall.kernels.rans_decode import (
    decode_gpu,
    decode_into,
    decode_reference,
    decode_symbols_gpu,
    decode_symbols_reference,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _kv(shape, seed, smooth=True):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(*shape, generator=g)
    if smooth:  # correlated along tokens: the codec picks delta coding
        kv = kv.cumsum(dim=3) * 0.1
    return kv


@pytest.mark.parametrize(
    "shape,level,in_dtype,smooth,out_dtype",
    [
        ((2, 2, 3, 19, 8), "high", torch.float32, True, torch.float16),
        ((1, 2, 2, 1, 8), "medium", torch.float16, False, torch.bfloat16),  # a single token
        ((3, 2, 1, 20, 8), "lowest", torch.bfloat16, False, torch.float32),
        ((1, 2, 2, 13, 8), "low", torch.float32, True, torch.bfloat16),
        ((1, 2, 1, 4, 64), "medium", torch.float16, True, torch.float16),  # D=64: 64 channels per stream
    ],
    ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple) else "x".join(map(str, v)),
)
def test_self_contained_chunks_match_cpu_decoder(shape, level, in_dtype, smooth, out_dtype):
    kv = _kv(shape, seed=sum(shape), smooth=smooth).to(in_dtype)
    data = encode(kv, None, level)
    symbols = decode_symbols_gpu(data, device=DEV)[0]
    assert symbols.dtype == torch.int16
    assert torch.equal(symbols.cpu(), decode_symbols_reference(data))
    out = decode_gpu(data, device=DEV, dtype=out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out.cpu(), decode_reference(data, dtype=out_dtype))


def test_delta_coded_chunk_is_exercised():
    data = encode(_kv((1, 2, 2, 16, 8), seed=3, smooth=True), None, "high")
    assert parse_header(data).delta.any()
    assert torch.equal(decode_symbols_gpu(data, device=DEV)[0].cpu(), decode_symbols_reference(data))


@pytest.fixture(scope="module")
def stories_profile_and_kv(stories, sotu_text):
    """A codec profile calibrated on stories260K's real KV, and KV of later tokens to encode with it."""
    from kvrecall.models import prefill_kv, tokenize

    model, tok = stories
    kv = prefill_kv(model, tokenize(tok, sotu_text, 320))
    profile = CodecProfile.calibrate([kv[:, :, :, :256]], "stories260K")
    return profile, kv[:, :, :, 256:]


def test_profile_chunks_of_real_kv(stories_profile_and_kv):
    """Real KV with a calibrated profile; outliers beyond the profile's tables become escapes."""
    profile, kv = stories_profile_and_kv
    spiky = kv[:, :, :, 17:33].clone()
    spiky[1, 0, 2, 5, 3] += 300.0
    spiky[3, 1, 0, 14, 7] -= 200.0
    chunks = [encode(kv[:, :, :, :17], profile, "medium"), encode(spiky, profile, "high")]
    assert parse_header(chunks[1]).n_escapes > 0
    got = decode_symbols_gpu(chunks, profile, device=DEV)
    for data, symbols in zip(chunks, got):
        assert torch.equal(symbols.cpu(), decode_symbols_reference(data, profile))
    out = decode_gpu(chunks[0], profile, device=DEV, dtype=torch.float16)
    assert torch.equal(out.cpu(), decode_reference(chunks[0], profile, dtype=torch.float16))
    with pytest.raises(CodecError):
        decode_symbols_gpu(chunks[0], None, device=DEV)  # profile chunk without its profile


def test_decode_into_strided_destination_mixed_tables(stories_profile_and_kv):
    """Consecutive chunks (a profile chunk and a self-contained one: two table sets in one launch) land at their
    token offsets inside a view of a larger cache; other tokens are untouched."""
    profile, kv = stories_profile_and_kv
    a, b = kv[:, :, :, :12], kv[:, :, :, 12:18]
    chunks = [encode(a, profile, "high"), encode(b, None, "medium")]
    layers, _, heads, _, dim = kv.shape
    big = torch.full((2, layers, 2, heads, 30, dim), 7.0, dtype=torch.bfloat16, device=DEV)
    dest = big[1]
    end = decode_into(chunks, dest, profile, start=5)
    assert end == 23
    want = torch.cat([decode_reference(chunks[0], profile, torch.bfloat16), decode_reference(chunks[1], None,
                                                                                            torch.bfloat16)], dim=3)
    assert torch.equal(dest[:, :, :, 5:23].cpu(), want)
    assert torch.all(dest[:, :, :, :5] == 7) and torch.all(dest[:, :, :, 23:] == 7) and torch.all(big[0] == 7)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_format_v2_exact_tokens_and_lossless_match_cpu_decoder(out_dtype):
    """Format v2: chunks with per-token value scales and exactly stored tokens (an auto-detected sink, named ones)
    and a lossless chunk decode on the kernel path exactly as on the CPU, in one launch, into consecutive tokens."""
    kv = _kv((2, 2, 2, 12, 32), seed=int(torch.randint(0, 10**6, ()).item()), smooth=False)  # D=32: value scales
    kv[:, 1, :, 0] *= 1e-3  # token 0 is sink-like (values far smaller than the chunk's)
    sink = encode(kv, None, "medium")
    named = encode(kv.to(torch.bfloat16), None, "low", exact_tokens=torch.tensor([2, 7, 11]))
    lossless = encode(kv[:, :, :, :5].to(torch.float16), None, "lossless")
    assert [parse_header(c).n_exact for c in (sink, named, lossless)] == [1, 3, 5]
    assert parse_header(sink).value_scales and parse_header(named).value_scales
    chunks = [sink, named, lossless]
    for data, symbols in zip(chunks, decode_symbols_gpu(chunks, device=DEV)):
        assert torch.equal(symbols.cpu(), decode_symbols_reference(data))
    out = torch.full((2, 2, 2, 31, 32), 3.0, dtype=out_dtype, device=DEV)
    assert decode_into(chunks, out, start=2) == 31
    want = torch.cat([decode_reference(c, dtype=out_dtype) for c in chunks], dim=3)
    assert torch.equal(out[:, :, :, 2:].cpu(), want) and torch.all(out[:, :, :, :2] == 3)
    assert torch.equal(decode_gpu(lossless, device=DEV).cpu(), kv[:, :, :, :5].to(torch.float16))


def test_chunks_with_different_channels_per_stream_share_a_launch(monkeypatch):
    """The format allows any G dividing D; a smaller stream target makes the encoder pick G = 4, 2 and 8 here."""
    from kvrecall.encoder import codec

    monkeypatch.setattr(codec, "STREAM_TARGET", 64)
    chunks = [encode(_kv((1, 2, 2, t, 8), seed=t), None, "medium") for t in (16, 40, 8)]
    assert [parse_header(c).channels_per_stream for c in chunks] == [4, 2, 8]
    for data, symbols in zip(chunks, decode_symbols_gpu(chunks, device=DEV)):
        assert torch.equal(symbols.cpu(), decode_symbols_reference(data))
    out = torch.empty(1, 2, 2, 64, 8, dtype=torch.float16, device=DEV)
    assert decode_into(chunks, out) == 64
    want = torch.cat([decode_reference(c, dtype=torch.float16) for c in chunks], dim=3)
    assert torch.equal(out.cpu(), want)


# ------------------------------------------------------------------------------------------------ corruption
def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.fixture(scope="module")
def tiny_chunk() -> bytes:
    return encode(_kv((1, 2, 1, 5, 8), seed=1), None, "medium")


def test_corruption_is_caught_before_launch(tiny_chunk, monkeypatch):
    def no_launch(*_a, **_k):
        raise AssertionError("kernel launched on corrupt input")

    monkeypatch.setattr(rans_decode, "_decode_coded", no_launch)
    flipped = bytearray(tiny_chunk)
    flipped[len(flipped) // 2] ^= 0x40
    for bad in (bytes(flipped), tiny_chunk[:-3], b"KVRC" + b"\0" * 10, b"", tiny_chunk[:40]):
        with pytest.raises(CodecError):
            decode_symbols_gpu(bad, device=DEV)
    with pytest.raises(CodecError):
        decode_symbols_gpu("not bytes", device=DEV)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_crafted_corruption_with_valid_crc_agrees_with_cpu(tiny_chunk, pos, value):
    """Change any byte and fix the CRC: the kernel path raises CodecError exactly when the CPU decoder does,
    and otherwise returns the same symbols."""
    body = bytearray(tiny_chunk[:-4])
    body[pos % len(body)] = value
    data = _with_crc(bytes(body))
    try:
        want = decode_symbols_reference(data)
    except CodecError:
        with pytest.raises(CodecError):
            decode_symbols_gpu(data, device=DEV)
        return
    assert torch.equal(decode_symbols_gpu(data, device=DEV)[0].cpu(), want)


def test_payload_garbage_with_valid_crc_is_rejected(tiny_chunk):
    h = parse_header(tiny_chunk)
    body = bytearray(tiny_chunk[:-4])
    for i in range(h.payload_offset, h.payload_offset + 2 * h.payload_words):
        body[i] = (body[i] * 7 + 13) % 256
    data = _with_crc(bytes(body))
    with pytest.raises(CodecError):
        decode_symbols_reference(data)
    with pytest.raises(CodecError):
        decode_symbols_gpu(data, device=DEV)


def test_bad_destination_raises(tiny_chunk):
    ok = torch.empty(1, 2, 1, 5, 8, device=DEV)
    with pytest.raises(KernelDTypeError):
        decode_into(tiny_chunk, ok.to(torch.int32))
    with pytest.raises(KernelShapeError):
        decode_into(tiny_chunk, torch.empty(1, 2, 2, 5, 8, device=DEV))  # wrong heads
    with pytest.raises(KernelShapeError):
        decode_into(tiny_chunk, ok, start=1)  # does not fit
    with pytest.raises(KernelShapeError):
        decode_into(tiny_chunk, torch.empty(1, 3, 1, 5, 8, device=DEV))
    with pytest.raises(KernelInputError):
        decode_into(tiny_chunk, ok, start=-1)
    assert decode_into([], ok) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; the same cases run above on CPU "
                    "under TRITON_INTERPRET=1")
def test_gpu_large_batch_matches_cpu():
    """Chunks of 256, 512 and 100 tokens (8, 4 and 32 channels per stream) decode in one launch."""
    chunks = [encode(_kv((4, 2, 8, t, 128), seed=t).half(), None, "medium") for t in (256, 512, 100)]
    assert len({parse_header(c).channels_per_stream for c in chunks}) == 3
    got = decode_symbols_gpu(chunks, device="cuda")
    for data, symbols in zip(chunks, got):
        assert torch.equal(symbols.cpu(), decode_symbols_reference(data))
    for dtype in (torch.float16, torch.bfloat16):
        out = torch.empty(4, 2, 8, 868, 128, dtype=dtype, device="cuda")
        assert decode_into(chunks, out) == 868
        want = torch.cat([decode_reference(c, dtype=dtype) for c in chunks], dim=3)
        assert torch.equal(out.cpu(), want)
