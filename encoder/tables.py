"""Probability tables over coded symbol values, delta coding along tokens, and the fallback table section.

A *table* covers the integer values ``lo .. lo + A - 2`` plus one **escape** symbol (alphabet index ``A - 1``);
values outside that range are coded as the escape and stored raw in the chunk's escape section. Every alphabet
entry has a non-zero frequency, so any tensor can be coded.

A :class:`TableSet` is a list of tables plus ``tmap[L, 2, H, D]``: the table of each channel.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from kvrecall.encoder.errors import CodecError
from kvrecall.encoder.rans import MAX_ALPHABET, RansTables, build_tables, normalize_freqs

#: Marker for "escape" in decoded value arrays (never a real coded value: those stay within +-65534).
ESCAPE = np.iinfo(np.int32).min

__all__ = [
    "ESCAPE",
    "TableSet",
    "apply_delta",
    "undo_delta",
    "table_from_values",
    "table_from_histogram",
    "entropy_bits",
    "serialize_tables",
    "parse_tables",
    "finish_symbols",
]


@dataclass
class TableSet:
    """Tables of one coding configuration.

    Attributes
    ----------
    lo : ndarray[n_tables], int64
        Value of alphabet index 0 of each table.
    freqs : list of ndarray[A_t], uint32
        rANS frequencies; the last entry of each is the escape.
    tmap : ndarray[L, 2, H, D], int64
        Table id of each channel.
    scale_bits : int
    """

    lo: np.ndarray
    freqs: list
    tmap: np.ndarray
    scale_bits: int
    _rans: RansTables | None = field(default=None, repr=False)
    _values: np.ndarray | None = field(default=None, repr=False)

    @property
    def rans(self) -> RansTables:
        """Flattened rANS tables (built once)."""
        if self._rans is None:
            self._rans = build_tables(self.freqs, self.scale_bits)
        return self._rans

    @property
    def sizes(self) -> np.ndarray:
        return self.rans.sizes

    @property
    def value_lut(self) -> np.ndarray:
        """``ndarray[n_tables * M]``, int32: the coded value owning each decode slot, :data:`ESCAPE` for escapes."""
        if self._values is None:
            r = self.rans
            table = np.arange(r.n_tables).repeat(1 << self.scale_bits)
            vals = self.lo[table] + r.sym.astype(np.int64)
            vals[r.sym.astype(np.int64) == r.sizes[table] - 1] = ESCAPE
            self._values = vals.astype(np.int32)
        return self._values


def apply_delta(symbols: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Coded values: ``symbols`` ``[L, 2, H, T, D]`` as int32, differenced along tokens where ``delta[l, kv]``."""
    out = symbols.astype(np.int32)
    for l, kv in zip(*np.nonzero(delta)):
        out[l, kv, :, 1:] = np.diff(out[l, kv], axis=1)
    return out


def undo_delta(coded: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Inverse of :func:`apply_delta` (in place on the int64/int32 ``coded`` array); returns it."""
    for l, kv in zip(*np.nonzero(delta)):
        np.cumsum(coded[l, kv], axis=1, out=coded[l, kv])
    return coded


def entropy_bits(values: np.ndarray) -> float:
    """Empirical entropy (bits per value) of an integer array."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def table_from_histogram(
    values: np.ndarray, counts: np.ndarray, scale_bits: int, tail: float = 1e-6, margin: float = 0.25
) -> tuple[int, np.ndarray]:
    """A table for a histogram of integer values.

    The alphabet covers the central range holding all but ``tail`` of the mass on each side, widened by
    ``margin`` of its width (at least 1) on each side so that unseen neighbours need no escape; values outside
    go to the escape symbol, whose count is the excluded mass plus one.

    Parameters
    ----------
    values : ndarray[k], integer, sorted ascending, unique
    counts : ndarray[k], non-negative

    Returns
    -------
    lo : int
    freqs : ndarray[A], uint32
    """
    m = 1 << scale_bits
    max_values = min(MAX_ALPHABET, m // 2) - 1
    values = np.asarray(values, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float64)
    if values.size == 0:
        values, counts = np.array([0]), np.array([1.0])
    total = counts.sum()
    c = np.cumsum(counts)
    i0 = int(np.searchsorted(c, tail * total, side="right"))
    i1 = int(np.searchsorted(c, (1 - tail) * total, side="left"))
    i1 = min(max(i1, i0), values.size - 1)
    lo, hi = int(values[i0]), int(values[i1])
    pad = max(1, int(np.ceil(margin * (hi - lo))))
    lo, hi = lo - pad, hi + pad
    if hi - lo + 1 > max_values:  # keep the alphabet bounded: centre it on the mode
        mode = int(values[np.argmax(counts)])
        lo = max(lo, mode - max_values // 2)
        hi = lo + max_values - 1
    inside = (values >= lo) & (values <= hi)
    dense = np.zeros(hi - lo + 2, dtype=np.float64)
    dense[values[inside] - lo] = counts[inside]
    dense[-1] = counts[~inside].sum() + 1.0
    return lo, normalize_freqs(dense, scale_bits)


def table_from_values(values: np.ndarray, scale_bits: int) -> tuple[int, np.ndarray]:
    """:func:`table_from_histogram` of the values in an integer array."""
    u, c = np.unique(np.asarray(values).ravel(), return_counts=True)
    return table_from_histogram(u, c, scale_bits)


_TAB_HEAD = struct.Struct("<iH")


def serialize_tables(lo: np.ndarray, freqs: list) -> bytes:
    """Fallback table section: ``u16 n_tables``, then per table ``i32 lo, u16 A, u16 freq[A]``."""
    parts = [struct.pack("<H", len(freqs))]
    for lo_t, f in zip(lo, freqs):
        parts.append(_TAB_HEAD.pack(int(lo_t), len(f)))
        parts.append(np.asarray(f, dtype="<u2").tobytes())
    return b"".join(parts)


def parse_tables(buf: memoryview, scale_bits: int, n_expected: int) -> tuple[np.ndarray, list]:
    """Parse a fallback table section; every size is checked against the section length."""
    if len(buf) < 2:
        raise CodecError("table section truncated")
    (n_tables,) = struct.unpack_from("<H", buf, 0)
    if n_tables != n_expected:
        raise CodecError(f"table section holds {n_tables} tables, expected {n_expected}")
    off = 2
    lo, freqs = [], []
    for _ in range(n_tables):
        if off + _TAB_HEAD.size > len(buf):
            raise CodecError("table section truncated")
        lo_t, a = _TAB_HEAD.unpack_from(buf, off)
        off += _TAB_HEAD.size
        if a < 2 or off + 2 * a > len(buf):
            raise CodecError("table section has an invalid table size")
        freqs.append(np.frombuffer(buf, dtype="<u2", count=a, offset=off).astype(np.uint32))
        lo.append(lo_t)
        off += 2 * a
    if off != len(buf):
        raise CodecError("table section has trailing bytes")
    build_tables(freqs, scale_bits)  # validates the frequency rules
    return np.array(lo, dtype=np.int64), freqs


SYMBOL_RANGE = 32767  # decoded symbols must lie in +-SYMBOL_RANGE (int16); escaped coded values in +-2x that


def finish_symbols(coded, delta: np.ndarray, n_escapes: int, escape_values: np.ndarray):
    """Turn decoded coded values into symbols, in place: fill escapes, undo delta coding, check the range.

    The one implementation of this step, shared by the CPU decoder (numpy) and the Triton decoder (torch, on
    any device): ``coded`` may be an ``ndarray`` or a ``Tensor``, int32 or int64, ``[L, 2, H, T, D]``.

    Parameters
    ----------
    coded : ndarray or Tensor[L, 2, H, T, D], int32/int64
        Coded values straight from the rANS decoder, :data:`ESCAPE` where an escape symbol was decoded.
    delta : ndarray[L, 2], bool
        Which (layer, K/V) were delta coded along tokens.
    n_escapes : int
        Escapes the chunk header declares.
    escape_values : ndarray[n_escapes], int32
        The chunk's escape section (values in C order of ``[L, 2, H, T, D]``).

    Returns
    -------
    ndarray or Tensor
        ``coded`` itself, now holding the symbols.

    Raises
    ------
    CodecError
        If the escape count disagrees with the header, an escaped value or a symbol is out of range.
    """
    import torch

    is_torch = isinstance(coded, torch.Tensor)
    esc = coded == ESCAPE
    n_esc = int(esc.sum())
    if n_esc != n_escapes:
        raise CodecError(f"chunk declares {n_escapes} escapes but its streams hold {n_esc}")
    has_delta = bool(np.any(delta))
    if n_esc:
        ev = np.asarray(escape_values)
        if ev.min() < -2 * SYMBOL_RANGE or ev.max() > 2 * SYMBOL_RANGE:
            raise CodecError("chunk has an escaped value outside the symbol range")
        coded[esc] = torch.from_numpy(ev.astype(np.int32)).to(coded.device, coded.dtype) if is_torch else ev
    for l, kv in zip(*np.nonzero(delta)):
        part = coded[l, kv]
        if is_torch:  # int64 accumulation then cast: wraps like numpy's int32 out=
            part.copy_(torch.cumsum(part, dim=1, dtype=torch.int64).to(part.dtype))
        else:
            np.cumsum(part, axis=1, out=part)
    if n_esc or has_delta:
        lo, hi = (int(v) for v in (torch.aminmax(coded) if is_torch else (coded.min(), coded.max())))
        if lo < -SYMBOL_RANGE or hi > SYMBOL_RANGE:
            raise CodecError("decoded symbols fall outside the int16 range (corrupted chunk)")
    return coded
