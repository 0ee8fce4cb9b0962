"""Native (C) rANS coder: identical to the numpy reference (decode_lockstep / encode_lockstep) on random tables and
streams, the same CodecError on corrupted streams, never an out-of-bounds read, and optional at run time."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrecall.encoder import CodecError, native
from kvrecall.encoder.rans import (
    build_tables,
    decode_lockstep,
    encode_lockstep,
    max_freq,
    normalize_freqs,
)
from kvrecall.encoder.tables import ESCAPE

needs_native = pytest.mark.skipif(not native.available(), reason=f"native rANS: {native.unavailable_reason()}")


# ---------------------------------------------------------------------------------------------------- helpers
def _tables(rng: np.random.Generator, n_tables: int, scale_bits: int, max_alphabet: int = 300):
    """Random tables: skewed counts, alphabet sizes from 2 up to ``max_alphabet`` (within the format's limits)."""
    top = min(max_alphabet, 1024, (1 << scale_bits) // 2)
    sizes = [int(rng.integers(2, top + 1)) for _ in range(n_tables)]
    sizes[0] = 2  # always cover the smallest alphabet
    freqs = [normalize_freqs(rng.exponential(size=a) ** 3 + (rng.random() < 0.2) * 1e6 * (np.arange(a) == 0),
                             scale_bits) for a in sizes]  # fmt: skip
    return freqs, build_tables(freqs, scale_bits)


def _value_lut(tables, rng: np.random.Generator) -> np.ndarray:
    """A codec-style value table: ``lo + alphabet index``, the last symbol of each table an escape."""
    m = 1 << tables.scale_bits
    lo = rng.integers(-500, 500, tables.n_tables)
    table = np.arange(tables.n_tables).repeat(m)
    vals = lo[table] + tables.sym.astype(np.int64)
    vals[tables.sym.astype(np.int64) == tables.sizes[table] - 1] = ESCAPE
    return vals.astype(np.int32)


def _symbols(rng: np.random.Generator, freqs, tab_full: np.ndarray) -> np.ndarray:
    """Symbols drawn from each position's own table distribution, ``[S, n]``."""
    out = np.empty(tab_full.shape, dtype=np.int64)
    for t in np.unique(tab_full):
        where = tab_full == t
        p = np.asarray(freqs[t], dtype=np.float64)
        out[where] = rng.choice(p.size, size=int(where.sum()), p=p / p.sum())
    return out


def _streams(rng, freqs, tables, lengths: list[int], group: int):
    """Encode streams of the given lengths (each a multiple of ``group``); return decode_lockstep's arguments."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    lengths = np.asarray(lengths, dtype=np.int64)[order]
    cols = rng.integers(0, tables.n_tables, (lengths.size, group))
    parts, counts = [], []
    for s, n in enumerate(lengths):
        tab_full = np.tile(cols[s : s + 1], (1, max(int(n), 1) // group))[:, : int(n)]
        sym = _symbols(rng, freqs, tab_full) if n else np.zeros((1, 0), dtype=np.int64)
        w, c = encode_lockstep(sym, cols[s : s + 1] if n else np.zeros((1, 0), np.int64), tables)
        parts.append(w)
        counts.append(int(c[0]))
    words = np.concatenate(parts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    ends = starts + np.asarray(counts, dtype=np.int64)
    return words, starts, lengths, np.ascontiguousarray(cols.T), ends


def _both(words, starts, lengths, cols, tables, ends, value_lut=None):
    """(reference result or CodecError message, native result or CodecError message)."""
    results = []
    for fn, w in ((decode_lockstep, words.astype(np.uint32)), (native.decode_lockstep_native, words)):
        try:
            results.append(fn(w, starts, lengths, cols, tables, ends, value_lut))
        except CodecError as exc:
            results.append(str(exc))
    return results


def _assert_same(ref, got):
    if isinstance(ref, str) or isinstance(got, str):
        assert ref == got
        return
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------------------------- availability
def test_env_switch_disables_native(monkeypatch):
    monkeypatch.setenv("KVRECALL_NATIVE", "0")
    assert not native.available()
    assert "KVRECALL_NATIVE" in native.unavailable_reason()
    _, tables = _tables(np.random.default_rng(0), 1, 12)
    with pytest.raises(RuntimeError, match="unavailable"):
        native.decode_lockstep_native(np.zeros(2, np.uint16), np.zeros(1), np.zeros(1), np.zeros((1, 1)), tables,
                                      np.full(1, 2))  # fmt: skip


def test_available_matches_extension_import():
    import importlib

    try:
        importlib.import_module("kvrecall.encoder._rans_native")
        built = True
    except ImportError:
        built = False
    assert native.available() == (built and native.os.environ.get("KVRECALL_NATIVE", "1").strip() != "0")


# ---------------------------------------------------------------------------------------------------- decode
@needs_native
@pytest.mark.parametrize("scale_bits", [12, 13, 14, 15])
def test_decode_matches_reference_all_scale_bits(scale_bits):
    rng = np.random.default_rng(scale_bits)
    freqs, tables = _tables(rng, 7, scale_bits)
    # 37 streams: several whole lane groups plus a remainder; unequal lengths (sorted by _streams), odd, 1 and 0
    lengths = [int(rng.integers(0, 120)) * 3 for _ in range(33)] + [3, 3, 0, 201]
    args = _streams(rng, freqs, tables, lengths, group=3)
    vl = _value_lut(tables, rng)
    for value_lut in (None, vl):
        ref, got = _both(*args[:4], tables, args[4], value_lut)
        assert not isinstance(ref, str), ref
        _assert_same(ref, got)
    # stream-major twin
    sm = native.decode_streams_native(*args[:4], tables, args[4], vl)
    np.testing.assert_array_equal(sm, _both(*args[:4], tables, args[4], vl)[0].T)
    assert sm.flags.c_contiguous


@needs_native
@pytest.mark.parametrize(("n_streams", "n", "group"), [(1, 1, 1), (1, 999, 1), (1, 2048, 8), (8, 777, 7),
                                                       (16, 64, 64), (17, 5, 5), (40, 300, 4)])
def test_decode_shapes(n_streams, n, group):
    rng = np.random.default_rng(n_streams * 1000 + n)
    freqs, tables = _tables(rng, 4, 12)
    args = _streams(rng, freqs, tables, [n] * n_streams, group)
    ref, got = _both(*args[:4], tables, args[4], _value_lut(tables, rng))
    assert not isinstance(ref, str), ref
    _assert_same(ref, got)


@needs_native
def test_decode_large_alphabets_use_wide_slot_index():
    """Tables with more than 256 symbols take the 16-bit slot-index path."""
    rng = np.random.default_rng(5)
    freqs = [normalize_freqs(rng.random(1000) + 0.01, 14), normalize_freqs(rng.random(300), 14)]
    tables = build_tables(freqs, 14)
    args = _streams(rng, freqs, tables, [500] * 12, 2)
    ref, got = _both(*args[:4], tables, args[4], _value_lut(tables, rng))
    _assert_same(ref, got)


@needs_native
@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int32, np.int64, np.float32, np.float64])
def test_decode_value_dtypes(dtype):
    rng = np.random.default_rng(11)
    freqs, tables = _tables(rng, 3, 12, max_alphabet=100)
    args = _streams(rng, freqs, tables, [90] * 10, 3)
    vl = (_value_lut(tables, rng) % 100).astype(dtype)
    ref, got = _both(*args[:4], tables, args[4], vl)
    _assert_same(ref, got)


@needs_native
def test_decode_falls_back_to_reference_semantics():
    """Non-canonical value tables and words above 0xFFFF give exactly what the reference gives."""
    rng = np.random.default_rng(12)
    freqs, tables = _tables(rng, 3, 12)
    words, starts, lengths, cols, ends = _streams(rng, freqs, tables, [60] * 9, 2)
    per_slot = np.arange(tables.lut.size, dtype=np.int32)  # a different value on every slot
    ref = decode_lockstep(words.astype(np.uint32), starts, lengths, cols, tables, ends, per_slot)
    _assert_same(ref, native.decode_lockstep_native(words, starts, lengths, cols, tables, ends, per_slot))
    wide = words.astype(np.uint32)
    wide[0] |= 1 << 20  # a word the 16-bit decoder cannot hold
    ref, got = _both(wide, starts, lengths, cols, tables, ends)
    _assert_same(ref, got)


@needs_native
@pytest.mark.parametrize("threads", ["2", "3", "64"])
def test_decode_threads_give_identical_results(monkeypatch, threads):
    rng = np.random.default_rng(21)
    freqs, tables = _tables(rng, 5, 12)
    args = _streams(rng, freqs, tables, [int(rng.integers(1, 60)) * 2 for _ in range(70)], 2)
    vl = _value_lut(tables, rng)
    ref = decode_lockstep(args[0].astype(np.uint32), *args[1:4], tables, args[4], vl)
    monkeypatch.setenv("KVRECALL_NATIVE_THREADS", threads)
    assert native.decode_threads() == int(threads)
    _assert_same(ref, native.decode_lockstep_native(*args[:4], tables, args[4], vl))
    np.testing.assert_array_equal(native.decode_streams_native(*args[:4], tables, args[4], vl), ref.T)
    bad = args[0].copy()
    bad[::7] ^= 0x5A5A
    r, g = _both(bad, *args[1:4], tables, args[4])
    _assert_same(r, g)


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_bad_thread_setting_is_rejected(monkeypatch, value):
    monkeypatch.setenv("KVRECALL_NATIVE_THREADS", value)
    with pytest.raises(ValueError, match="KVRECALL_NATIVE_THREADS"):
        native.decode_threads()


# ---------------------------------------------------------------------------------------------------- corruption
@needs_native
@pytest.mark.parametrize("seed", range(6))
def test_corrupted_streams_raise_like_reference(seed):
    rng = np.random.default_rng(100 + seed)
    freqs, tables = _tables(rng, 5, 12)
    words, starts, lengths, cols, ends = _streams(rng, freqs, tables, [int(rng.integers(1, 80)) * 2 for _ in range(20)], 2)
    bad = words.copy()
    hit = rng.choice(bad.size, size=max(1, bad.size // 50), replace=False)
    bad[hit] ^= rng.integers(1, 1 << 16, hit.size).astype(np.uint16)
    ref, got = _both(bad, starts, lengths, cols, tables, ends)
    _assert_same(ref, got)
    # wrong tables: decoding with other frequencies
    _, other = _tables(np.random.default_rng(999 + seed), 5, 12)
    ref, got = _both(words, starts, lengths, cols, other, ends)
    _assert_same(ref, got)
    # truncated last stream: its end moves inside its words
    short = ends.copy()
    short[-1] = max(starts[-1] + 2, short[-1] - 1)
    if short[-1] != ends[-1]:
        ref, got = _both(words[: short[-1]], starts, lengths, cols, tables, short)
        _assert_same(ref, got)
        assert isinstance(got, str) and "did not decode cleanly" in got


@needs_native
def test_word_ranges_outside_the_buffer_are_bad_streams_not_reads():
    rng = np.random.default_rng(3)
    freqs, tables = _tables(rng, 2, 12)
    words, starts, lengths, cols, ends = _streams(rng, freqs, tables, [40] * 9, 1)
    for s, e in ((starts.copy(), ends + 10**9), (starts - 10**9, ends), (starts, starts + 1)):
        with pytest.raises(CodecError, match="did not decode cleanly"):
            native.decode_lockstep_native(words, s, lengths, cols, tables, e)


@needs_native
def test_bad_arguments_raise_codec_error():
    rng = np.random.default_rng(4)
    freqs, tables = _tables(rng, 2, 12)
    words, starts, lengths, cols, ends = _streams(rng, freqs, tables, [10] * 3, 1)
    with pytest.raises(CodecError, match="table id"):
        native.decode_lockstep_native(words, starts, lengths, cols + 5, tables, ends)
    with pytest.raises(CodecError, match="sorted"):
        native.decode_lockstep_native(words, starts, lengths[::-1] + np.arange(3), cols, tables, ends)
    with pytest.raises(CodecError, match="entries"):
        native.decode_lockstep_native(words, starts, lengths, cols, tables, ends[:2])
    with pytest.raises(CodecError, match="table_cols"):
        native.decode_lockstep_native(words, starts, lengths, cols[:, :2], tables, ends)
    with pytest.raises(CodecError, match="value_lut"):
        native.decode_lockstep_native(words, starts, lengths, cols, tables, ends, np.zeros(5, np.int32))


@needs_native
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_word_buffers_never_crash(data):
    """Arbitrary words and word ranges: the same outcome as the reference (CodecError or identical symbols)."""
    scale_bits = data.draw(st.integers(12, 15))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    _, tables = _tables(rng, data.draw(st.integers(1, 3)), scale_bits, max_alphabet=40)
    n_words = data.draw(st.integers(0, 64))
    words = np.array(data.draw(st.lists(st.integers(0, 0xFFFF), min_size=n_words, max_size=n_words)), dtype=np.uint16)
    s_count = data.draw(st.integers(1, 12))
    starts = np.array(data.draw(st.lists(st.integers(0, max(0, n_words - 2)), min_size=s_count, max_size=s_count)))
    ends = np.minimum(starts + np.array(data.draw(st.lists(st.integers(2, 20), min_size=s_count,
                                                               max_size=s_count))), n_words)  # fmt: skip
    lengths = np.sort(np.array(data.draw(st.lists(st.integers(0, 40), min_size=s_count, max_size=s_count))))[::-1]
    group = data.draw(st.integers(1, 3))
    cols = rng.integers(0, tables.n_tables, (group, s_count))
    got_err = ref_err = None
    try:
        got = native.decode_lockstep_native(words, starts, lengths, cols, tables, ends)
    except CodecError as exc:
        got_err = str(exc)
    if n_words < 2 or np.any(ends - starts < 2) or lengths[0] == 0:
        # the reference fails differently (IndexError) on what it does not check; native gives a clean answer
        assert got_err is not None or lengths[0] == 0
        return
    try:
        ref = decode_lockstep(words.astype(np.uint32), starts, lengths.copy(), cols, tables, ends)
    except CodecError as exc:
        ref_err = str(exc)
    assert got_err == ref_err
    if got_err is None:
        np.testing.assert_array_equal(got, ref)


@needs_native
def test_extension_checks_its_own_arguments():
    """The C entry point re-checks sizes and table ids (ValueError), whatever the wrapper passes."""
    from kvrecall.encoder import _rans_native as ext

    _, tables = _tables(np.random.default_rng(9), 2, 12)
    words = np.zeros(8, np.uint16)
    one = np.zeros(1, np.int64)
    ok = dict(starts=one, ends=one + 2, lengths=one + 1, tids=np.zeros(1, np.uint32), lut=tables.lut,
              vl=tables.lut.copy(), out=np.zeros(1, np.uint32), bad=np.zeros(1, np.uint8))  # fmt: skip
    for key, value in (("tids", np.full(1, 7, np.uint32)), ("out", np.zeros(5, np.uint32)),
                       ("vl", np.zeros(3, np.uint32)), ("ends", np.zeros(2, np.int64)),
                       ("lut", tables.lut[:100])):  # fmt: skip
        a = dict(ok, **{key: value})
        with pytest.raises(ValueError):
            ext.decode_streams(words, a["starts"], a["ends"], a["lengths"], a["tids"], a["lut"], a["vl"], a["out"],
                               a["bad"], 12, 1, False)  # fmt: skip
    with pytest.raises(ValueError, match="scale_bits"):
        ext.decode_streams(words, one, one + 2, one + 1, ok["tids"], tables.lut, ok["vl"], ok["out"], ok["bad"], 11, 1,
                           False)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- encode
@needs_native
@pytest.mark.parametrize("scale_bits", [12, 13, 14, 15])
def test_encode_matches_reference(scale_bits):
    rng = np.random.default_rng(50 + scale_bits)
    freqs, tables = _tables(rng, 6, scale_bits)
    for s_count, n, group in ((1, 1, 1), (9, 301, 7), (20, 128, 8), (3, 0, 1)):
        cols = rng.integers(0, tables.n_tables, (s_count, group))
        tab_full = np.tile(cols, (1, max(n, 1) // group))[:, :n]
        sym = _symbols(rng, freqs, tab_full) if n else np.zeros((s_count, 0), np.int64)
        for table_ids in (cols if n else np.zeros((s_count, 0), np.int64), tab_full):
            w_ref, c_ref = encode_lockstep(sym, table_ids, tables)
            for dtype in (np.int64, np.int32, np.uint16, np.int16):
                w, c = native.encode_lockstep_native(sym.astype(dtype), table_ids, tables)
                assert w.dtype == np.uint16 and c.dtype == np.int64
                np.testing.assert_array_equal(w, w_ref)
                np.testing.assert_array_equal(c, c_ref)


@needs_native
def test_encode_decode_roundtrip_native_only():
    rng = np.random.default_rng(77)
    freqs, tables = _tables(rng, 8, 12)
    cols = rng.integers(0, 8, (64, 4))
    sym = _symbols(rng, freqs, np.tile(cols, (1, 256)))
    w, c = native.encode_lockstep_native(sym, cols, tables)
    starts = np.concatenate([[0], np.cumsum(c)[:-1]])
    out = native.decode_streams_native(w, starts, np.full(64, 1024), cols.T, tables, starts + c)
    np.testing.assert_array_equal(out, sym)


@needs_native
def test_encode_rejects_bad_symbols_and_shapes():
    rng = np.random.default_rng(8)
    freqs, tables = _tables(rng, 2, 12)
    sym = np.zeros((2, 6), np.int64)
    sym[1, 3] = len(freqs[0]) + len(freqs[1])  # outside any alphabet
    with pytest.raises(CodecError, match="alphabet"):
        native.encode_lockstep_native(sym, np.zeros((2, 1), np.int64), tables)
    with pytest.raises(CodecError, match="alphabet"):
        native.encode_lockstep_native(-np.ones((2, 6), np.int64), np.zeros((2, 1), np.int64), tables)
    with pytest.raises(CodecError, match="divide"):
        native.encode_lockstep_native(np.zeros((2, 6), np.int64), np.zeros((2, 4), np.int64), tables)
    with pytest.raises(CodecError, match="table id"):
        native.encode_lockstep_native(np.zeros((2, 6), np.int64), np.full((2, 1), 9), tables)


@needs_native
def test_max_freq_tables_decode():
    """A table at the frequency cap (the hardest case for the state bound) decodes identically."""
    m = 1 << 12
    freqs = [np.array([max_freq(12), m - max_freq(12)], dtype=np.uint32)]
    tables = build_tables(freqs, 12)
    rng = np.random.default_rng(1)
    args = _streams(rng, freqs, tables, [3000, 2999, 1], 1)
    ref, got = _both(*args[:4], tables, args[4])
    _assert_same(ref, got)
