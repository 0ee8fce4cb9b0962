"""Native (C) fast path of the lockstep rANS coder, with the exact behaviour of :mod:`kvrecall.encoder.rans`.

The extension ``kvrecall.encoder._rans_native`` is optional: when it is missing (no compiler at install time) or
disabled with the environment variable ``KVRECALL_NATIVE=0``, :func:`available` returns False and callers use the
numpy reference (:func:`kvrecall.encoder.rans.decode_lockstep` / :func:`~kvrecall.encoder.rans.encode_lockstep`).

* :func:`decode_lockstep_native` is a drop-in twin of ``decode_lockstep`` (same arguments, same ``[n_max, S]`` array
  of ``value_lut``'s dtype, same :class:`CodecError` on corrupted streams). Rows past a stream's length hold
  ``value_lut[0]``, which is what the numpy reference leaves there. :func:`decode_streams_native` returns the same
  values stream-major (``[S, n_max]``).
* :func:`encode_lockstep_native` is a twin of ``encode_lockstep`` (same words and counts, bit for bit).

The C loop checks every word index against its stream's end, so corrupted input never reads out of bounds; a stream
that runs out of words is reported as not decoding cleanly, exactly as the reference reports it. It releases the GIL;
``KVRECALL_NATIVE_THREADS=n`` splits one decode call over ``n`` threads (default 1, see :func:`decode_threads`).
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np

from kvrecall.encoder.errors import CodecError
from kvrecall.encoder.rans import RansTables

__all__ = [
    "available",
    "unavailable_reason",
    "decode_lockstep_native",
    "decode_streams_native",
    "decode_threads",
    "encode_lockstep_native",
]

ENV_SWITCH = "KVRECALL_NATIVE"

try:  # the extension is optional: any import failure just means "not available"
    from kvrecall.encoder import _rans_native as _ext

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - a broken build must never break importing the codec
    _ext = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def unavailable_reason() -> str | None:
    """Why the native path is off (``None`` when it is available)."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return f"disabled by {ENV_SWITCH}=0"
    if _ext is None:
        return f"extension kvrecall.encoder._rans_native not importable ({_IMPORT_ERROR})"
    return None


def available() -> bool:
    """True when the C extension imported and ``KVRECALL_NATIVE`` is not ``0`` (checked at every call)."""
    return unavailable_reason() is None


THREADS_ENV = "KVRECALL_NATIVE_THREADS"
MAX_THREADS = 64


def decode_threads() -> int:
    """Threads one native decode call uses: ``KVRECALL_NATIVE_THREADS`` (1..64, default 1), read at every call.

    The C loop releases the GIL either way, so callers may also decode independent batches on their own threads.

    Raises
    ------
    ValueError
        If the variable is set to something other than an integer in ``1..64``.
    """
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 1
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{THREADS_ENV} must be an integer in 1..{MAX_THREADS}, got {raw!r}")
    return n


def _module() -> ModuleType:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"native rANS path unavailable: {reason}")
    return _ext


def _int64_vector(a: np.ndarray, name: str, size: int | None = None) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise CodecError(f"{name} must be a 1-D integer array")
    if size is not None and a.size != size:
        raise CodecError(f"{name} has {a.size} entries, expected {size}")
    return a.astype(np.int64, copy=False)


def _decode(
    words: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    table_cols: np.ndarray,
    tables: RansTables,
    ends: np.ndarray,
    value_lut: np.ndarray | None,
    stream_major: bool,
) -> np.ndarray | None:
    """Shared body of the two decoders; ``None`` when the input needs the numpy reference (see callers)."""
    ext = _module()
    starts = _int64_vector(starts, "starts")
    s_count = int(starts.size)
    ends = _int64_vector(ends, "ends", s_count)
    lengths = _int64_vector(lengths, "lengths", s_count)
    if s_count and (lengths[-1] < 0 or np.any(lengths[1:] > lengths[:-1])):
        raise CodecError("stream lengths must be non-negative and sorted in non-increasing order")
    n_max = int(lengths[0]) if s_count else 0
    sb = int(tables.scale_bits)
    m = 1 << sb
    lut = np.ascontiguousarray(tables.lut, dtype=np.uint32)
    n_tables = lut.size // m
    values = np.ascontiguousarray(tables.sym if value_lut is None else value_lut)
    if values.ndim != 1 or values.size != lut.size or lut.size != n_tables * m or n_tables < 1:
        raise CodecError(f"value_lut and the decode table must both hold n_tables * M = {n_tables * m} entries")
    table_cols = np.asarray(table_cols)
    if table_cols.ndim != 2 or table_cols.shape[1] != s_count or (s_count and table_cols.shape[0] < 1):
        raise CodecError(f"table_cols must have shape [G, {s_count}], got {table_cols.shape}")
    if table_cols.size and (table_cols.min() < 0 or table_cols.max() >= n_tables):
        raise CodecError(f"table id outside 0..{n_tables - 1}")
    words = np.asarray(words)
    if words.ndim != 1:
        raise CodecError("words must be a 1-D array")
    if values.dtype.itemsize not in (1, 2, 4, 8) or values.dtype.hasobject:
        return None  # exotic value dtype: the reference handles it
    if words.dtype != np.uint16:
        if words.size and (not np.issubdtype(words.dtype, np.integer) or words.min() < 0 or words.max() > 0xFFFF):
            return None  # not 16-bit words (the reference defines what happens)
        words = words.astype(np.uint16)
    words = np.ascontiguousarray(words)
    group = max(int(table_cols.shape[0]), 1)
    table_ids = np.ascontiguousarray(table_cols, dtype=np.uint32).reshape(-1)
    if table_ids.size == 0:
        table_ids = np.zeros(group * s_count, dtype=np.uint32)
    shape = (s_count, n_max) if stream_major else (n_max, s_count)
    out = np.empty(shape, dtype=values.dtype)
    bad = np.zeros(s_count, dtype=np.uint8)
    # The C side moves raw items: view value_lut/out as unsigned integers of the same size (floats, bools work).
    raw = np.dtype(f"u{values.dtype.itemsize}")
    n_bad = ext.decode_streams(
        words, starts, ends, lengths, table_ids, lut, values.view(raw), out.view(raw).reshape(-1), bad, sb, group,
        stream_major, decode_threads(),
    )  # fmt: skip
    if n_bad < 0:
        return None  # tables not in the canonical form build_tables makes
    if n_bad:
        first = int(np.flatnonzero(bad)[0])
        raise CodecError(
            f"{n_bad} of {s_count} rANS streams did not decode cleanly (first: stream {first}); "
            "the data is corrupted or was decoded with the wrong tables"
        )
    return out


def _reference(words, starts, lengths, table_cols, tables, ends, value_lut) -> np.ndarray:
    """The numpy reference, given its uint32 words (16-bit words are widened the way the codec widens them)."""
    from kvrecall.encoder.rans import decode_lockstep

    words = np.asarray(words)
    if words.dtype == np.uint16:
        words = words.astype(np.uint32)
    return decode_lockstep(words, starts, lengths, table_cols, tables, ends, value_lut)


def decode_lockstep_native(
    words: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    table_cols: np.ndarray,
    tables: RansTables,
    ends: np.ndarray,
    value_lut: np.ndarray | None = None,
) -> np.ndarray:
    """Decode ``S`` streams in C; same contract as :func:`kvrecall.encoder.rans.decode_lockstep`.

    Parameters
    ----------
    words : ndarray[W], uint16 or uint32
        The 16-bit words of all streams, each stream contiguous (uint16 avoids a narrowing copy).
    starts, ends : ndarray[S], int64
        Word range ``[start, end)`` of each stream (``end - start >= 2``).
    lengths : ndarray[S], int64
        Symbols per stream, sorted in non-increasing order.
    table_cols : ndarray[G, S], integer
        Table id of stream ``s`` at step ``i`` is ``table_cols[i % G, s]``.
    tables : RansTables
    value_lut : ndarray[n_tables * M], optional
        What to return for each decoded slot (default: ``tables.sym``, the alphabet index).

    Returns
    -------
    ndarray[n_max, S], dtype of ``value_lut``, C-contiguous
        ``out[i, s] = value_lut[t * M + slot]`` for symbol ``i`` of stream ``s``; rows ``>= lengths[s]`` hold
        ``value_lut[0]``.

    Raises
    ------
    CodecError
        If a stream does not end in the initial state with all its words consumed (corruption), or the arguments
        are inconsistent (sizes, table ids, unsorted lengths). A word range outside ``words`` counts as a stream
        that did not decode cleanly.
    RuntimeError
        If the native path is unavailable (see :func:`available`).

    Notes
    -----
    The C decoder needs the canonical tables :func:`~kvrecall.encoder.rans.build_tables` makes (each symbol owns
    consecutive slots, one value per symbol) and 16-bit words; for anything else (hand-made tables, words above
    0xFFFF, a value dtype wider than 8 bytes) this returns the numpy reference's result.
    """
    out = _decode(words, starts, lengths, table_cols, tables, ends, value_lut, stream_major=False)
    return _reference(words, starts, lengths, table_cols, tables, ends, value_lut) if out is None else out


def decode_streams_native(
    words: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    table_cols: np.ndarray,
    tables: RansTables,
    ends: np.ndarray,
    value_lut: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`decode_lockstep_native` in stream-major layout: returns ``ndarray[S, n_max]`` (C-contiguous).

    ``decode_streams_native(...)`` equals ``decode_lockstep_native(...).T`` element for element; use it when the
    caller wants each stream's symbols contiguous (the codec's token-major streams), saving a transpose.
    """
    out = _decode(words, starts, lengths, table_cols, tables, ends, value_lut, stream_major=True)
    if out is None:
        return np.ascontiguousarray(_reference(words, starts, lengths, table_cols, tables, ends, value_lut).T)
    return out


def encode_lockstep_native(
    symbols: np.ndarray, table_ids: np.ndarray, tables: RansTables
) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``S`` equal-length streams in C; same contract as :func:`kvrecall.encoder.rans.encode_lockstep`.

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

    Raises
    ------
    CodecError
        If a symbol lies outside its table's alphabet or the shapes do not fit together.
    RuntimeError
        If the native path is unavailable (see :func:`available`).
    """
    ext = _module()
    symbols = np.asarray(symbols)
    if symbols.ndim != 2:
        raise CodecError(f"symbols must have shape [S, n], got {symbols.shape}")
    if symbols.size and not np.issubdtype(symbols.dtype, np.integer):
        raise CodecError("symbols must be integers")
    s_count, n = symbols.shape
    table_ids = np.asarray(table_ids)
    if table_ids.ndim != 2 or table_ids.shape[0] != s_count:
        raise CodecError(f"table_ids must have shape [{s_count}, n] or [{s_count}, G], got {table_ids.shape}")
    cols = int(table_ids.shape[1])
    if n and (cols < 1 or n % cols):
        raise CodecError(f"table_ids has {cols} columns, which does not divide the {n} symbols per stream")
    n_tables = tables.n_tables
    if n == 0 or s_count == 0:
        cols = 1
        table_ids = np.zeros((s_count, 1), dtype=np.int32)
    elif table_ids.min() < 0 or table_ids.max() >= n_tables:
        raise CodecError(f"table id outside 0..{n_tables - 1}")
    if symbols.dtype not in (np.uint16, np.int32, np.int64):
        symbols = symbols.astype(np.int64)
    symbols = np.ascontiguousarray(symbols)
    tids = np.ascontiguousarray(table_ids, dtype=np.int32)
    out = np.empty(s_count * (n + 2), dtype=np.uint16)
    counts = np.empty(s_count, dtype=np.int64)
    total = ext.encode_streams(
        symbols.reshape(-1), tids.reshape(-1),
        np.ascontiguousarray(tables.sizes, dtype=np.int64), np.ascontiguousarray(tables.abase, dtype=np.int64),
        np.ascontiguousarray(tables.freq, dtype=np.uint32), np.ascontiguousarray(tables.cum, dtype=np.uint32),
        out, counts, s_count, n, cols, int(tables.scale_bits),
    )  # fmt: skip
    if total < 0:
        raise CodecError("symbol outside its table's alphabet")
    return out[:total].copy() if total < out.size // 2 else out[:total], counts
