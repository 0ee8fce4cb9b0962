"""Fuzzing the chunk parser/decoder with mutations and truncations of real encoded chunks.

Every input must either decode to a tensor of the declared shape or raise CodecError: no other exception, no hang,
no huge allocation. Mutations are tried both raw (the CRC catches them) and with the CRC recomputed, so the
structural checks behind the CRC are exercised too.
"""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrecall.encoder import CodecError, CodecProfile, decode, decode_many, encode, parse_header


@pytest.fixture(scope="module")
def chunks(stories, sotu_text):
    from kvrecall.models import prefill_kv, tokenize

    model, tok = stories
    kv = prefill_kv(model, tokenize(tok, sotu_text, 300))
    profile = CodecProfile.calibrate([kv[:, :, :, :256]], "fuzz")
    small = kv[:, :, :, 256:296].contiguous()
    small[1, 0, 0, 3, 2] = 500.0  # an escape
    return profile, [encode(small, profile, "medium"), encode(small, None, "low"), encode(small[:, :, :, :3], profile)]


def _fix_crc(data: bytes) -> bytes:
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _check(data: bytes, profile) -> None:
    try:
        out = decode(data, profile)
    except CodecError:
        return
    h = parse_header(data)
    assert tuple(out.shape) == h.shape


mutation = st.tuples(st.integers(min_value=0, max_value=10**9), st.integers(min_value=1, max_value=255))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), muts=st.lists(mutation, min_size=1, max_size=4), fix=st.booleans())
def test_byte_mutations(chunks, which, muts, fix):
    profile, blobs = chunks
    data = bytearray(blobs[which])
    for pos, xor in muts:
        data[pos % len(data)] ^= xor
    data = bytes(data)
    _check(_fix_crc(data) if fix else data, profile)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), cut=st.integers(min_value=0, max_value=10**9), fix=st.booleans())
def test_truncations(chunks, which, cut, fix):
    profile, blobs = chunks
    data = blobs[which][: cut % len(blobs[which])]
    if fix and len(data) > 4:
        data = _fix_crc(data)
    with pytest.raises(CodecError):
        decode(data, profile)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(0, 2),
    field_off=st.sampled_from([5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 20, 38, 42, 46, 50, 54]),
    value=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_header_field_overwrites(chunks, which, field_off, value):
    """Overwrite header fields (shape, counts, lengths) with arbitrary values and a valid CRC."""
    profile, blobs = chunks
    data = bytearray(blobs[which])
    raw = struct.pack("<I", value)
    data[field_off : field_off + 4] = raw
    _check(_fix_crc(bytes(data)), profile)


@settings(max_examples=50, deadline=None)
@given(junk=st.binary(min_size=0, max_size=300))
def test_random_bytes(junk):
    with pytest.raises(CodecError):
        decode(junk)
    with pytest.raises(CodecError):
        decode(b"KVRC\x01" + junk)


def test_decode_many_reports_the_bad_chunk(chunks):
    profile, blobs = chunks
    bad = bytearray(blobs[0])
    bad[-1] ^= 1
    with pytest.raises(CodecError, match="checksum"):
        decode_many([blobs[0], bytes(bad)], profile)
    assert len(decode_many([blobs[0], blobs[2]], profile)) == 2
    assert isinstance(decode(blobs[1]), torch.Tensor)
