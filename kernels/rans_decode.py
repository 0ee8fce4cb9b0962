"""rANS bitstream decode + dequantize on the GPU, writing KV straight into the destination cache layout.

Decodes chunks of the codec's format (``docs/format.md``, reference decoder :mod:`kvrecall.encoder`):

1. **Host checks before launch** — :func:`kvrecall.encoder.parse_header` (magic, version, CRC32, every size
   against the data length), the profile match, the tables' frequency rules and the escape values' range. Corrupt
   input raises :class:`kvrecall.encoder.CodecError` before anything runs on the device.
2. ``_rans_decode_kernel`` — one lane per stream, ``BLOCK`` streams per program, all streams of all chunks of a
   launch advance together; each step is the loop of ``docs/format.md`` §3 (one LUT gather, a few integer ops,
   at most one 16-bit word read) and writes the coded value of the symbol (or the escape marker) straight to its
   ``[L, 2, H, T, D]`` position. Every lane reports its final state and word pointer.
3. **Host/device checks after** — every stream must end in state ``2^16`` with its words consumed; then the
   codec's own :func:`kvrecall.encoder.finish_symbols` (one implementation for numpy and torch) fills escapes in
   C order, undoes delta coding and checks the ``+-32767`` range on the device, so the symbols are identical to
   :func:`kvrecall.encoder.decode_symbols` on every input (or both raise).
4. ``_dequant_kernel`` — ``x = float32(q) * step + offset`` (no fused multiply-add, like numpy) cast to the
   destination dtype and stored at token offset ``start`` of a ``[L, 2, H, T_dest, D]`` destination (any strides,
   channels contiguous), e.g. a preallocated cache; values of chunks with per-token scales (format v2) are
   ``float32(q * step) * VALUE_SCALE_TABLE[e + 8] + offset``; then the chunk's exactly stored tokens (format v2: attention
   sinks; every token of a lossless chunk) are written over their rows.

Reference twins: :func:`decode_symbols_reference` / :func:`decode_reference` (the CPU codec).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kvrecall.kernels.common import (
    FLOAT_DTYPES,
    KernelInputError,
    KernelShapeError,
    check_launchable,
    check_tensor,
    next_power_of_2,
)

__all__ = [
    "decode_symbols_gpu",
    "decode_into",
    "decode_gpu",
    "decode_symbols_reference",
    "decode_reference",
    "compile_variants",
    "bench_rows",
]

RANS_L = 1 << 16


# ----------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _rans_decode_kernel(
    WORDS, STARTS, ENDS, NSYM, GROUPS, TAB, OUT_BASE, OUT_TSTRIDE, LUT, VALUES, OUT, FINAL_X, FINAL_PTR,
    n_streams, max_symbols, tab_stride,
    SCALE_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    sm = s < n_streams
    start = tl.load(STARTS + s, mask=sm, other=0)
    end = tl.load(ENDS + s, mask=sm, other=0)
    nsym = tl.load(NSYM + s, mask=sm, other=0)
    group = tl.load(GROUPS + s, mask=sm, other=1)
    base = tl.load(OUT_BASE + s, mask=sm, other=0)
    tstride = tl.load(OUT_TSTRIDE + s, mask=sm, other=0).to(tl.int64)
    tab_row = TAB + s.to(tl.int64) * tab_stride

    hi = tl.load(WORDS + start, mask=sm, other=0).to(tl.uint32) & 0xFFFF
    lo = tl.load(WORDS + start + 1, mask=sm, other=0).to(tl.uint32) & 0xFFFF
    x = (hi << 16) | lo
    ptr = start + 2
    phase = tl.zeros([BLOCK], tl.int32)
    tok = tl.zeros([BLOCK], tl.int64)
    for i in range(0, max_symbols):
        live = sm & (i < nsym)
        table = tl.load(tab_row + phase, mask=live, other=0).to(tl.int64)
        slot = (x & ((1 << SCALE_BITS) - 1)).to(tl.int64)
        entry = tl.load(LUT + table * (1 << SCALE_BITS) + slot, mask=live, other=0).to(tl.uint32)
        value = tl.load(VALUES + table * (1 << SCALE_BITS) + slot, mask=live, other=0)
        tl.store(OUT + base + tok * tstride + phase, value, mask=live)
        x_next = (entry & 0xFFFF) * (x >> SCALE_BITS) + (entry >> 16)
        x = tl.where(live, x_next, x)
        need = live & (x < 65536)
        word = tl.load(WORDS + ptr, mask=need & (ptr < end), other=0).to(tl.uint32) & 0xFFFF
        x = tl.where(need, (x << 16) | word, x)
        ptr += need.to(tl.int64)
        phase += 1
        wrap = phase == group
        phase = tl.where(wrap, 0, phase)
        tok += wrap.to(tl.int64)
    tl.store(FINAL_X + s, x.to(tl.int64), mask=sm)
    tl.store(FINAL_PTR + s, ptr, mask=sm)


@triton.jit
def _dequant_kernel(
    CODED, STEP, OFFSET, VEXP, SCALES, OUT, tokens, heads, start,
    stride_ol, stride_okv, stride_oh, stride_ot,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_T: tl.constexpr, OUT_BF16: tl.constexpr,
    HAS_VSCALE: tl.constexpr,
):
    lkh = tl.program_id(0).to(tl.int64)  # flat (layer, K/V, head)
    h = lkh % heads
    lkv = lkh // heads
    kv = lkv % 2
    layer = lkv // 2
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, DIM_PAD)
    tm = t < tokens
    dm = d < HEAD_DIM
    mask = tm[:, None] & dm[None, :]
    q = tl.load(CODED + (lkh * tokens + t.to(tl.int64))[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0)
    step = tl.load(STEP + lkh * HEAD_DIM + d, mask=dm, other=0.0)
    offset = tl.load(OFFSET + lkh * HEAD_DIM + d, mask=dm, other=0.0)
    x = q.to(tl.float32) * step[None, :]  # launched with enable_fp_fusion=False: rounds like numpy
    if HAS_VSCALE:  # values: float32(q * step) * VALUE_SCALE_TABLE[e + 8], e per (layer, head, token)
        e = tl.load(VEXP + (layer * heads + h) * tokens + t.to(tl.int64), mask=tm, other=0).to(tl.int32)
        scale = tl.load(SCALES + e + 8, mask=tm, other=1.0)  # (keys read a valid entry too, then use 1)
        scale = tl.where(kv == 1, scale, 1.0)
        x = x * scale[:, None]
    x = x + offset[None, :]
    row = layer * stride_ol + kv * stride_okv + h * stride_oh + (start + t.to(tl.int64)) * stride_ot
    if OUT_BF16:  # round to nearest even by hand (torch's rule; the interpreter's own cast truncates)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(OUT + row[:, None] + d[None, :], bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(OUT + row[:, None] + d[None, :], x.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- host parsing
def _parse(data: bytes, profile):
    """Every host-side check of the CPU decoder (header, CRC, profile, tables, scales) — raises CodecError."""
    from kvrecall.encoder import parse_chunk

    return parse_chunk(data, profile)


class _DeviceTables:
    """Decode tables of one TableSet on a device: packed ``freq | bias << 16`` and coded value per slot."""

    def __init__(self, tables, device: torch.device) -> None:
        r = tables.rans
        self.scale_bits = int(tables.scale_bits)
        self.n_tables = int(r.n_tables)
        self.lut = torch.from_numpy(r.lut.view(np.int32).copy()).to(device)
        self.values = torch.from_numpy(np.ascontiguousarray(tables.value_lut, dtype=np.int32)).to(device)


_TABLE_CACHE: dict = {}


def _device_tables(chunk, device: torch.device) -> _DeviceTables:
    key = chunk.table_key
    if isinstance(key, tuple):  # profile tables: shared by every chunk of that (profile, level); keep them
        cache_key = (key, str(device))
        if cache_key not in _TABLE_CACHE:
            if len(_TABLE_CACHE) > 64:
                _TABLE_CACHE.clear()
            _TABLE_CACHE[cache_key] = _DeviceTables(chunk.tables, device)
        return _TABLE_CACHE[cache_key]
    return _DeviceTables(chunk.tables, device)


def _as_chunks(chunks) -> list:
    from kvrecall.encoder import CodecError

    if isinstance(chunks, (bytes, bytearray, memoryview)):
        return [chunks]
    if not isinstance(chunks, (list, tuple)):
        raise CodecError(f"chunks must be bytes or a list of bytes, got {type(chunks).__name__}")
    return list(chunks)


# ------------------------------------------------------------------------------------------------- decoding
def _decode_coded(parsed: list, device: torch.device) -> list[torch.Tensor]:
    """Run the rANS kernel over all streams of ``parsed`` (one launch per scale_bits); return coded int32 arrays."""
    from kvrecall.encoder import CodecError

    out = [None] * len(parsed)
    by_bits: dict[int, list[int]] = {}
    for i, p in enumerate(parsed):
        if p.header.lossless:  # no streams: every value is in the exact section
            out[i] = torch.zeros(p.header.shape, dtype=torch.int32, device=device)
            continue
        by_bits.setdefault(p.header.scale_bits, []).append(i)
    for scale_bits, members in by_bits.items():
        # distinct table sets of this launch, concatenated with table-id offsets
        table_sets, table_base, luts, values = {}, [], [], []
        n_tables = 0
        for i in members:
            key = id(parsed[i].tables)  # stable: `parsed` holds every TableSet for the whole call
            if key not in table_sets:
                dev_tables = _device_tables(parsed[i], device)
                table_sets[key] = n_tables
                luts.append(dev_tables.lut)
                values.append(dev_tables.values)
                n_tables += dev_tables.n_tables
            table_base.append(table_sets[key])
        lut = luts[0] if len(luts) == 1 else torch.cat(luts)
        value_lut = values[0] if len(values) == 1 else torch.cat(values)

        words, starts, ends, nsym, groups, out_base, tstride, tabs = [], [], [], [], [], [], [], []
        word_base, elem_base = 0, 0
        g_max = max(parsed[i].header.channels_per_stream for i in members)
        sizes = []
        for i, tb in zip(members, table_base):
            h = parsed[i].header
            layers, _, heads, tokens, head_dim = h.shape
            g = h.channels_per_stream
            ng = head_dim // g
            words.append(parsed[i].payload_words())
            starts.append(h.stream_word_offsets + word_base)
            ends.append(h.stream_word_offsets + h.stream_word_counts + word_base)
            nsym.append(np.full(h.n_streams, h.symbols_per_stream, dtype=np.int64))
            groups.append(np.full(h.n_streams, g, dtype=np.int32))
            lkh = np.arange(layers * 2 * heads, dtype=np.int64).repeat(ng)
            gi = np.tile(np.arange(ng, dtype=np.int64), layers * 2 * heads)
            out_base.append(elem_base + lkh * tokens * head_dim + gi * g)
            tstride.append(np.full(h.n_streams, head_dim, dtype=np.int32))
            tab = parsed[i].stream_tables().astype(np.int32) + tb  # §2: table of channel g*G+j
            tabs.append(np.pad(tab, ((0, 0), (0, g_max - g))))
            word_base += h.payload_words
            elem_base += h.num_elements
            sizes.append(h.num_elements)
        n_streams = sum(len(s) for s in starts)
        max_symbols = int(max(int(a.max()) for a in nsym))
        to_dev = lambda a, dt: torch.from_numpy(np.ascontiguousarray(np.concatenate(a))).to(device, dt)  # noqa: E731
        words_dev = torch.from_numpy(np.concatenate(words).view(np.int16)).to(device)
        starts_dev, ends_dev = to_dev(starts, torch.int64), to_dev(ends, torch.int64)
        coded = torch.empty(elem_base, dtype=torch.int32, device=device)
        final_x = torch.empty(n_streams, dtype=torch.int64, device=device)
        final_ptr = torch.empty(n_streams, dtype=torch.int64, device=device)
        block = 32 if device.type == "cuda" else 64
        _rans_decode_kernel[(triton.cdiv(n_streams, block),)](
            words_dev, starts_dev, ends_dev, to_dev(nsym, torch.int64), to_dev(groups, torch.int32),
            to_dev(tabs, torch.int32), to_dev(out_base, torch.int64), to_dev(tstride, torch.int32),
            lut, value_lut, coded, final_x, final_ptr,
            n_streams, max_symbols, g_max,
            SCALE_BITS=scale_bits, BLOCK=block,
        )
        bad = torch.nonzero((final_x != RANS_L) | (final_ptr != ends_dev)).flatten().cpu()
        if bad.numel():
            raise CodecError(
                f"{bad.numel()} of {n_streams} rANS streams did not decode cleanly (first: stream {int(bad[0])}); "
                "the data is corrupted or was decoded with the wrong tables"
            )
        for i, part in zip(members, torch.split(coded, sizes)):
            out[i] = part.view(parsed[i].header.shape)
    return out


def _finish_symbols(p, coded: torch.Tensor) -> torch.Tensor:
    """Escapes, delta, range check: the codec's own :func:`kvrecall.encoder.finish_symbols`, on the device."""
    return p.finish(coded)


def _value_scale_table(device: torch.device) -> torch.Tensor:
    """The codec's per-token value scale factors (``VALUE_SCALE_TABLE``, float32[16]) on ``device``."""
    from kvrecall.encoder.quantize import VALUE_SCALE_TABLE

    key = ("value_scales", str(device))
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = torch.from_numpy(VALUE_SCALE_TABLE.copy()).to(device)
    return _TABLE_CACHE[key]


def _check_device(device) -> torch.device:
    device = torch.device(device)
    check_launchable(_rans_decode_kernel, device)
    return device


def decode_symbols_gpu(chunks, profile=None, device: torch.device | str = "cuda") -> list[torch.Tensor]:
    """Decode chunks to their int16 symbols on ``device`` (Triton twin of ``kvrecall.encoder.decode_symbols``).

    Parameters
    ----------
    chunks : bytes or list of bytes
        Chunks in the codec format; all streams of all chunks decode in one launch per ``scale_bits``.
    profile : kvrecall.encoder.CodecProfile, optional
        Needed for profile chunks.
    device : torch.device or str

    Returns
    -------
    list of Tensor[L, 2, H, T, D], int16
    """
    device = _check_device(device)
    parsed = [_parse(c, profile) for c in _as_chunks(chunks)]
    if not parsed:
        return []
    return [_finish_symbols(p, c).to(torch.int16) for p, c in zip(parsed, _decode_coded(parsed, device))]


def decode_into(chunks, out: torch.Tensor, profile=None, start: int = 0) -> int:
    """Decode consecutive chunks and write their dequantized KV into ``out`` from token ``start`` on.

    Parameters
    ----------
    chunks : bytes or list of bytes
        Chunks of consecutive tokens (e.g. a prefix chain), all with ``out``'s ``L``, ``H``, ``D``.
    out : Tensor[L, 2, H, T_dest, D], float16/bfloat16/float32, on the decoding device
        Destination cache (any strides with channels contiguous). Chunk ``i`` lands at tokens
        ``start + sum(T of chunks before i)``.
    profile : kvrecall.encoder.CodecProfile, optional
    start : int

    Returns
    -------
    int
        The token index after the last written token.
    """
    check_tensor("out", out, dtypes=FLOAT_DTYPES, ndim=5, last_dim_contiguous=True)
    if out.shape[1] != 2:
        raise KernelShapeError(f"out must be [L, 2, H, T, D], got {tuple(out.shape)}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise KernelInputError(f"start must be an int >= 0, got {start!r}")
    device = _check_device(out.device)
    parsed = [_parse(c, profile) for c in _as_chunks(chunks)]
    layers, _, heads, dest_tokens, head_dim = out.shape
    total = start
    for p in parsed:
        cl, _, ch, ct, cd = p.header.shape
        if (cl, ch, cd) != (layers, heads, head_dim):
            raise KernelShapeError(f"chunk shape {p.header.shape} does not fit destination {tuple(out.shape)}")
        total += ct
    if total > dest_tokens:
        raise KernelShapeError(f"chunks need tokens up to {total}, destination holds {dest_tokens}")
    if not parsed:
        return start
    coded = _decode_coded(parsed, device)
    pos = start
    for p, c in zip(parsed, coded):
        tokens = p.header.shape[3]
        if p.header.lossless:
            out[:, :, :, pos : pos + tokens] = p.exact_values().to(out.device, torch.float32).to(out.dtype)
            pos += tokens
            continue
        symbols = _finish_symbols(p, c)
        step = p.step.to(device, torch.float32).contiguous()
        offset = p.offset.to(device, torch.float32).contiguous()
        block_t = 16 if device.type == "cuda" else 32
        bf16 = out.dtype == torch.bfloat16
        vexp = p.value_exp()
        vexp_dev = torch.from_numpy(vexp if vexp is not None else np.zeros(1, np.int8)).to(device).contiguous()
        _dequant_kernel[(layers * 2 * heads, triton.cdiv(tokens, block_t))](
            symbols, step, offset, vexp_dev, _value_scale_table(device), out.view(torch.int16) if bf16 else out,
            tokens, heads, pos, out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            HEAD_DIM=head_dim, DIM_PAD=next_power_of_2(head_dim), BLOCK_T=block_t, OUT_BF16=bf16,
            HAS_VSCALE=vexp is not None, enable_fp_fusion=False,
        )
        if p.header.n_exact:  # exactly stored tokens (attention sinks) overwrite their dequantized rows
            idx = torch.from_numpy(p.exact_tokens().astype(np.int64)).to(out.device) + pos
            out[:, :, :, idx] = p.exact_values().to(out.device, torch.float32).to(out.dtype)
        pos += tokens
    return pos


def decode_gpu(data, profile=None, device: torch.device | str = "cuda", dtype: torch.dtype | None = None):
    """One chunk to ``Tensor[L, 2, H, T, D]`` on ``device`` (Triton twin of ``kvrecall.encoder.decode``)."""
    p = _parse(data, profile)
    out = torch.empty(p.header.shape, dtype=dtype or p.header.dtype, device=torch.device(device))
    decode_into([data], out, profile)
    return out


def decode_symbols_reference(data, profile=None) -> torch.Tensor:
    """CPU reference: ``kvrecall.encoder.decode_symbols(data, profile).symbols`` (int16)."""
    from kvrecall.encoder import decode_symbols

    return decode_symbols(data, profile).symbols


def decode_reference(data, profile=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """CPU reference: ``kvrecall.encoder.decode(data, profile, dtype=dtype)``."""
    from kvrecall.encoder import decode

    return decode(data, profile, dtype=dtype)


# ---------------------------------------------------------------------------------------- compile and bench
def compile_variants():
    """Variants for :mod:`kvrecall.kernels.compile_check`."""
    dec = ("WORDS STARTS ENDS NSYM GROUPS TAB OUT_BASE OUT_TSTRIDE LUT VALUES OUT FINAL_X FINAL_PTR "
           "n_streams max_symbols tab_stride SCALE_BITS BLOCK").split()
    types = {"WORDS": "*i16", "STARTS": "*i64", "ENDS": "*i64", "NSYM": "*i64", "GROUPS": "*i32", "TAB": "*i32",
             "OUT_BASE": "*i64", "OUT_TSTRIDE": "*i32", "LUT": "*i32", "VALUES": "*i32", "OUT": "*i32",
             "FINAL_X": "*i64", "FINAL_PTR": "*i64", "SCALE_BITS": "constexpr", "BLOCK": "constexpr"}
    sig = {n: types.get(n, "i32") for n in dec}
    deq = ("CODED STEP OFFSET VEXP SCALES OUT tokens heads start stride_ol stride_okv stride_oh stride_ot "
           "HEAD_DIM DIM_PAD BLOCK_T").split()
    out = [("rans_decode: decode streams", _rans_decode_kernel, sig, dict(SCALE_BITS=12, BLOCK=32))]
    for dt in ("fp16", "bf16"):
        types = {"CODED": "*i32", "STEP": "*fp32", "OFFSET": "*fp32", "VEXP": "*i8", "SCALES": "*fp32",
                 "OUT": "*i16" if dt == "bf16" else "*fp16", "HEAD_DIM": "constexpr", "DIM_PAD": "constexpr",
                 "BLOCK_T": "constexpr", "OUT_BF16": "constexpr", "HAS_VSCALE": "constexpr"}
        sig = {n: types.get(n, "i32") for n in deq + ["OUT_BF16", "HAS_VSCALE"]}
        out.append((f"rans_decode: dequantize to {dt}", _dequant_kernel, sig,
                    dict(HEAD_DIM=128, DIM_PAD=128, BLOCK_T=16, OUT_BF16=dt == "bf16", HAS_VSCALE=True,
                         enable_fp_fusion=False)))
    return out


def bench_rows(device, timer, bandwidth, quick: bool, label: str, make_row, kernel: bool, tiny: bool = False):
    """Decode throughput rows for ``bench/kernels.py``: GBps = fp16-equivalent output bytes per second.

    ``kernel=False`` times the CPU reference decoder (:func:`kvrecall.encoder.decode_many`), ``kernel=True`` the
    Triton path (:func:`decode_into`) on ``device``; ``tiny`` shrinks the chunks for an interpreter smoke run.
    """
    from kvrecall.encoder import encode

    if tiny:
        layers, heads, tokens, dim, n_chunks = 1, 1, 4, 8, 2
    elif quick:
        layers, heads, tokens, dim, n_chunks = 4, 8, 256, 128, 2
    else:
        layers, heads, tokens, dim, n_chunks = 32, 8, 256, 128, 8
    g = torch.Generator().manual_seed(0)
    chunks = []
    for _ in range(n_chunks):
        kv = torch.randn(layers, 2, heads, tokens, dim, generator=g).cumsum(dim=3) * 0.05  # token-correlated
        chunks.append(encode(kv.to(torch.float16), None, "medium"))
    out_bytes = n_chunks * layers * 2 * heads * tokens * dim * 2
    in_bytes = sum(len(c) for c in chunks)
    shape = f"{n_chunks} chunks x L{layers} H{heads} T{tokens} D{dim} (self-contained, medium)"
    if kernel:
        out = torch.empty(layers, 2, heads, tokens * n_chunks, dim, dtype=torch.float16, device=device)
        ms = timer(lambda: decode_into(chunks, out))
        name = "rANS decode + dequantize (Triton)"
    else:
        from kvrecall.encoder import decode_many

        ms = timer(lambda: decode_many(chunks, None, dtype=torch.float16))
        name = "rANS decode + dequantize (encoder.decode_many)"
    result = make_row(name, f"{shape}; {in_bytes / out_bytes * 16:.2f} bits/elem", label, ms, out_bytes, bandwidth)
    if bandwidth:  # the floor moves the compressed input and the fp16 output once
        result.floor_ms = round((in_bytes + out_bytes) / bandwidth * 1e3, 4)
    return [result]
