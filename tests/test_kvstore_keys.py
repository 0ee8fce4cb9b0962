"""Keys, wire framing, limits and stub drift: pure functions, fuzzed with hypothesis."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrecall.kvstore import stubs, wire
from kvrecall.kvstore.keys import KeyValidationError, chunk_key, chunk_keys, key_digest, validate_key
from kvrecall.kvstore.limits import Limits
from kvrecall.kvstore.v1 import kvstore_pb2 as pb


def _reference_key(parent: bytes, ids: list[int], model: str, profile: str) -> bytes:
    """The documented construction, written out independently of the implementation."""
    def field(b: bytes) -> bytes:
        return struct.pack("<I", len(b)) + b

    h = hashlib.sha256(b"kvrecall.chunk.v1\x00" + field(parent) + field(model.encode()) + field(profile.encode()))
    h.update(struct.pack("<Q", len(ids)) + b"".join(struct.pack("<Q", t) for t in ids))
    return h.digest()


def test_chunk_keys_follow_the_documented_sha256_chain():
    ids = list(range(1000, 1000 + 700))
    keys = chunk_keys(ids, "stories260K", "profile-a", chunk_tokens=256)
    assert len(keys) == 2  # the trailing 188 tokens form no full chunk
    k0 = _reference_key(b"", ids[:256], "stories260K", "profile-a")
    k1 = _reference_key(k0, ids[256:512], "stories260K", "profile-a")
    assert keys == [k0, k1]
    assert all(len(k) == 32 for k in keys)


def test_chunk_keys_are_stable_across_processes_and_hash_seeds():
    code = ("from kvrecall.kvstore import chunk_keys;"
            "print(b''.join(chunk_keys(list(range(512)), 'm', 'p', 128)).hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}).stdout.strip()
            for seed in ("1", "2")}
    assert outs == {b"".join(chunk_keys(list(range(512)), "m", "p", 128)).hex()}


def test_chunk_keys_prefix_chain_properties():
    ids = list(range(1024))
    full = chunk_keys(ids, "m", "p", 128)
    assert chunk_keys(ids[:512], "m", "p", 128) == full[:4]  # a prefix's keys are a prefix of the keys
    assert chunk_keys(ids[512:], "m", "p", 128, parent=full[3]) == full[4:]  # resumable from a parent
    assert chunk_keys(ids, "m2", "p", 128)[0] != full[0]
    assert chunk_keys(ids, "m", "p2", 128)[0] != full[0]
    changed = ids.copy()
    changed[5] += 1
    other = chunk_keys(changed, "m", "p", 128)
    assert all(a != b for a, b in zip(other, full))  # a change in chunk 0 changes every later key


def test_chunk_keys_accept_numpy_and_torch():
    import numpy as np
    import torch

    ids = list(range(300))
    expected = chunk_keys(ids, "m", "p", 100)
    assert chunk_keys(np.arange(300), "m", "p", 100) == expected
    assert chunk_keys(torch.arange(300), "m", "p", 100) == expected


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_chunk_keys_reject_bad_chunk_tokens(bad):
    with pytest.raises(ValueError):
        chunk_keys([1, 2, 3], "m", "p", chunk_tokens=bad)


def test_chunk_key_rejects_bad_token_ids():
    with pytest.raises(ValueError):
        chunk_key(b"", [-1], "m", "p")
    with pytest.raises(ValueError):
        chunk_key(b"", [2**64], "m", "p")
    with pytest.raises(TypeError):
        chunk_key(b"", ["a"], "m", "p")


@given(st.binary(min_size=1, max_size=64))
def test_validate_key_accepts_any_nonempty_bytes_within_limit(key):
    assert validate_key(key, 64) == key
    assert validate_key(bytearray(key), 64) == key
    assert len(key_digest(key)) == 64 and set(key_digest(key)) <= set("0123456789abcdef")


@given(st.one_of(st.just(b""), st.binary(min_size=65, max_size=200), st.text(min_size=1), st.integers(),
                 st.none(), st.lists(st.integers(0, 255))))
def test_validate_key_rejects_everything_else(key):
    with pytest.raises(KeyValidationError):
        validate_key(key, 64)


@given(st.binary(max_size=5000))
def test_data_frames_round_trip_and_match_protobuf(payload):
    raw = wire.encode_data(payload)
    assert pb.GetResponse.FromString(raw).data == payload
    assert pb.PutRequest.FromString(raw).data == payload
    if payload:  # proto3 omits an empty field; the explicit empty frame parses the same
        assert raw == pb.GetResponse(data=payload).SerializeToString()
    view = wire.split_data(raw)
    assert view is not None and bytes(view) == payload


@settings(max_examples=200)
@given(key=st.binary(max_size=40), total=st.integers(0, 2**64 - 1), crc=st.integers(0, 2**32 - 1),
       data=st.binary(max_size=50), tier=st.text(max_size=5))
def test_non_data_messages_fall_back_to_protobuf(key, total, crc, data, tier):
    msg = pb.GetResponse(header=pb.ObjectHeader(key=key, total_bytes=total, crc32=crc), data=data, tier=tier)
    parsed = wire.parse_get_response(msg.SerializeToString())
    assert isinstance(parsed, pb.GetResponse) and parsed == msg


@given(st.binary(max_size=64))
def test_split_data_never_crashes_on_garbage(raw):
    view = wire.split_data(raw)
    if view is not None:
        assert pb.GetResponse.FromString(raw).data == bytes(view)


@pytest.mark.parametrize("kwargs", [
    {"max_key_bytes": 0}, {"max_object_bytes": -5}, {"chunk_bytes": True},
    {"max_message_bytes": 1000}, {"max_message_bytes": 1 << 20, "chunk_bytes": 1 << 20},
])
def test_limits_reject_nonsense(kwargs):
    with pytest.raises(ValueError):
        Limits(**kwargs)


def test_committed_stubs_match_the_proto():
    out = subprocess.run([sys.executable, "-m", "kvrecall.kvstore.stubs", "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_stub_check_names_a_drifted_file(tmp_path, monkeypatch, capsys):
    for name in stubs.GENERATED_FILES:
        (tmp_path / name).write_bytes((stubs.STUB_DIR / name).read_bytes())
    (tmp_path / "kvstore_pb2_grpc.py").write_bytes(b"# edited by hand\n")
    monkeypatch.setattr(stubs, "STUB_DIR", tmp_path)
    monkeypatch.setattr(stubs, "REPO_ROOT", tmp_path.parent)
    assert stubs.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "kvstore_pb2_grpc.py" in err and "kvstore_pb2.py " not in err


@given(a=st.binary(max_size=3000), b=st.binary(max_size=3000))
def test_crc32_combine_matches_crc_of_concatenation(a, b):
    from kvrecall.kvstore.crc import crc32_combine, crc32_of

    assert crc32_combine(crc32_of(a), crc32_of(b), len(b)) == crc32_of(a + b)


@given(data=st.binary(max_size=5000), start=st.integers(0, 2**32 - 1))
def test_crc32_of_equals_zlib_crc32_whatever_the_backend(data, start):
    """The fast backend (ISA-L) must give zlib's CRC-32: disk files and Redis entries store that value."""
    import zlib

    from kvrecall.kvstore.crc import crc32_of

    assert crc32_of(data, start) == zlib.crc32(data, start)
    assert crc32_of(memoryview(bytearray(data)), start) == zlib.crc32(data, start)


@given(a=st.binary(max_size=3000), b=st.binary(min_size=1, max_size=3000))
def test_pure_python_crc32_combine_fallback(a, b):
    """Without ISA-L the GF(2) matrix path combines CRCs; it must agree with zlib."""
    import zlib

    from kvrecall.kvstore import crc

    saved = crc._native_combine
    crc._native_combine = None
    try:
        assert crc.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    finally:
        crc._native_combine = saved
