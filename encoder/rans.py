"""Static-table rANS over many independent streams, vectorized across streams with numpy.

Coder parameters (the format in ``docs/format.md`` fixes them):

* state ``x``: 32 bits, kept in ``[2**16, 2**32)`` between symbols;
* renormalization in 16-bit words, so decoding one symbol reads **at most one** word;
* probability precision ``M = 2**scale_bits`` with ``12 <= scale_bits <= 15``; every symbol of a table has a
  frequency ``1 <= f <= M - 1`` and the frequencies of a table sum to ``M``.

Decoding one symbol of one stream (the loop a GPU kernel reproduces)::

    slot = x & (M - 1)
    s    = slot_to_symbol[table][slot]           # the symbol
    x    = freq[table][s] * (x >> scale_bits) + slot - cum[table][s]
    if x < 2**16:
        x = (x << 16) | words[ptr]; ptr += 1

A stream's words start with the final encoder state (high half, then low half); decoding ends with
``x == 2**16`` and every word consumed, which :func:`decode_lockstep` checks.

All ``S`` streams advance in lockstep: every numpy call in the decode loop processes one symbol of every
stream, so the Python overhead per call is shared by all streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvrecall.encoder.errors import CodecError

__all__ = [
    "RANS_L",
    "max_freq",
    "max_symbols_for_words",
    "MIN_SCALE_BITS",
    "MAX_SCALE_BITS",
    "MAX_ALPHABET",
    "normalize_freqs",
    "RansTables",
    "build_tables",
    "encode_lockstep",
    "decode_lockstep",
]

RANS_L = 1 << 16  # lower bound of the normalized state interval
MIN_SCALE_BITS = 12
MAX_SCALE_BITS = 15
MAX_ALPHABET = 1024  # symbols per table (alphabet indices fit uint16)
# Largest allowed frequency is M - M/64, so every symbol costs at least log2(64/63) bits (0.0227). This bounds the
# number of symbols a stream of W words can hold (see max_symbols_for_words) and lets a parser reject headers
# that claim absurd symbol counts before anything is allocated.
MAX_FREQ_FRACTION_DENOM = 64


def max_freq(scale_bits: int) -> int:
    """Largest frequency a table may give one symbol: ``M - M / 64``."""
    m = 1 << scale_bits
    return m - m // MAX_FREQ_FRACTION_DENOM


def max_symbols_for_words(n_words: np.ndarray | int) -> np.ndarray | int:
    """Upper bound on the symbols a stream of ``n_words`` 16-bit words can encode.

    With every frequency ``<= 63/64 M``, encoding one symbol grows the state ``x >= 2**16`` by at least a factor
    ``1 + 1/128`` (``x' = x + floor(x / f) * (M - f)``), i.e. ``>= 0.0112`` bits, and a stream of ``W`` words carries
    at most ``16 * (W - 1)`` bits, so ``n_symbols <= 1425 * (W - 1)``; 1536 leaves a margin.
    """
    return (np.asarray(n_words, dtype=np.int64) - 1) * 1536


def normalize_freqs(counts: np.ndarray, scale_bits: int) -> np.ndarray:
    """Turn non-negative counts into rANS frequencies: every entry in ``[1, max_freq]``, sum exactly ``M``.

    Parameters
    ----------
    counts : ndarray[A], float or int
        Observed counts (or probabilities) of the ``A`` symbols, ``2 <= A <= min(MAX_ALPHABET, M // 2)``.
    scale_bits : int
        ``log2(M)``.

    Returns
    -------
    ndarray[A], uint32
        Frequencies close to ``counts`` in proportion (largest-remainder rounding, then a floor of 1).
    """
    m = 1 << scale_bits
    counts = np.asarray(counts, dtype=np.float64)
    a = counts.size
    if counts.ndim != 1 or a < 2 or a > min(MAX_ALPHABET, m // 2):
        raise CodecError(f"a rANS table needs 2..{min(MAX_ALPHABET, m // 2)} symbols, got {a}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise CodecError("rANS counts must be finite and non-negative")
    total = counts.sum()
    if total <= 0:
        counts = np.ones(a)
        total = float(a)
    # Reserve one slot per symbol (the floor), share the rest in proportion to counts.
    share = counts / total * (m - a)
    base = np.floor(share).astype(np.int64)
    rest = (m - a) - int(base.sum())
    if rest > 0:
        order = np.argsort(-(share - base), kind="stable")
        base[order[:rest]] += 1
    freqs = base + 1
    # Cap at max_freq (only when one symbol holds almost all mass): move the excess to the runner-up.
    top = int(np.argmax(freqs))
    cap = max_freq(scale_bits)
    if freqs[top] > cap:
        excess = int(freqs[top] - cap)
        freqs[top] -= excess
        freqs[int(np.argsort(-freqs, kind="stable")[1])] += excess
    return freqs.astype(np.uint32)


@dataclass(frozen=True)
class RansTables:
    """A set of rANS tables, flattened for vectorized coding.

    Attributes
    ----------
    scale_bits : int
        ``log2(M)``.
    sizes : ndarray[n_tables], int64
        Alphabet size of each table.
    abase : ndarray[n_tables], int64
        Offset of each table's first symbol in ``freq``/``cum``.
    freq, cum : ndarray[sum(sizes)], uint32
        Frequency and cumulative frequency (exclusive prefix sum) of every symbol of every table.
    lut : ndarray[n_tables * M], uint32
        Decode table: entry ``t * M + slot`` packs ``freq | (slot - cum) << 16`` of the symbol owning ``slot``.
    sym : ndarray[n_tables * M], uint16
        Alphabet index of the symbol owning slot ``t * M + slot``.
    """

    scale_bits: int
    sizes: np.ndarray
    abase: np.ndarray
    freq: np.ndarray
    cum: np.ndarray
    lut: np.ndarray
    sym: np.ndarray

    @property
    def n_tables(self) -> int:
        return int(self.sizes.size)


def build_tables(freq_list: list[np.ndarray], scale_bits: int) -> RansTables:
    """Build flattened encode/decode tables from per-table frequency arrays.

    Parameters
    ----------
    freq_list : list of ndarray[A_t], integer
        Frequencies of each table, each entry in ``[1, max_freq(scale_bits)]``, each table summing to ``M``.
    scale_bits : int

    Raises
    ------
    CodecError
        If a table breaks the frequency rules (this is how corrupted tables in a chunk are caught).
    """
    if not MIN_SCALE_BITS <= scale_bits <= MAX_SCALE_BITS:
        raise CodecError(f"rANS scale_bits must be in [{MIN_SCALE_BITS}, {MAX_SCALE_BITS}], got {scale_bits}")
    m = 1 << scale_bits
    if not freq_list:
        raise CodecError("no rANS tables given")
    sizes = np.array([len(f) for f in freq_list], dtype=np.int64)
    if np.any(sizes < 2) or np.any(sizes > min(MAX_ALPHABET, m // 2)):
        raise CodecError("rANS table alphabet size out of range")
    freq = np.concatenate([np.asarray(f, dtype=np.int64) for f in freq_list])
    if np.any(freq < 1) or np.any(freq > max_freq(scale_bits)):
        raise CodecError(f"rANS table has a frequency outside [1, {max_freq(scale_bits)}]")
    abase = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    sums = np.add.reduceat(freq, abase)
    if np.any(sums != m):
        raise CodecError(f"rANS table frequencies do not sum to M={m}")
    cum_incl = np.cumsum(freq)
    table_of_symbol = np.repeat(np.arange(sizes.size), sizes)
    cum = (cum_incl - freq - np.repeat(np.concatenate([[0], cum_incl[abase[1:] - 1]]), sizes)).astype(np.uint32)
    # slot -> symbol: each symbol owns `freq` consecutive slots of its table.
    owner = np.repeat(np.arange(freq.size), freq)  # global symbol index per global slot, in table order
    local = (owner - abase[table_of_symbol[owner]]).astype(np.uint16)
    slot_in_table = np.arange(owner.size, dtype=np.int64) - table_of_symbol[owner] * m
    bias = slot_in_table - cum[owner].astype(np.int64)
    lut = (freq[owner].astype(np.uint32) | (bias.astype(np.uint32) << np.uint32(16))).astype(np.uint32)
    return RansTables(scale_bits, sizes, abase, freq.astype(np.uint32), cum, lut, local)


def encode_lockstep(symbols: np.ndarray, table_ids: np.ndarray, tables: RansTables) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``S`` equal-length streams in lockstep.

    Parameters
    ----------
    symbols : ndarray[S, n], integer
        Alphabet index of every symbol, in decode order.
    table_ids : ndarray[S, n] or ndarray[S, G], integer
        Table of every symbol; a ``[S, G]`` array with ``G`` dividing ``n`` means symbol ``i`` uses column ``i % G``.
    tables : RansTables

    Returns
    -------
    words : ndarray[sum(counts)], uint16
        All streams' words, stream after stream, each in decode order (final state first).
    counts : ndarray[S], int64
        Words per stream (always ``>= 2``).
    """
    symbols = np.asarray(symbols)
    s_count, n = symbols.shape
    sb = tables.scale_bits
    if table_ids.shape != symbols.shape:
        g = table_ids.shape[1]
        table_ids = np.tile(table_ids, (1, n // g))
    table_ids = table_ids.astype(np.int64)
    if np.any(symbols >= tables.sizes[table_ids]) or np.any(symbols < 0):
        raise CodecError("symbol outside its table's alphabet")
    gidx = tables.abase[table_ids] + symbols
    # Reverse order (rANS encodes backwards), step-major so each step is a contiguous row.
    freq_rev = np.ascontiguousarray(tables.freq[gidx][:, ::-1].T)
    cum_rev = np.ascontiguousarray(tables.cum[gidx][:, ::-1].T)
    x = np.full(s_count, RANS_L, dtype=np.uint32)
    emitted = np.empty((n, s_count), dtype=np.uint16)
    emit_mask = np.empty((n, s_count), dtype=np.bool_)
    x_max = np.empty(s_count, dtype=np.uint32)
    q = np.empty(s_count, dtype=np.uint32)
    r = np.empty(s_count, dtype=np.uint32)
    for j in range(n):
        f = freq_rev[j]
        np.left_shift(f, 32 - sb, out=x_max)
        m = emit_mask[j]
        np.greater_equal(x, x_max, out=m)
        np.copyto(emitted[j], x, casting="unsafe")  # low 16 bits
        np.copyto(x, x >> np.uint32(16), where=m)
        np.floor_divide(x, f, out=q)
        np.subtract(x, q * f, out=r)
        np.left_shift(q, sb, out=x)
        x += r
        x += cum_rev[j]
    # Per stream: final state (hi, lo), then the emitted words in reverse emission order.
    em = emitted[::-1].T
    mk = emit_mask[::-1].T
    body_counts = mk.sum(axis=1).astype(np.int64)
    counts = body_counts + 2
    total = int(counts.sum())
    out = np.empty(total, dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    head = np.zeros(total, dtype=np.bool_)
    head[starts] = True
    head[starts + 1] = True
    out[starts] = (x >> np.uint32(16)).astype(np.uint16)
    out[starts + 1] = (x & np.uint32(0xFFFF)).astype(np.uint16)
    out[~head] = em[mk]
    return out, counts


def decode_lockstep(
    words: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    table_cols: np.ndarray,
    tables: RansTables,
    ends: np.ndarray,
    value_lut: np.ndarray | None = None,
) -> np.ndarray:
    """Decode ``S`` streams in lockstep.

    Parameters
    ----------
    words : ndarray[W], uint32
        The 16-bit words of all streams (widened to uint32), each stream contiguous.
    starts, ends : ndarray[S], int64
        Word range ``[start, end)`` of each stream (``end - start >= 2``).
    lengths : ndarray[S], int64
        Symbols per stream, **sorted in non-increasing order**.
    table_cols : ndarray[G, S], integer
        Table id of stream ``s`` at step ``i`` is ``table_cols[i % G, s]``.
    tables : RansTables
    value_lut : ndarray[n_tables * M], optional
        What to return for each decoded slot (default: ``tables.sym``, the alphabet index).

    Returns
    -------
    ndarray[n_max, S]
        ``out[i, s] = value_lut[t * M + slot]`` for symbol ``i`` of stream ``s`` (rows ``>= lengths[s]``: junk).

    Raises
    ------
    CodecError
        If a stream does not end in the initial state with all its words consumed (corruption).
    """
    s_count = int(starts.size)
    sb = tables.scale_bits
    m_mask = (1 << sb) - 1
    n_max = int(lengths[0]) if s_count else 0
    tb = np.ascontiguousarray(table_cols.astype(np.intp) << sb)
    g = tb.shape[0]
    # active[i]: streams still running at step i (lengths sorted descending); segments of constant activity
    active = s_count - np.searchsorted(lengths[::-1], np.arange(n_max), side="right")
    bounds = np.flatnonzero(np.diff(active)) + 1
    seg_starts = np.concatenate([[0], bounds]).astype(np.int64)
    seg_ends = np.concatenate([bounds, [n_max]]).astype(np.int64)
    x = (words[starts] << np.uint32(16)) | words[starts + 1]
    ptr = (starts + 2).astype(np.intp)
    # slot index of every decoded symbol; int32 keeps this (the only O(symbols) buffer of the loop) small.
    # zeros: rows past a stream's end stay valid indices.
    idx = np.zeros((n_max, s_count), dtype=np.int32)
    rowbuf = np.empty(s_count, dtype=np.intp)
    e = np.empty(s_count, dtype=np.uint32)
    f = np.empty(s_count, dtype=np.uint32)
    t = np.empty(s_count, dtype=np.uint32)
    w = np.empty(s_count, dtype=np.uint32)
    m = np.empty(s_count, dtype=np.bool_)
    lut_take = tables.lut.take
    words_take = words.take
    band, rshift, mul, add, less, lshift, bor, copyto = (
        np.bitwise_and, np.right_shift, np.multiply, np.add, np.less, np.left_shift, np.bitwise_or, np.copyto,
    )  # fmt: skip
    for i0, i1 in zip(seg_starts.tolist(), seg_ends.tolist()):
        a = int(active[i0])
        xa, ea, fa, ta, wa, ma, pa, row = x[:a], e[:a], f[:a], t[:a], w[:a], m[:a], ptr[:a], rowbuf[:a]
        tba = [tb[j, :a] for j in range(g)]
        for i in range(i0, i1):
            band(xa, m_mask, out=row)
            add(row, tba[i % g], out=row)
            lut_take(row, out=ea)
            rshift(xa, sb, out=xa)
            band(ea, 0xFFFF, out=fa)
            mul(xa, fa, out=xa)
            rshift(ea, 16, out=ea)
            add(xa, ea, out=xa)
            less(xa, RANS_L, out=ma)
            words_take(pa, out=wa, mode="clip")
            lshift(xa, 16, out=ta)
            bor(ta, wa, out=ta)
            copyto(xa, ta, where=ma)
            add(pa, ma, out=pa, casting="unsafe")
            copyto(idx[i, :a], row, casting="unsafe")
    bad = np.flatnonzero((x != RANS_L) | (ptr != ends))
    if bad.size:
        raise CodecError(
            f"{bad.size} of {s_count} rANS streams did not decode cleanly (first: stream {int(bad[0])}); "
            "the data is corrupted or was decoded with the wrong tables"
        )
    return (tables.sym if value_lut is None else value_lut)[idx]
