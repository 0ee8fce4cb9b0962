"""rANS coder: frequency normalization, table building, lockstep encode/decode against exact entropy bounds."""

from __future__ import annotations

import numpy as np
import pytest

from kvrecall.encoder import CodecError
from kvrecall.encoder.rans import (
    RANS_L,
    build_tables,
    decode_lockstep,
    encode_lockstep,
    max_freq,
    max_symbols_for_words,
    normalize_freqs,
)


def _roundtrip(symbols, table_ids, tables):
    words, counts = encode_lockstep(symbols, table_ids, tables)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    lengths = np.full(symbols.shape[0], symbols.shape[1])
    cols = table_ids.T if table_ids.shape[1] != symbols.shape[1] else None
    out = decode_lockstep(words.astype(np.uint32), starts, lengths, cols, tables, starts + counts)
    return words, counts, out.T


@pytest.mark.parametrize("scale_bits", [12, 15])
def test_normalize_freqs_rules(scale_bits):
    m = 1 << scale_bits
    rng = np.random.default_rng(0)
    for counts in [rng.random(50), np.array([1e9, 0, 0, 1.0]), np.zeros(3), np.array([5.0, 5.0])]:
        f = normalize_freqs(counts, scale_bits)
        assert f.sum() == m
        assert f.min() >= 1 and f.max() <= max_freq(scale_bits)
    with pytest.raises(CodecError):
        normalize_freqs(np.array([1.0]), scale_bits)
    with pytest.raises(CodecError):
        normalize_freqs(np.array([1.0, np.nan]), scale_bits)


def test_build_tables_rejects_bad_frequencies():
    with pytest.raises(CodecError):
        build_tables([np.array([4000, 95])], 12)  # sums to 4095
    with pytest.raises(CodecError):
        build_tables([np.array([4095, 1])], 12)  # above max_freq
    with pytest.raises(CodecError):
        build_tables([np.array([4096, 0])], 12)
    with pytest.raises(CodecError):
        build_tables([np.array([2048, 2048])], 11)  # precision out of range


def test_decode_lut_matches_cumulative_frequencies():
    f = normalize_freqs(np.array([7.0, 1, 3, 0.5]), 12)
    t = build_tables([f, f[::-1].copy()], 12)
    m = 1 << 12
    for tab, freqs in enumerate([f, f[::-1]]):
        cum = np.concatenate([[0], np.cumsum(freqs.astype(np.int64))[:-1]]).astype(np.int64)
        for s, (lo, fr) in enumerate(zip(cum.tolist(), freqs.tolist())):
            slots = np.arange(lo, lo + fr) + tab * m
            assert np.all(t.sym[slots] == s)
            assert np.all((t.lut[slots] & 0xFFFF) == fr)
            assert np.all((t.lut[slots] >> 16) == slots - tab * m - lo)


@pytest.mark.parametrize("scale_bits", [12, 14, 15])
def test_roundtrip_and_size_within_entropy_bound(scale_bits):
    rng = np.random.default_rng(1)
    p = np.array([0.55, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01])
    f = normalize_freqs(p * 1e6, scale_bits)
    tables = build_tables([f], scale_bits)
    symbols = rng.choice(p.size, size=(64, 4000), p=p)
    words, counts, out = _roundtrip(symbols, np.zeros((64, 1), np.int64), tables)
    np.testing.assert_array_equal(out, symbols)
    # Ideal code length under the (quantized) table: sum of -log2(f/M); rANS adds only the final-state flush.
    ideal_bits = float(np.log2((1 << scale_bits) / f[symbols].astype(np.float64)).sum())
    coded_bits = words.size * 16
    assert coded_bits >= ideal_bits  # cannot beat the model
    assert coded_bits <= ideal_bits * 1.002 + 64 * 32 + 64 * 16  # <= 0.2% + one 32-bit flush (+1 word) per stream
    q = np.bincount(symbols.ravel()) / symbols.size
    empirical = float(-(q * np.log2(q)).sum() * symbols.size)
    assert coded_bits <= empirical * 1.01 + 64 * 48


def test_per_position_tables_and_uneven_lengths():
    rng = np.random.default_rng(2)
    f0 = normalize_freqs(np.array([10.0, 1, 1]), 12)
    f1 = normalize_freqs(np.array([1.0, 1, 1, 1, 1, 10]), 12)
    tables = build_tables([f0, f1], 12)
    tid = np.array([[0, 1], [1, 0], [1, 1]])
    # stream i: symbol j uses table tid[i, j % 2]
    n = 600
    sym = np.where(np.tile(tid, (1, n // 2)) == 0, rng.integers(0, 3, (3, n)), rng.integers(0, 6, (3, n)))
    words, counts, out = _roundtrip(sym, tid, tables)
    np.testing.assert_array_equal(out, sym)
    # decode a set of streams with different lengths (sorted descending) in one lockstep loop
    parts = []
    for length in (600, 400, 2):
        w, c = encode_lockstep(sym[:1, :length], tid[:1], tables)
        parts.append((w, c, length))
    words = np.concatenate([p[0] for p in parts]).astype(np.uint32)
    counts = np.array([p[1][0] for p in parts])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    lengths = np.array([p[2] for p in parts])
    out = decode_lockstep(words, starts, lengths, np.repeat(tid[:1].T, 3, axis=1), tables, starts + counts)
    for s, length in enumerate(lengths):
        np.testing.assert_array_equal(out[:length, s], sym[0, :length])


def test_corrupted_stream_raises_codec_error():
    rng = np.random.default_rng(3)
    f = normalize_freqs(np.array([5.0, 3, 2, 1]), 12)
    tables = build_tables([f], 12)
    sym = rng.integers(0, 4, (4, 2000))
    words, counts = encode_lockstep(sym, np.zeros((4, 1), np.int64), tables)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    bad = words.astype(np.uint32)
    bad[starts[2] + 5] ^= 0x5A5A
    with pytest.raises(CodecError, match="did not decode cleanly"):
        decode_lockstep(bad, starts, np.full(4, 2000), np.zeros((1, 4), np.int64), tables, starts + counts)


def test_symbol_count_bound_holds_for_most_skewed_table():
    f = normalize_freqs(np.array([1e9, 1.0]), 12)
    tables = build_tables([f], 12)
    n = 100_000
    words, counts = encode_lockstep(np.zeros((1, n), np.int64), np.zeros((1, 1), np.int64), tables)
    assert max_symbols_for_words(counts[0]) >= n
    assert RANS_L == 1 << 16
