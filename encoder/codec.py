"""encode / decode: quantize a KV chunk, code it as many rANS streams, pack it; and back.

Streams: one per (layer, K/V, head, group of ``G`` consecutive channels), ordered that way; a stream holds the
``T * G`` coded values of its channels token-major (token 0 channels g*G .. g*G+G-1, token 1, ...), and symbol
``i`` uses the table of channel ``g * G + i % G``. ``G`` is the smallest divisor of ``D`` giving at least
:data:`STREAM_TARGET` symbols per stream (a stream's 4-byte final state then costs < 1% of its payload).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from kvrecall.encoder.errors import CodecError
from kvrecall.encoder.format import ChunkHeader, pack_chunk, parse_header
from kvrecall.encoder.profile import CodecProfile
from kvrecall.encoder.quantize import (
    SYMBOL_LIMIT,
    LEVEL_STEP,
    LEVELS,
    LOSSLESS,
    QuantizedChunk,
    check_kv,
    exact_dtype_for,
    find_sink_tokens,
    with_exact_tokens,
    dequantize,
    layer_step_factors,
    level_index,
    quantize_with,
    VALUE_SCALE_MIN_HEAD_DIM,
    value_scales,
    value_token_exponents,
)
from kvrecall.encoder import native
from kvrecall.encoder.rans import decode_lockstep, encode_lockstep
from kvrecall.encoder.tables import (
    ESCAPE,
    TableSet,
    apply_delta,
    entropy_bits,
    parse_tables,
    serialize_tables,
    table_from_values,
    finish_symbols,
)

__all__ = [
    "encode", "encode_many", "decode", "decode_many", "decode_symbols", "decode_many_symbols", "quantize",
    "parse_chunk", "ParsedChunk", "STREAM_TARGET", "choose_group",
]

STREAM_TARGET = 2048  # minimum symbols per stream when the head has enough channels
DEFAULT_SCALE_BITS = 12


_native_broken: list[str] = []  # set once if the C path fails with something other than CodecError


def _use_native() -> bool:
    return not _native_broken and native.available()


def _native_failed(exc: Exception) -> None:
    _native_broken.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(f"kvrecall: native rANS path failed ({_native_broken[0]}); using numpy", RuntimeWarning, 2)


def _encode_streams(idx: np.ndarray, tab: np.ndarray, tables) -> tuple[np.ndarray, np.ndarray]:
    """rANS-encode streams: the C fast path when built (:mod:`kvrecall.encoder.native`), else numpy."""
    if _use_native():
        try:
            return native.encode_lockstep_native(idx, tab, tables)
        except CodecError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken optional build must not break the codec
            _native_failed(exc)
    return encode_lockstep(idx, tab, tables)


def _decode_streams(words16, starts, lengths, table_cols, tables, ends, value_lut) -> tuple[np.ndarray, bool]:
    """rANS-decode streams: the C fast path when built, else the numpy lockstep loop (identical symbols).

    Returns ``(values, stream_major)``: ``values[s, i]`` (C path, stream-major, each stream contiguous) or
    ``values[i, s]`` (numpy, step-major) for symbol ``i`` of stream ``s``.
    """
    if _use_native():
        try:
            if hasattr(native, "decode_streams_native"):
                return native.decode_streams_native(words16, starts, lengths, table_cols, tables, ends, value_lut), True
            return native.decode_lockstep_native(words16, starts, lengths, table_cols, tables, ends, value_lut), False
        except CodecError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken optional build must not break the codec
            _native_failed(exc)
    return decode_lockstep(words16.astype(np.uint32), starts, lengths, table_cols, tables, ends, value_lut), False


def choose_group(tokens: int, head_dim: int) -> int:
    """Channels per stream ``G``: the smallest divisor of ``head_dim`` with ``tokens * G >= STREAM_TARGET``."""
    for g in range(1, head_dim + 1):
        if head_dim % g == 0 and tokens * g >= STREAM_TARGET:
            return g
    return head_dim


# ---------------------------------------------------------------------------------------------------- quantize
def _fallback_scales(x: torch.Tensor, li: int) -> tuple[torch.Tensor, torch.Tensor, bytes]:
    """Per-chunk offsets (fp16, per channel) and steps (fp32, per layer and K/V) for a profile-free chunk."""
    layers, _, heads, _, head_dim = x.shape
    xf = x.detach().to("cpu", torch.float32)
    fp16_max = float(torch.finfo(torch.float16).max)
    offset = xf.mean(dim=3).clamp(-fp16_max, fp16_max).to(torch.float16).to(torch.float32)  # [L, 2, H, D]
    centered = xf.double() - offset[:, :, :, None, :].double()
    rms = centered.pow(2).mean(dim=(2, 3, 4)).sqrt().clamp(1e-8, 1e36).float()  # [L, 2], finite in float32
    factors = torch.tensor(layer_step_factors(layers), dtype=torch.float32)[:, None]
    step_lk = (rms * LEVEL_STEP[LEVELS[li]] * factors).to(torch.float32)  # [L, 2]
    step = step_lk[:, :, None, None].expand(layers, 2, heads, head_dim).contiguous()
    scales = offset.to(torch.float16).numpy().astype("<f2").tobytes() + step_lk.numpy().astype("<f4").tobytes()
    return step, offset, scales


def _lossless(kv: torch.Tensor, profile_id: str | None, keys_pre_rope: bool) -> QuantizedChunk:
    layers, _, heads, tokens, head_dim = kv.shape
    zeros = torch.zeros(layers, 2, heads, head_dim)
    return QuantizedChunk(
        torch.zeros(kv.shape, dtype=torch.int16), zeros, zeros, kv.dtype, LOSSLESS, profile_id, keys_pre_rope,
        torch.arange(tokens), kv.detach().to("cpu").to(exact_dtype_for(kv, lossless=True)).contiguous(),
    )


def quantize(
    kv: torch.Tensor,
    profile: CodecProfile | None = None,
    level: str | int = "medium",
    keys_pre_rope: bool = True,
    exact_tokens: torch.Tensor | None = None,
) -> QuantizedChunk:
    """Quantize ``kv`` ``[L, 2, H, T, D]`` with the steps of ``profile`` (or of the chunk itself) at ``level``.

    ``exact_tokens`` (``Tensor[n]`` of token indices) are stored exactly; by default the attention sinks
    :func:`~kvrecall.encoder.quantize.find_sink_tokens` finds. Level ``"lossless"`` stores every value exactly.
    """
    check_kv(kv)
    if level == LOSSLESS:
        return _lossless(kv, None, keys_pre_rope)
    li = level_index(level)
    q = _quantize_steps(kv, profile, li, keys_pre_rope)
    tokens = find_sink_tokens(kv) if exact_tokens is None else _check_exact_tokens(exact_tokens, kv.shape[3])
    return with_exact_tokens(q, kv, tokens)


def _check_exact_tokens(tokens, n: int) -> torch.Tensor:
    t = torch.as_tensor(tokens)
    if t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise CodecError(f"exact_tokens must be a 1-D integer tensor, got {tuple(t.shape)} {t.dtype}")
    t = torch.unique(t.to(torch.int64))
    if t.numel() and (int(t[0]) < 0 or int(t[-1]) >= n):
        raise CodecError(f"exact_tokens must lie in [0, {n}), got {t.tolist()}")
    return t


def _quantize_steps(kv: torch.Tensor, profile: CodecProfile | None, li: int, keys_pre_rope: bool) -> QuantizedChunk:
    if profile is not None:
        profile.check_shape(kv.shape[0], kv.shape[2], kv.shape[4])
        if profile.keys_pre_rope != keys_pre_rope:
            raise CodecError(f"profile {profile.profile_id} was calibrated with keys_pre_rope={profile.keys_pre_rope}")
        step = torch.from_numpy(profile.step[li])
        offset = torch.from_numpy(profile.offset)
        vexp = value_token_exponents(kv[:, 1], offset[:, 1]) if uses_value_scales(profile) else None
        return quantize_with(kv, step, offset, LEVELS[li], profile.profile_id, keys_pre_rope, vexp)
    step, offset, _ = _fallback_scales(kv, li)
    return quantize_with(kv, step, offset, LEVELS[li], None, keys_pre_rope, _fallback_vexp(kv, offset))


def _fallback_vexp(kv: torch.Tensor, offset: torch.Tensor) -> torch.Tensor | None:
    """Per-token value exponents of a self-contained chunk (when its head_dim makes them pay)."""
    if kv.shape[4] < VALUE_SCALE_MIN_HEAD_DIM:
        return None
    return value_token_exponents(kv[:, 1], offset[:, 1])


def uses_value_scales(profile: CodecProfile) -> bool:
    """Whether chunks coded with ``profile`` carry per-token value scales (profiles calibrated with them)."""
    return bool(profile.info.get("value_token_scales", False))


# ---------------------------------------------------------------------------------------------------- encode
def _fallback_tables(coded_raw: np.ndarray, scale_bits: int) -> tuple[np.ndarray, TableSet, bytes]:
    """Per-chunk delta decisions and one table per (layer, K/V), chosen by empirical entropy."""
    layers, _, heads, tokens, head_dim = coded_raw.shape
    delta = np.zeros((layers, 2), dtype=bool)
    if tokens > 1:
        for l in range(layers):
            for kv in range(2):
                raw = coded_raw[l, kv]
                diff = np.diff(raw, axis=1)
                delta[l, kv] = entropy_bits(diff) < entropy_bits(raw[:, 1:])
    coded = apply_delta(coded_raw, delta)
    lo, freqs = [], []
    for l in range(layers):
        for kv in range(2):
            lo_t, f = table_from_values(coded[l, kv], scale_bits)
            lo.append(lo_t)
            freqs.append(f)
    tmap = np.broadcast_to(np.arange(layers * 2).reshape(layers, 2, 1, 1), (layers, 2, heads, head_dim)).copy()
    ts = TableSet(np.array(lo, dtype=np.int64), freqs, tmap, scale_bits)
    return delta, ts, serialize_tables(ts.lo, freqs)


def _to_streams(coded: np.ndarray, group: int) -> np.ndarray:
    """``[L, 2, H, T, D]`` -> ``[S, T * G]`` in stream order (layer, K/V, head, channel group), token-major."""
    layers, _, heads, tokens, head_dim = coded.shape
    ng = head_dim // group
    x = coded.reshape(layers, 2, heads, tokens, ng, group).transpose(0, 1, 2, 4, 3, 5)
    return x.reshape(layers * 2 * heads * ng, tokens * group)


def _from_streams(vals: np.ndarray, shape: tuple, group: int) -> np.ndarray:
    """Inverse of :func:`_to_streams`."""
    layers, _, heads, tokens, head_dim = shape
    ng = head_dim // group
    x = vals.reshape(layers, 2, heads, ng, tokens, group).transpose(0, 1, 2, 4, 3, 5)
    return x.reshape(shape)


def _stream_tables(tmap: np.ndarray, group: int) -> np.ndarray:
    """Table id of each stream's channel phase: ``[S, G]``."""
    layers, _, heads, head_dim = tmap.shape
    return tmap.reshape(layers * 2 * heads * (head_dim // group), group)


@dataclass
class _Prepared:
    """A chunk quantized and mapped to alphabet indices, ready for the rANS coder."""

    kv_shape: tuple
    dtype: torch.dtype
    level: str
    scale_bits: int
    keys_pre_rope: bool
    profile_id: str | None
    group: int
    delta: np.ndarray
    scales: bytes
    tables_bytes: bytes
    tables: TableSet | None
    idx: np.ndarray  # [S, T * G] alphabet indices
    tab: np.ndarray  # [S, G] table ids
    escapes: np.ndarray
    quantized: QuantizedChunk

    def pack(self, words: np.ndarray, counts: np.ndarray) -> bytes:
        q = self.quantized
        return pack_chunk(
            shape=self.kv_shape,
            dtype=self.dtype,
            level=self.level,
            scale_bits=self.scale_bits,
            keys_pre_rope=self.keys_pre_rope,
            profile_id=self.profile_id,
            channels_per_stream=self.group,
            delta=self.delta,
            scales=self.scales,
            tables=self.tables_bytes,
            word_counts=counts,
            escapes=self.escapes,
            words=words,
            exact_tokens=None if q.exact_tokens is None else q.exact_tokens.numpy(),
            exact_values=q.exact_values,
            value_exp=None if q.value_exp is None else q.value_exp.numpy(),
        )

    def encode_alone(self) -> bytes:
        if self.idx.shape[0] == 0:  # lossless: no streams
            return self.pack(np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.int64))
        return self.pack(*_encode_streams(self.idx, self.tab, self.tables.rans))


def _prepare(
    kv: torch.Tensor, profile: CodecProfile | None, level: str | int, keys_pre_rope: bool, exact_tokens=None
) -> _Prepared:
    check_kv(kv)
    layers, _, heads, tokens, head_dim = kv.shape
    if level == LOSSLESS:
        q = _lossless(kv, None, keys_pre_rope)
        empty = np.zeros((0, 0), dtype=np.int64)
        return _Prepared(
            tuple(kv.shape), kv.dtype, LOSSLESS, DEFAULT_SCALE_BITS, keys_pre_rope, None, head_dim,
            np.zeros((layers, 2), dtype=bool), b"", b"", None, empty, empty, np.zeros(0, dtype=np.int32), q,
        )  # fmt: skip
    li = level_index(level)
    if profile is not None:
        q = quantize(kv, profile, li, keys_pre_rope, exact_tokens)
        ts = profile.tableset(li)
        delta = profile.delta[li]
        scale_bits = profile.scale_bits
        scales, tables = b"", b""
    else:
        step, offset, scales = _fallback_scales(kv, li)
        q = quantize_with(kv, step, offset, LEVELS[li], None, keys_pre_rope, _fallback_vexp(kv, offset))
        sinks = find_sink_tokens(kv) if exact_tokens is None else _check_exact_tokens(exact_tokens, tokens)
        q = with_exact_tokens(q, kv, sinks)
        scale_bits = DEFAULT_SCALE_BITS
        delta, ts, tables = _fallback_tables(q.symbols.numpy().astype(np.int32), scale_bits)
    coded = apply_delta(q.symbols.numpy(), delta)
    group = choose_group(tokens, head_dim)
    vals = _to_streams(coded, group)
    tab = _stream_tables(ts.tmap, group)
    tab_full = np.tile(tab, (1, tokens))
    sizes = ts.sizes[tab_full]
    idx = vals - ts.lo[tab_full]
    esc = (idx < 0) | (idx >= sizes - 1)
    idx[esc] = sizes[esc] - 1
    escapes = coded[_from_streams(esc, coded.shape, group)].astype(np.int32)  # C order of [L, 2, H, T, D]
    return _Prepared(
        tuple(kv.shape), kv.dtype, LEVELS[li], scale_bits, keys_pre_rope,
        profile.profile_id if profile is not None else None, group, delta, scales, tables, ts, idx, tab, escapes, q,
    )  # fmt: skip


def encode(
    kv: torch.Tensor,
    profile: CodecProfile | None = None,
    level: str | int = "medium",
    *,
    keys_pre_rope: bool = True,
    exact_tokens: torch.Tensor | None = None,
) -> bytes:
    """Encode a KV chunk into one self-describing bitstream.

    Parameters
    ----------
    kv : Tensor[L, 2, H, T, D]
        float32/float16/bfloat16, ``T >= 1``; keys pre-RoPE by default.
    profile : CodecProfile, optional
        The model's calibrated profile; None makes a self-contained chunk (steps and tables inside).
    level : str or int
        Name from :data:`LEVELS` (finest first), or ``"lossless"`` (every value in its own dtype).
    keys_pre_rope : bool
        Recorded in the header; must match the profile's.
    exact_tokens : Tensor[n], int, optional
        Token indices to store exactly; default: the attention sinks found by
        :func:`~kvrecall.encoder.quantize.find_sink_tokens`.

    Returns
    -------
    bytes
        ``decode(result) == dequantize(quantize(kv, profile, level))`` exactly.
    """
    return _prepare(kv, profile, level, keys_pre_rope, exact_tokens).encode_alone()


def encode_many(
    kvs: list[torch.Tensor],
    profile: CodecProfile | None = None,
    level: str | int = "medium",
    *,
    keys_pre_rope: bool = True,
) -> list[bytes]:
    """:func:`encode` of many chunks; with a profile, the streams of all equal-length chunks share one loop.

    Returns exactly ``[encode(kv, profile, level) for kv in kvs]``, faster.
    """
    if not isinstance(kvs, (list, tuple)):
        raise CodecError(f"encode_many takes a list of tensors, got {type(kvs).__name__}")
    preps = [_prepare(kv, profile, level, keys_pre_rope) for kv in kvs]
    out: list = [None] * len(preps)
    if profile is None or level == LOSSLESS:
        return [p.encode_alone() for p in preps]
    groups: dict = {}
    for i, p in enumerate(preps):
        groups.setdefault(p.idx.shape, []).append(i)
    for members in groups.values():
        idx = np.concatenate([preps[i].idx for i in members])
        tab = np.concatenate([preps[i].tab for i in members])
        words, counts = _encode_streams(idx, tab, preps[members[0]].tables.rans)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        s0 = 0
        for i in members:
            n = preps[i].idx.shape[0]
            out[i] = preps[i].pack(words[bounds[s0] : bounds[s0 + n]], counts[s0 : s0 + n])
            s0 += n
    return out


# ---------------------------------------------------------------------------------------------------- decode
@dataclass
class ParsedChunk:
    """A validated chunk with everything a decoder (CPU or GPU) needs, from :func:`parse_chunk`.

    Attributes
    ----------
    header : ChunkHeader
        Validated header (section offsets, stream word counts/offsets, delta flags, escape count).
    data : memoryview
        The chunk's bytes (views below point into it; nothing is copied).
    tables : TableSet
        The rANS tables the streams were coded with (the profile's for ``header.level``, or the chunk's own).
    step, offset : Tensor[L, 2, H, D], float32
        ``x_hat = symbols * step + offset`` per channel.
    table_key : object
        Equal for chunks that share ``tables`` (a ``(profile_id, level index)`` tuple for profile chunks); a
        fresh object for self-contained chunks.
    """

    header: ChunkHeader
    data: memoryview
    tables: TableSet
    step: torch.Tensor
    offset: torch.Tensor
    table_key: object

    def payload_words(self) -> np.ndarray:
        """The rANS payload: ``ndarray[header.payload_words]``, uint16 view (stream ``s`` starts at
        ``header.stream_word_offsets[s]``)."""
        h = self.header
        return np.frombuffer(self.data, dtype="<u2", count=h.payload_words, offset=h.payload_offset)

    def escape_values(self) -> np.ndarray:
        """The escape section: ``ndarray[header.n_escapes]``, int32 view, C order of ``[L, 2, H, T, D]``."""
        h = self.header
        return np.frombuffer(self.data, dtype="<i4", count=h.n_escapes, offset=h.escapes_offset)

    def stream_tables(self) -> np.ndarray:
        """Table id of each stream's channel phase: ``ndarray[n_streams, G]``, int64 (symbol ``i`` of stream ``s``
        uses table ``stream_tables()[s, i % G]``)."""
        return _stream_tables(self.tables.tmap, self.header.channels_per_stream)

    def exact_tokens(self) -> np.ndarray:
        """Tokens stored exactly: ``ndarray[header.n_exact]``, int32 view, ascending."""
        h = self.header
        return np.frombuffer(self.data, dtype="<i4", count=h.n_exact, offset=h.exact_offset)

    def exact_values(self) -> torch.Tensor:
        """Their values: ``Tensor[L, 2, H, n_exact, D]`` in ``header.exact_dtype`` (a view of the chunk's bytes)."""
        h = self.header
        layers, _, heads, _, head_dim = h.shape
        n = layers * 2 * heads * h.n_exact * head_dim
        wide = h.exact_dtype == torch.float32
        raw = np.frombuffer(self.data, dtype="<i4" if wide else "<i2", count=n, offset=h.exact_offset + 4 * h.n_exact)
        with warnings.catch_warnings():  # read-only buffer: torch warns; the view is never written
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(raw).view(h.exact_dtype)
        return t.reshape(layers, 2, heads, h.n_exact, head_dim)

    def value_exp(self) -> np.ndarray | None:
        """Per-token value scale exponents ``ndarray[L, H, T]``, int8 (None when the chunk has none)."""
        h = self.header
        if not h.value_scales:
            return None
        layers, _, heads, tokens, _ = h.shape
        n = layers * heads * tokens
        packed = np.frombuffer(self.data, dtype=np.uint8, count=(n + 1) // 2, offset=h.value_exp_offset)
        nib = np.empty(2 * packed.size, dtype=np.int8)
        nib[0::2] = packed & 15
        nib[1::2] = packed >> 4
        return (nib[:n] - 8).reshape(layers, heads, tokens)

    def finish(self, coded):
        """:func:`~kvrecall.encoder.tables.finish_symbols` with this chunk's delta flags and escapes (in place)."""
        return finish_symbols(coded, self.header.delta, self.header.n_escapes, self.escape_values())


def parse_chunk(data: bytes | bytearray | memoryview, profile: CodecProfile | None = None) -> ParsedChunk:
    """Validate a chunk and resolve its tables and steps (from ``profile`` or from the chunk itself).

    Every host-side check of the decoder happens here: header, CRC32, sizes (:func:`parse_header`), the profile
    match, the tables' frequency rules and the steps/offsets. Decoders (this module, ``kvrecall.kernels``,
    benches) start from the result.

    Raises
    ------
    CodecError
        Malformed/corrupted chunk, wrong or missing profile, inconsistent settings.
    """
    h = parse_header(data)
    mv = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    layers, _, heads, _, head_dim = h.shape
    if h.lossless:
        zeros = torch.zeros(layers, 2, heads, head_dim)
        return ParsedChunk(h, mv, None, zeros, zeros, object())
    if h.profile_id is not None:
        if profile is None:
            raise CodecError(f"chunk was encoded with codec profile {h.profile_id}; pass that profile to decode it")
        if profile.profile_id != h.profile_id:
            raise CodecError(
                f"chunk needs codec profile {h.profile_id}, got profile {profile.profile_id} (model {profile.model_id})"
            )
        profile.check_shape(layers, heads, head_dim)
        li = LEVELS.index(h.level)
        if profile.scale_bits != h.scale_bits or not np.array_equal(profile.delta[li], h.delta):
            raise CodecError("chunk coding settings disagree with its profile")
        ts = profile.tableset(li)
        step = torch.from_numpy(profile.step[li])
        offset = torch.from_numpy(profile.offset)
        key = (h.profile_id, li)
    else:
        sc = mv[h.scales_offset : h.scales_offset + h.scales_len]
        n_off = layers * 2 * heads * head_dim
        offset = torch.from_numpy(np.frombuffer(sc, dtype="<f2", count=n_off).astype(np.float32))
        offset = offset.reshape(layers, 2, heads, head_dim)
        step_lk = np.frombuffer(sc, dtype="<f4", count=layers * 2, offset=2 * n_off).astype(np.float32)
        if not (np.all(np.isfinite(step_lk)) and np.all(step_lk > 0) and torch.isfinite(offset).all()):
            raise CodecError("chunk has invalid quantization steps or offsets")
        step = torch.from_numpy(step_lk).reshape(layers, 2, 1, 1).expand(layers, 2, heads, head_dim).contiguous()
        lo, freqs = parse_tables(mv[h.tables_offset : h.tables_offset + h.tables_len], h.scale_bits, layers * 2)
        tmap = np.broadcast_to(np.arange(layers * 2).reshape(layers, 2, 1, 1), (layers, 2, heads, head_dim))
        ts = TableSet(lo, freqs, tmap.copy(), h.scale_bits)
        key = object()
    return ParsedChunk(h, mv, ts, step, offset, key)


def _decode_group(parts: list[ParsedChunk]) -> list[np.ndarray]:
    """Decode the streams of chunks sharing tables and ``G`` in one lockstep loop.

    Returns the symbols of each chunk as an int32 array ``[L, 2, H, T, D // G, G]`` (reshape to
    ``[L, 2, H, T, D]`` after copying): a strided view into the decoder output when the chunk has no escapes
    and no delta coding (nothing to fix up), else a contiguous array.
    """
    ts = parts[0].tables
    group = parts[0].header.channels_per_stream
    words = np.concatenate(
        [np.frombuffer(p.data, dtype="<u2", count=p.header.payload_words, offset=p.header.payload_offset) for p in parts]
    ).astype(np.uint16, copy=False)
    base = np.cumsum([0] + [p.header.payload_words for p in parts])[:-1]
    starts = np.concatenate([p.header.stream_word_offsets + b for p, b in zip(parts, base)])
    ends = starts + np.concatenate([p.header.stream_word_counts for p in parts])
    lengths = np.concatenate([np.full(p.header.n_streams, p.header.symbols_per_stream) for p in parts])
    tab = _stream_tables(ts.tmap, group)
    tabs = np.tile(tab, (len(parts), 1))
    order = np.argsort(-lengths, kind="stable")
    same_order = bool(np.all(order == np.arange(order.size)))
    if not same_order:
        starts, ends, lengths, tabs = starts[order], ends[order], lengths[order], tabs[order]
    vals, stream_major = _decode_streams(words, starts, lengths, tabs.T, ts.rans, ends, ts.value_lut)
    if not same_order:
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        vals = vals[inverse] if stream_major else vals[:, inverse]
    out = []
    s0 = 0
    for p in parts:
        h = p.header
        layers, _, heads, tokens, head_dim = h.shape
        ng = head_dim // group
        if stream_major:
            v = vals[s0 : s0 + h.n_streams, : h.symbols_per_stream]  # [S, T * G]
            view6 = v.reshape(layers, 2, heads, ng, tokens, group).transpose(0, 1, 2, 4, 3, 5)  # [L,2,H,T,ng,G]
        else:
            v = vals[: h.symbols_per_stream, s0 : s0 + h.n_streams]  # [T * G, S]
            view6 = v.reshape(tokens, group, layers, 2, heads, ng).transpose(2, 3, 4, 0, 5, 1)
        s0 += h.n_streams
        if h.n_escapes == 0 and not h.delta.any():
            if v.size and int(v.min()) == ESCAPE:
                raise CodecError("chunk declares no escapes but its streams hold some")
            out.append(view6)
            continue
        coded = p.finish(np.ascontiguousarray(view6).reshape(h.shape))
        out.append(coded.reshape(view6.shape))
    return out


def _to_quantized(p: ParsedChunk, coded6: np.ndarray | None) -> QuantizedChunk:
    h = p.header
    sym = np.zeros(h.shape, dtype=np.int16)
    if coded6 is not None:
        np.copyto(sym.reshape(coded6.shape), coded6, casting="unsafe")  # values are within +-32767 (checked)
    tokens, values = None, None
    if h.n_exact:
        tokens = torch.from_numpy(p.exact_tokens().astype(np.int64))
        values = p.exact_values().clone()
    vexp = p.value_exp()
    return QuantizedChunk(
        torch.from_numpy(sym), p.step, p.offset, h.dtype, h.level, h.profile_id, h.keys_pre_rope, tokens, values,
        None if vexp is None else torch.from_numpy(vexp),
    )


def _dequantize_coded(p: ParsedChunk, coded6: np.ndarray | None, dtype: torch.dtype | None, device) -> torch.Tensor:
    """Values ``symbols * step + offset`` straight from the int32 symbols ``[L, 2, H, T, D//G, G]`` (one strided
    pass, float32 numpy, then dtype/device), the exactly stored tokens written over them."""
    h = p.header
    dtype = dtype or h.dtype
    if h.lossless:
        return p.exact_values().to(device=device, dtype=dtype, copy=True)
    layers, _, heads, tokens, ng, group = coded6.shape
    step = p.step.numpy().reshape(layers, 2, heads, 1, ng, group)
    offset = p.offset.numpy().reshape(layers, 2, heads, 1, ng, group)
    x = np.empty(h.shape, dtype=np.float32)
    x6 = x.reshape(coded6.shape)
    np.multiply(coded6, step, out=x6, dtype=np.float32)
    vexp = p.value_exp()
    if vexp is not None:
        x6[:, 1] *= value_scales(torch.from_numpy(vexp)).numpy()[..., None, None]
    x6 += offset
    out = torch.from_numpy(x)
    if h.n_exact:
        out[:, :, :, torch.from_numpy(p.exact_tokens().astype(np.int64))] = p.exact_values().to(torch.float32)
    return out.to(device=device, dtype=dtype)


def decode_symbols(data: bytes, profile: CodecProfile | None = None) -> QuantizedChunk:
    """Decode a chunk to its working form (integer symbols + steps/offsets) without dequantizing."""
    p = parse_chunk(data, profile)
    return _to_quantized(p, None if p.header.lossless else _decode_group([p])[0])


def decode(
    data: bytes, profile: CodecProfile | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Decode a chunk to ``Tensor[L, 2, H, T, D]`` (``dtype`` defaults to the encoded tensor's dtype)."""
    p = parse_chunk(data, profile)
    return _dequantize_coded(p, None if p.header.lossless else _decode_group([p])[0], dtype, device)


def _decode_many_coded(chunks: list[bytes], profile: CodecProfile | None) -> tuple[list[ParsedChunk], list[np.ndarray]]:
    if not isinstance(chunks, (list, tuple)):
        raise CodecError(f"decode_many takes a list of chunks, got {type(chunks).__name__}")
    parsed = [parse_chunk(c, profile) for c in chunks]
    groups: dict = {}
    # numpy: one lockstep loop for all chunks sharing tables (amortizes per-call overhead). C: chunk by chunk
    # (its cost is per symbol, and a narrow [T*G, S] output keeps its writes cache-local).
    per_chunk = _use_native()
    for i, p in enumerate(parsed):
        if not p.header.lossless:
            groups.setdefault(i if per_chunk else (p.table_key, p.header.channels_per_stream), []).append(i)
    coded: list = [None] * len(parsed)
    for members in groups.values():
        for i, c in zip(members, _decode_group([parsed[i] for i in members])):
            coded[i] = c
    return parsed, coded


def decode_many_symbols(chunks: list[bytes], profile: CodecProfile | None = None) -> list[QuantizedChunk]:
    """:func:`decode_symbols` of many chunks, decoding all streams that share tables in one lockstep loop."""
    parsed, coded = _decode_many_coded(chunks, profile)
    return [_to_quantized(p, c) for p, c in zip(parsed, coded)]


def decode_many(
    chunks: list[bytes],
    profile: CodecProfile | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """:func:`decode` of many chunks; the streams of all chunks advance in one vectorized loop."""
    parsed, coded = _decode_many_coded(chunks, profile)
    return [_dequantize_coded(p, c, dtype, device) for p, c in zip(parsed, coded)]
