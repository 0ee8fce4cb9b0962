"""Baseline KV codecs for ``bench/codec.py``: fp16, fp16+zstd, int8 per token, KIVI-style, CacheGen as released.

Every codec turns one chunk ``kv : Tensor[layers, 2, kv_heads, tokens, head_dim]`` into self-contained bytes
(a 16-byte header with the shape, then everything the decoder needs: scales, zeros, probability tables, stream
lengths, payload) and back into a float32 tensor of the same shape. The size of those bytes is what the bench
counts, so nothing the decoder needs may live outside them.

CacheGen (``CacheGenCodec``) re-implements the codec as released in LMCache's ``cachegen`` serde (the code the
CacheGen artifact calls from ``run_cachegen.py``); see ``docs/codec-bench.md`` for each choice and every guess.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

__all__ = [
    "BaselineError",
    "BaselineCodec",
    "Fp16Codec",
    "Fp16ZstdCodec",
    "Int8TokenCodec",
    "KiviCodec",
    "CacheGenCodec",
    "cachegen_bins",
    "arith_encode",
    "arith_decode",
    "baseline_codecs",
]

_HEADER = struct.Struct("<4sBBHHHI")  # 16 bytes: magic, version, param, layers, heads, head_dim, tokens
_VERSION = 1


class BaselineError(ValueError):
    """Bytes handed to a baseline decoder are not a valid stream of that codec, or a tensor has a bad shape."""


def _check_kv(kv: torch.Tensor) -> None:
    if not isinstance(kv, torch.Tensor) or kv.ndim != 5 or kv.shape[1] != 2 or min(kv.shape) < 1:
        shape = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise BaselineError(f"kv must be a tensor [layers, 2, kv_heads, tokens, head_dim], got {shape}")
    if kv.shape[0] > 0xFFFF or kv.shape[2] > 0xFFFF or kv.shape[4] > 0xFFFF or kv.shape[3] > 0xFFFFFFFF:
        raise BaselineError(f"kv shape {tuple(kv.shape)} exceeds the header's field sizes")


def _pack_header(magic: bytes, param: int, kv: torch.Tensor) -> bytes:
    layers, _, heads, tokens, head_dim = kv.shape
    return _HEADER.pack(magic, _VERSION, param, layers, heads, head_dim, tokens)


def _unpack_header(data: bytes, magic: bytes) -> tuple[int, tuple[int, int, int, int, int], memoryview]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BaselineError(f"expected bytes, got {type(data).__name__}")
    if len(data) < _HEADER.size:
        raise BaselineError(f"stream of {len(data)} bytes is shorter than the {_HEADER.size}-byte header")
    got, version, param, layers, heads, head_dim, tokens = _HEADER.unpack_from(data)
    if got != magic:
        raise BaselineError(f"wrong magic {got!r}, expected {magic!r}")
    if version != _VERSION:
        raise BaselineError(f"unsupported version {version}")
    if min(layers, heads, head_dim, tokens) < 1:
        raise BaselineError("header holds an empty shape")
    return param, (layers, 2, heads, tokens, head_dim), memoryview(data)[_HEADER.size :]


class _Reader:
    """Reads consecutive numpy arrays out of a byte buffer, raising BaselineError past the end."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, dtype, count: int) -> np.ndarray:
        nbytes = np.dtype(dtype).itemsize * count
        if count < 0 or self.pos + nbytes > len(self.buf):
            raise BaselineError(f"stream truncated: need {nbytes} bytes at offset {self.pos}, have {len(self.buf)}")
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += nbytes
        return out

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise BaselineError(f"{len(self.buf) - self.pos} trailing bytes after the stream")


@dataclass
class BaselineCodec:
    """Common interface: ``encode(kv) -> bytes``, ``decode(bytes) -> Tensor``.

    Attributes
    ----------
    name, level : str
        Row labels in the bench table.
    keys_post_rope : bool
        True when the codec is meant to see keys after RoPE (as vLLM / HF caches hold them).
    """

    name: str = ""
    level: str = ""
    keys_post_rope: bool = False

    def encode(self, kv: torch.Tensor) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, data: bytes) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_all(self, chunks: list[torch.Tensor]) -> list[bytes]:
        """Encode a context's chunks, in order."""
        return [self.encode(c) for c in chunks]

    def decode_all(self, blobs: list[bytes]) -> list[torch.Tensor]:
        """Decode a context's chunks, in order."""
        return [self.decode(b) for b in blobs]


class Fp16Codec(BaselineCodec):
    """Raw fp16 bytes (16 bits per element plus the header)."""

    def __init__(self):
        super().__init__("fp16", "-", False)

    def encode(self, kv: torch.Tensor) -> bytes:
        _check_kv(kv)
        return _pack_header(b"KF16", 0, kv) + kv.detach().to(torch.float16).contiguous().numpy().tobytes()

    def decode(self, data: bytes) -> torch.Tensor:
        _, shape, body = _unpack_header(data, b"KF16")
        r = _Reader(body)
        arr = r.take(np.float16, math.prod(shape))
        r.done()
        return torch.from_numpy(arr.astype(np.float32).reshape(shape))


class Fp16ZstdCodec(BaselineCodec):
    """fp16 bytes compressed with zstandard at ``zstd_level``."""

    def __init__(self, zstd_level: int = 3):
        super().__init__("fp16+zstd", str(zstd_level), False)
        self.zstd_level = zstd_level

    def encode(self, kv: torch.Tensor) -> bytes:
        _check_kv(kv)
        raw = kv.detach().to(torch.float16).contiguous().numpy().tobytes()
        return _pack_header(b"KZST", 0, kv) + zstandard.ZstdCompressor(level=self.zstd_level).compress(raw)

    def decode(self, data: bytes) -> torch.Tensor:
        _, shape, body = _unpack_header(data, b"KZST")
        n = math.prod(shape) * 2
        try:
            if zstandard.frame_content_size(bytes(body[:18])) != n:  # checked before anything is allocated
                raise BaselineError(f"zstd frame does not hold the {n} bytes the header announces")
            raw = zstandard.ZstdDecompressor().decompress(bytes(body), max_output_size=n)
        except zstandard.ZstdError as exc:
            raise BaselineError(f"zstd payload is corrupt: {exc}") from exc
        if len(raw) != n:
            raise BaselineError(f"zstd payload holds {len(raw)} bytes, header says {n}")
        return torch.from_numpy(np.frombuffer(raw, np.float16).astype(np.float32).reshape(shape))


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """fp16 scales as stored; a zero scale (all-zero group) is replaced by 1 so decoding never divides by 0."""
    s16 = scale.to(torch.float16)
    return torch.where(s16 == 0, torch.ones_like(s16), s16)


class Int8TokenCodec(BaselineCodec):
    """Symmetric int8 per token: one fp16 absmax scale per (layer, K/V, token) over all heads' channels."""

    def __init__(self):
        super().__init__("int8-token", "-", False)

    def encode(self, kv: torch.Tensor) -> bytes:
        _check_kv(kv)
        x = kv.detach().float().permute(0, 1, 3, 2, 4).flatten(3)  # [L, 2, T, H*D]
        scale = _safe_scale(x.abs().amax(-1, keepdim=True) / 127.0)
        q = torch.clamp(torch.round(x / scale.float()), -127, 127).to(torch.int8)
        return _pack_header(b"KI8T", 0, kv) + scale.numpy().tobytes() + q.numpy().tobytes()

    def decode(self, data: bytes) -> torch.Tensor:
        _, (L, _, H, T, D), body = _unpack_header(data, b"KI8T")
        r = _Reader(body)
        scale = torch.from_numpy(r.take(np.float16, L * 2 * T).astype(np.float32)).reshape(L, 2, T, 1)
        q = torch.from_numpy(r.take(np.int8, L * 2 * T * H * D).astype(np.float32)).reshape(L, 2, T, H * D)
        r.done()
        return (q * scale).reshape(L, 2, T, H, D).permute(0, 1, 3, 2, 4).contiguous()


def _pack_bits(q: np.ndarray, bits: int) -> bytes:
    per = 8 // bits
    flat = q.reshape(-1).astype(np.uint8)
    flat = np.concatenate([flat, np.zeros((-len(flat)) % per, np.uint8)]).reshape(-1, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(flat << shifts, axis=1).astype(np.uint8).tobytes()


def _unpack_bits(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    vals = (buf[:, None] >> shifts) & ((1 << bits) - 1)
    return vals.reshape(-1)[:count]


def _asym_quant(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization over the last axis. Returns (codes uint8, scale fp16, zero fp16)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = _safe_scale((hi - lo) / (2**bits - 1))
    zero = lo.to(torch.float16)
    q = torch.clamp(torch.round((x - zero.float()) / scale.float()), 0, 2**bits - 1).to(torch.uint8)
    return q, scale, zero


class KiviCodec(BaselineCodec):
    """KIVI-style asymmetric quantization: keys per channel, values per token, groups of ``group`` elements.

    Keys: for each (layer, head, channel), groups of ``group`` consecutive tokens share an fp16 scale and zero.
    Values: for each (layer, token), groups of ``group`` consecutive channels of the flattened ``heads*head_dim``
    share an fp16 scale and zero. As in KIVI, the last ``tokens % group`` tokens (an incomplete key group) stay in
    fp16 (KIVI's full-precision residual), keys and values alike.
    """

    def __init__(self, bits: int, group: int = 32):
        if bits not in (2, 4):
            raise BaselineError(f"KIVI bits must be 2 or 4, got {bits}")
        super().__init__(f"kivi-{bits}bit", f"g{group}", False)
        self.bits, self.group = bits, group

    def encode(self, kv: torch.Tensor) -> bytes:
        _check_kv(kv)
        L, _, H, T, D = kv.shape
        g, b = self.group, self.bits
        tq = (T // g) * g
        x = kv.detach().float()
        parts = [_pack_header(b"KIVI", b, kv)]
        if tq:
            k = x[:, 0, :, :tq].reshape(L, H, tq // g, g, D).transpose(-1, -2)  # [L, H, T/g, D, g]
            qk, sk, zk = _asym_quant(k, b)
            v = x[:, 1, :, :tq].permute(0, 2, 1, 3).reshape(L, tq, H * D)
            pad = (-(H * D)) % g
            v = torch.nn.functional.pad(v, (0, pad), value=0.0) if pad else v
            v = v.reshape(L, tq, -1, g)
            qv, sv, zv = _asym_quant(v, b)
            parts += [sk.numpy().tobytes(), zk.numpy().tobytes(), sv.numpy().tobytes(), zv.numpy().tobytes()]
            parts += [_pack_bits(qk.numpy(), b), _pack_bits(qv.numpy(), b)]
        if tq < T:
            parts.append(x[:, :, :, tq:].to(torch.float16).contiguous().numpy().tobytes())
        return b"".join(parts)

    def _body_bytes(self, L: int, H: int, T: int, D: int) -> int:
        """Bytes after the header for a ``[L, 2, H, T, D]`` tensor."""
        g, b = self.group, self.bits
        tq = (T // g) * g
        nk_groups = L * H * (tq // g) * D
        nv_groups = L * tq * ((H * D + (-(H * D)) % g) // g)
        per = 8 // b
        packed = -(-nk_groups * g // per) + -(-nv_groups * g // per)
        return (nk_groups + nv_groups) * 4 + packed + L * 2 * H * (T - tq) * D * 2

    def decode(self, data: bytes) -> torch.Tensor:
        b, (L, _, H, T, D), body = _unpack_header(data, b"KIVI")
        if b != self.bits:
            raise BaselineError(f"stream is {b}-bit KIVI, decoder is {self.bits}-bit")
        g = self.group
        tq = (T // g) * g
        if len(body) != self._body_bytes(L, H, T, D):  # before allocating anything the header asks for
            raise BaselineError(f"KIVI stream of {len(body)} bytes does not match its header's shape")
        r = _Reader(body)
        out = torch.empty(L, 2, H, T, D)
        if tq:
            nk_groups = L * H * (tq // g) * D
            vgroups = (H * D + (-(H * D)) % g) // g
            nv_groups = L * tq * vgroups
            sk, zk = (torch.from_numpy(r.take(np.float16, nk_groups).astype(np.float32)) for _ in range(2))
            sv, zv = (torch.from_numpy(r.take(np.float16, nv_groups).astype(np.float32)) for _ in range(2))
            per = 8 // b
            nk, nv = nk_groups * g, nv_groups * g
            qk = _unpack_bits(r.take(np.uint8, -(-nk // per)), b, nk).astype(np.float32)
            qv = _unpack_bits(r.take(np.uint8, -(-nv // per)), b, nv).astype(np.float32)
            k = torch.from_numpy(qk).reshape(nk_groups, g) * sk[:, None] + zk[:, None]
            out[:, 0, :, :tq] = k.reshape(L, H, tq // g, D, g).transpose(-1, -2).reshape(L, H, tq, D)
            v = torch.from_numpy(qv).reshape(nv_groups, g) * sv[:, None] + zv[:, None]
            v = v.reshape(L, tq, vgroups * g)[:, :, : H * D].reshape(L, tq, H, D).permute(0, 2, 1, 3)
            out[:, 1, :, :tq] = v
        if tq < T:
            rest = r.take(np.float16, L * 2 * H * (T - tq) * D).astype(np.float32)
            out[:, :, :, tq:] = torch.from_numpy(rest).reshape(L, 2, H, T - tq, D)
        r.done()
        return out


# ----------------------------------------------------------------------------------------------------------------
# CacheGen as released (LMCache cachegen serde + torchac-style arithmetic coder)
# ----------------------------------------------------------------------------------------------------------------

_PREC = 16  # CDF precision, bits
_MASK32 = (1 << 32) - 1
_Q1, _HALF = 1 << 30, 1 << 31  # quarter and half of the 32-bit coding interval

# Bins per layer group: (key bins for groups 1, 2, 3), (value bins for groups 1, 2). Level 2 is the released
# default (LMCache CacheGenConfig for 7B models); levels 1 and 3 are the QUANT_LEVEL variants the artifact's
# adaptation run encodes (not in the stored official basics file; taken from public reconstructions, see docs).
_CACHEGEN_LEVELS = {
    "1": ((16, 16, 12), (16, 12)),
    "2": ((32, 16, 16), (32, 16)),
    "3": ((32, 32, 32), (32, 32)),
}
# Layer-group boundaries of the released 32-layer config: keys 10 / 20 / 32 layers, values 2 / 32.
_KEY_SPLITS, _VALUE_SPLIT, _REF_LAYERS = (10, 20), 2, 32


def cachegen_bins(num_layers: int, level: str) -> tuple[np.ndarray, np.ndarray]:
    """Bins per layer for keys and values at a CacheGen level, layer groups scaled from the 32-layer config.

    A group boundary ``b`` of the 32-layer config becomes ``ceil(b * num_layers / 32)`` (at least one layer in
    the finest group). Returns ``(key_bins[num_layers], value_bins[num_layers])`` as int64 arrays.
    """
    if level not in _CACHEGEN_LEVELS:
        raise BaselineError(f"unknown CacheGen level {level!r}; choose from {sorted(_CACHEGEN_LEVELS)}")
    (k1, k2, k3), (v1, v2) = _CACHEGEN_LEVELS[level]
    kb1, kb2 = (math.ceil(s * num_layers / _REF_LAYERS) for s in _KEY_SPLITS)
    vb1 = math.ceil(_VALUE_SPLIT * num_layers / _REF_LAYERS)
    layers = np.arange(num_layers)
    key_bins = np.where(layers < kb1, k1, np.where(layers < kb2, k2, k3)).astype(np.int64)
    value_bins = np.where(layers < vb1, v1, v2).astype(np.int64)
    return key_bins, value_bins


def _cachegen_cdf(sym: np.ndarray, max_bins: int) -> np.ndarray:
    """Per-stream int CDF as LMCache's ``calculate_cdf`` kernel builds it.

    sym : uint8 [streams, tokens] -> cdf : int64 [streams, max_bins + 1], cdf[i] = (0xFFFF - max_bins) *
    count(sym < i) // tokens + i, so every symbol of the alphabet keeps a non-zero frequency.
    """
    streams, tokens = sym.shape
    counts = np.zeros((streams, max_bins + 1), np.int64)
    np.add.at(counts, (np.repeat(np.arange(streams), tokens), sym.reshape(-1).astype(np.int64) + 1), 1)
    cum = np.cumsum(counts, axis=1)
    return (0xFFFF - max_bins) * cum // tokens + np.arange(max_bins + 1)


def _cdf_bounds(cdf: np.ndarray) -> np.ndarray:
    """cdf [S, Lp] -> bounds [S, Lp] where bounds[:, s + 1] is the upper end of symbol s (the last one 0x10000)."""
    ext = cdf.astype(np.int64).copy()
    ext[:, -1] = 1 << _PREC
    return ext


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers below 2**53 (0 for 0), exact (``frexp`` does not round)."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64)


def _renorm_counts(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The renormalization of the 32-bit coder, all bits at once.

    The bit-by-bit loop first shifts out the ``k`` leading bits ``low`` and ``high`` share (each one emitted),
    then, while ``low`` is ``01...`` and ``high`` ``10...``, drops their second bit ``m`` times (E3, pending).
    After an E3 step the leading bits differ again, so the loop is always ``k`` shifts then ``m`` E3 steps.
    Returns ``(k, m, new_low, new_high)``.
    """
    k = 32 - _bit_length(low ^ high)
    low1 = (low << k) & _MASK32
    high1 = ((high << k) & _MASK32) | ((np.int64(1) << k) - 1)
    m = 32 - _bit_length(~(((low1 & ~high1) << 1) & _MASK32) & _MASK32)
    low2 = (low1 << m) & (_HALF - 1)
    high2 = ((high1 << m) & _MASK32) | _HALF | ((np.int64(1) << m) - 1)
    return k, m, low2, high2


def _emit(bits, pos, pending, idx, first, src, extra) -> None:
    """Append to streams ``idx``: bit ``first``, ``pending`` copies of its complement, then the ``extra`` bits of
    ``src`` below its top bit (bit 30 downwards); reset their pending counts."""
    n = pending[idx] + 1 + extra
    owner = np.repeat(np.arange(len(idx)), n)
    j = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    p, f = pending[idx][owner], first[owner]
    from_src = (src[owner] >> np.clip(31 - (j - p), 0, 31)) & 1
    rows = idx[owner]
    bits[rows, pos[rows] + j] = np.where(j == 0, f, np.where(j <= p, 1 - f, from_src))
    pos[idx] += n
    pending[idx] = 0


def arith_encode(sym: np.ndarray, cdf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary arithmetic coding (32-bit low/high, E3 pending bits, 16-bit CDF) of many streams at once.

    Parameters
    ----------
    sym : uint8 [streams, tokens]
        Symbols in ``[0, Lp - 2]``.
    cdf : int [streams, Lp]
        Strictly increasing integer CDF starting at 0 (``_cachegen_cdf``).

    Returns
    -------
    payload : uint8 [sum(lengths)]
        The streams' bytes, concatenated in stream order.
    lengths : int32 [streams]
        Bytes per stream.
    """
    streams, tokens = sym.shape
    bounds = _cdf_bounds(cdf)
    s64 = sym.astype(np.int64)
    c_lo = np.take_along_axis(bounds, s64, axis=1)
    c_hi = np.take_along_axis(bounds, s64 + 1, axis=1)
    if np.any(c_hi <= c_lo):
        raise BaselineError("a symbol has zero probability in its CDF")
    bits = np.zeros((streams, _PREC * tokens + 96), np.uint8)
    pos = np.zeros(streams, np.int64)
    pending = np.zeros(streams, np.int64)
    low = np.zeros(streams, np.int64)
    high = np.full(streams, _MASK32, np.int64)
    for t in range(tokens):
        span = high - low + 1
        high = low + ((span * c_hi[:, t]) >> _PREC) - 1
        low = low + ((span * c_lo[:, t]) >> _PREC)
        k, m, new_low, new_high = _renorm_counts(low, high)
        out = np.flatnonzero(k > 0)
        if len(out):
            _emit(bits, pos, pending, out, (low[out] >> 31) & 1, low[out], k[out] - 1)
        pending += m
        low, high = new_low, new_high
    pending += 1
    everything = np.arange(streams)
    _emit(bits, pos, pending, everything, (low >= _Q1).astype(np.int64), low, np.zeros(streams, np.int64))
    nbytes = (pos + 7) // 8
    packed = np.packbits(bits[:, : int(nbytes.max()) * 8], axis=1)
    keep = np.arange(packed.shape[1])[None, :] < nbytes[:, None]
    return packed[keep], nbytes.astype(np.int32)


def arith_decode(payload: np.ndarray, lengths: np.ndarray, cdf: np.ndarray, tokens: int) -> np.ndarray:
    """Inverse of :func:`arith_encode`: ``uint8 [streams, tokens]`` symbols."""
    streams = len(lengths)
    lengths = lengths.astype(np.int64)
    if np.any(lengths < 0) or int(lengths.sum()) != len(payload):
        raise BaselineError(f"stream lengths sum to {int(lengths.sum())}, payload holds {len(payload)} bytes")
    if np.any(lengths > 2 * tokens + 16):
        raise BaselineError("a stream is longer than any valid encoding of its tokens")
    width = int(lengths.max()) if streams else 0
    mat = np.zeros((streams, width + 8), np.int64)
    mat[np.arange(width + 8)[None, :] < lengths[:, None]] = payload
    rows = np.arange(streams)
    last_byte = width + 3

    def window(bitpos: np.ndarray) -> np.ndarray:  # the 32 bits starting at bit ``bitpos`` of each stream
        b = np.minimum(bitpos >> 3, last_byte)
        w40 = (mat[rows, b] << 32) | (mat[rows, b + 1] << 24) | (mat[rows, b + 2] << 16)
        w40 |= (mat[rows, b + 3] << 8) | mat[rows, b + 4]
        return (w40 >> (8 - (bitpos & 7))) & _MASK32

    bounds = _cdf_bounds(cdf)
    upper = bounds[:, 1:]
    max_sym = cdf.shape[1] - 2
    rpos = np.zeros(streams, np.int64)
    value = window(rpos)
    rpos += 32
    low = np.zeros(streams, np.int64)
    high = np.full(streams, _MASK32, np.int64)
    out = np.empty((streams, tokens), np.uint8)
    for t in range(tokens):
        span = high - low + 1
        count = (((value - low + 1) << _PREC) - 1) // span
        s = np.minimum((upper <= count[:, None]).sum(1), max_sym)
        out[:, t] = s
        high = low + ((span * bounds[rows, s + 1]) >> _PREC) - 1
        low = low + ((span * bounds[rows, s]) >> _PREC)
        k, m, low, high = _renorm_counts(low, high)
        w = window(rpos)
        value = ((value << k) & _MASK32) | (w >> (32 - k))
        value = (value & _HALF) | ((value << m) & (_HALF - 1)) | (((w << k) & _MASK32) >> (32 - m))
        rpos += k + m
    return out


class CacheGenCodec(BaselineCodec):
    """CacheGen as released (LMCache ``cachegen`` serde), re-implemented on CPU with numpy.

    Per 256-token chunk: keys and values flattened to ``[layers, tokens, heads*head_dim]``; symmetric per-token
    quantization with ``bins`` per layer group (``MAX = bins // 2 - 1``, symbol ``round(x * MAX / absmax + MAX)``);
    fp16 absmax per (layer, token) for K and V; a per-(layer, channel) CDF over the chunk's tokens (16-bit, one
    entry per bin of the largest bin count + 1) shipped with the chunk; one arithmetic-coded stream per
    (layer, channel) over tokens, with an int32 byte length each. No delta/anchor coding (the released code has none).
    """

    def __init__(self, level: str = "2", chunk_tokens: int = 256, keys_post_rope: bool = True):
        if level not in _CACHEGEN_LEVELS:
            raise BaselineError(f"unknown CacheGen level {level!r}")
        super().__init__("cachegen" if keys_post_rope else "cachegen-preRoPE", level, keys_post_rope)
        self.chunk_tokens = chunk_tokens

    def _encode_chunk(self, x: torch.Tensor, key_bins: np.ndarray, value_bins: np.ndarray) -> bytes:
        L, _, H, T, D = x.shape
        flat = x.permute(1, 0, 3, 2, 4).reshape(2, L, T, H * D).to(torch.float16).float()  # fp16 cache, as served
        parts = []
        for kind, bins in ((0, key_bins), (1, value_bins)):
            mx = torch.from_numpy(bins // 2 - 1).float()[:, None, None]
            absmax = _safe_scale(flat[kind].abs().amax(-1, keepdim=True))  # [L, T, 1] fp16
            sym = torch.round(flat[kind] * (mx / absmax.float()) + mx).clamp(min=0).to(torch.uint8)
            sym = torch.minimum(sym, (2 * mx).to(torch.uint8)).numpy()  # [L, T, C]
            streams = np.ascontiguousarray(sym.transpose(0, 2, 1).reshape(L * H * D, T))
            max_bins = int(bins.max())
            cdf = _cachegen_cdf(streams, max_bins)
            payload, lengths = arith_encode(streams, cdf)
            parts += [absmax.numpy().tobytes(), cdf.astype(np.int16 if max_bins < 0x7FFF else np.int32).tobytes()]
            parts += [lengths.tobytes(), payload.tobytes()]
        return b"".join(parts)

    def side_info_bytes(self, layers: int, heads: int, tokens: int, head_dim: int) -> int:
        """Bytes of everything but the arithmetic-coded payload: header, fp16 scales, CDF tables, stream lengths."""
        key_bins, value_bins = cachegen_bins(layers, self.level)
        chunks = -(-tokens // self.chunk_tokens)
        total = _HEADER.size
        for bins in (key_bins, value_bins):
            total += layers * tokens * 2 + chunks * layers * heads * head_dim * ((int(bins.max()) + 1) * 2 + 4)
        return total

    def encode(self, kv: torch.Tensor) -> bytes:
        _check_kv(kv)
        L, _, H, T, D = kv.shape
        key_bins, value_bins = cachegen_bins(L, self.level)
        x = kv.detach().float()
        parts = [_pack_header(b"KCGN", int(self.level), kv)]
        for start in range(0, T, self.chunk_tokens):
            parts.append(self._encode_chunk(x[:, :, :, start : start + self.chunk_tokens], key_bins, value_bins))
        return b"".join(parts)

    def decode(self, data: bytes) -> torch.Tensor:
        level, (L, _, H, T, D), body = _unpack_header(data, b"KCGN")
        if str(level) not in _CACHEGEN_LEVELS:
            raise BaselineError(f"stream names unknown CacheGen level {level}")
        key_bins, value_bins = cachegen_bins(L, str(level))
        if len(body) < self.side_info_bytes(L, H, T, D) - _HEADER.size:  # before allocating the output
            raise BaselineError(f"CacheGen stream of {len(body)} bytes is too short for its header's shape")
        r = _Reader(body)
        out = torch.empty(2, L, T, H * D)
        for start in range(0, T, self.chunk_tokens):
            t = min(self.chunk_tokens, T - start)
            for kind, bins in ((0, key_bins), (1, value_bins)):
                max_bins = int(bins.max())
                absmax = torch.from_numpy(r.take(np.float16, L * t).astype(np.float32)).reshape(L, t, 1)
                cdf = r.take(np.int16, L * H * D * (max_bins + 1)).astype(np.int64).reshape(-1, max_bins + 1)
                cdf &= 0xFFFF  # int16 on the wire holds uint16 values
                if np.any(cdf[:, 0] != 0) or np.any(np.diff(cdf, axis=1) <= 0):
                    raise BaselineError("corrupt CDF table: must start at 0 and increase strictly")
                lengths = r.take(np.int32, L * H * D)
                payload = r.take(np.uint8, int(lengths.astype(np.int64).sum()) if lengths.min(initial=0) >= 0 else -1)
                sym = arith_decode(payload, lengths, cdf, t).reshape(L, H * D, t).transpose(0, 2, 1)
                mx = torch.from_numpy(bins // 2 - 1).float()[:, None, None]
                out[kind, :, start : start + t] = (torch.from_numpy(sym.astype(np.float32)) - mx) / mx * absmax
        r.done()
        return out.reshape(2, L, T, H, D).permute(1, 0, 3, 2, 4).contiguous()


def baseline_codecs(quick: bool = False, ablations: bool = True) -> list[BaselineCodec]:
    """The baselines the bench runs, in table order (``ablations``: zstd-19 and CacheGen fed pre-RoPE keys too)."""
    codecs: list[BaselineCodec] = [Fp16Codec(), Fp16ZstdCodec(3)]
    if not quick and ablations:
        codecs.append(Fp16ZstdCodec(19))
    codecs += [Int8TokenCodec(), KiviCodec(4), KiviCodec(2)]
    # quick mode: only the middle level (the targets' reference); our numpy arithmetic coder is the slow part
    codecs += [CacheGenCodec(level) for level in (("2",) if quick else ("1", "2", "3"))]
    if not quick and ablations:  # ablation, not CacheGen as released: the same codec fed pre-RoPE keys
        codecs.append(CacheGenCodec("2", keys_post_rope=False))
    return codecs
