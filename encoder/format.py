"""The chunk bitstream: a fixed header, sections, a CRC32. See ``docs/format.md`` for the byte layout.

:func:`pack_chunk` writes it; :func:`parse_header` validates every size against the data length (before any
allocation) and returns a :class:`ChunkHeader` that tells a decoder where everything is.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from kvrecall.encoder.errors import CodecError
from kvrecall.encoder.quantize import LEVELS
from kvrecall.encoder.rans import MAX_SCALE_BITS, MIN_SCALE_BITS, max_symbols_for_words

__all__ = ["MAGIC", "FORMAT_VERSION", "LOSSLESS", "ChunkHeader", "parse_header", "pack_chunk", "DTYPE_CODES",
           "EXACT_ITEMSIZE"]

MAGIC = b"KVRC"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 = version 2 without the exact-token fields and section
_HEAD_V1 = struct.Struct("<4sBBBBBBHHHHI16sIIIII")
_HEAD_V2_EXTRA = struct.Struct("<IB")  # n_exact (tokens stored exactly), exact_dtype code
_HEAD = struct.Struct(_HEAD_V1.format + "IB")
SYMBOL_WIDTH = 1  # values per rANS symbol; the header byte is reserved for joint (multi-value) symbols
HEADER_SIZE = _HEAD.size  # 63 bytes (version 1: 58)
HEADER_SIZE_V1 = _HEAD_V1.size
FLAG_KEYS_PRE_ROPE = 1
FLAG_PROFILE = 2
FLAG_LOSSLESS = 4
FLAG_VALUE_SCALES = 8
LOSSLESS_LEVEL_CODE = 255  # level byte of a lossless chunk
LOSSLESS = "lossless"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
EXACT_ITEMSIZE = {0: 4, 1: 2, 2: 2}  # bytes per value of the exact-token section, by dtype code


@dataclass(frozen=True)
class ChunkHeader:
    """Everything a decoder needs to locate the parts of one chunk.

    Byte offsets are from the start of the chunk; word offsets are in 16-bit words from ``payload_offset``.

    Attributes
    ----------
    version : int
    shape : tuple (L, 2, H, T, D)
    dtype : torch.dtype
        dtype of the tensor that was encoded.
    level : str
        Name from ``LEVELS``, or ``"lossless"`` (no streams: every token is in the exact section, in ``dtype``).
    scale_bits : int
        rANS precision ``log2(M)``.
    keys_pre_rope : bool
    profile_id : str or None
        Id of the codec profile the chunk needs, None for a self-contained (fallback) chunk.
    channels_per_stream : int
        ``G``: each stream holds the symbols of ``G`` consecutive channels of one (layer, K/V, head), token-major.
    n_streams : int
        ``L * 2 * H * (D // G)``, in order (layer, K/V, head, channel group).
    symbols_per_stream : int
        ``T * G``.
    delta : ndarray[L, 2], bool
        Whether (layer, K/V) symbols are coded as differences along tokens.
    n_exact : int
        Tokens stored exactly (their symbols are 0; their values come from the exact section).
    exact_dtype : torch.dtype
        dtype of the exact section's values.
    value_scales : bool
        Whether section 4.4c holds per-token value scale exponents (4 bits per (layer, head, token)).
    value_exp_offset : int
        Its byte offset.
    exact_offset : int
        Byte offset of the exact section: ``i32 token[n_exact]`` ascending, then values ``[L, 2, H, n_exact, D]``.
    stream_word_counts, stream_word_offsets : ndarray[n_streams], int64
    scales_offset, scales_len, tables_offset, tables_len, escapes_offset, n_escapes, payload_offset,
    payload_words, total_len : int
    """

    version: int
    shape: tuple
    dtype: torch.dtype
    level: str
    scale_bits: int
    keys_pre_rope: bool
    profile_id: str | None
    channels_per_stream: int
    n_streams: int
    symbols_per_stream: int
    delta: np.ndarray = field(repr=False)
    stream_word_counts: np.ndarray = field(repr=False)
    stream_word_offsets: np.ndarray = field(repr=False)
    scales_offset: int = 0
    scales_len: int = 0
    tables_offset: int = 0
    tables_len: int = 0
    escapes_offset: int = 0
    n_escapes: int = 0
    n_exact: int = 0
    exact_dtype: torch.dtype = torch.float16
    exact_offset: int = 0
    value_scales: bool = False
    value_exp_offset: int = 0
    payload_offset: int = 0
    payload_words: int = 0
    total_len: int = 0

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def lossless(self) -> bool:
        return self.level == LOSSLESS


def fallback_scales_len(layers: int, heads: int, head_dim: int) -> int:
    """Bytes of the scales section of a fallback chunk: fp16 offsets [L,2,H,D] + fp32 steps [L,2]."""
    return layers * 2 * heads * head_dim * 2 + layers * 2 * 4


def pack_chunk(
    *,
    shape: tuple,
    dtype: torch.dtype,
    level: str,
    scale_bits: int,
    keys_pre_rope: bool,
    profile_id: str | None,
    channels_per_stream: int,
    delta: np.ndarray,
    scales: bytes,
    tables: bytes,
    word_counts: np.ndarray,
    escapes: np.ndarray,
    words: np.ndarray,
    exact_tokens: np.ndarray | None = None,
    exact_values: torch.Tensor | None = None,
    value_exp: np.ndarray | None = None,
) -> bytes:
    """Serialize one chunk (see ``docs/format.md``). Inputs are trusted (they come from the encoder)."""
    layers, _, heads, tokens, head_dim = shape
    lossless = level == LOSSLESS
    flags = (FLAG_KEYS_PRE_ROPE if keys_pre_rope else 0) | (FLAG_PROFILE if profile_id else 0)
    flags |= FLAG_LOSSLESS if lossless else 0
    flags |= FLAG_VALUE_SCALES if value_exp is not None else 0
    vexp = b""
    if value_exp is not None:
        nib = (np.asarray(value_exp, dtype=np.int16).ravel() + 8).astype(np.uint8)
        if nib.size % 2:
            nib = np.append(nib, np.uint8(0))
        vexp = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
    pid = profile_id.encode("ascii") if profile_id else b"\0" * 16
    n_exact = 0 if exact_tokens is None else int(len(exact_tokens))
    exact_code = DTYPE_CODES[exact_values.dtype] if n_exact else DTYPE_CODES[torch.float16]
    head = _HEAD.pack(
        MAGIC, FORMAT_VERSION, flags, DTYPE_CODES[dtype], LOSSLESS_LEVEL_CODE if lossless else LEVELS.index(level),
        scale_bits, SYMBOL_WIDTH, channels_per_stream, layers, heads, head_dim, tokens, pid,
        int(word_counts.size), int(escapes.size), len(scales), len(tables), int(words.size), n_exact, exact_code,
    )  # fmt: skip
    exact = b""
    if n_exact:
        vals = exact_values.detach().to("cpu").contiguous()
        raw = vals.view(torch.int16 if vals.dtype != torch.float32 else torch.int32).numpy()
        exact = np.asarray(exact_tokens, dtype="<i4").tobytes() + raw.astype(raw.dtype.newbyteorder("<")).tobytes()
    body = b"".join(
        [
            head,
            np.asarray(delta, dtype=np.uint8).tobytes(),
            scales,
            tables,
            np.asarray(word_counts, dtype="<u4").tobytes(),
            np.asarray(escapes, dtype="<i4").tobytes(),
            vexp,
            exact,
            np.asarray(words, dtype="<u2").tobytes(),
        ]
    )
    return body + struct.pack("<I", zlib.crc32(body))


def parse_header(data: bytes | bytearray | memoryview) -> ChunkHeader:
    """Validate a chunk and return its header.

    Checks magic, version, CRC32, every field's range and that the sections add up to exactly ``len(data)``;
    nothing larger than ``len(data)`` is allocated.

    Raises
    ------
    CodecError
        With a message naming what is wrong (truncated, corrupted, wrong version, inconsistent sizes).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"chunk must be bytes, got {type(data).__name__}")
    data = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    n = len(data)
    if n < 4 or bytes(data[:4]) != MAGIC:
        raise CodecError("not a kvrecall KV chunk (bad magic)" if n >= 4 else f"chunk truncated: {n} bytes")
    if n < HEADER_SIZE_V1 + 4:
        raise CodecError(f"chunk truncated: {n} bytes, the header alone needs {HEADER_SIZE_V1 + 4}")
    version = data[4]
    if version not in READABLE_VERSIONS:
        raise CodecError(
            f"unsupported chunk format version {version} (this build reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; it writes {FORMAT_VERSION})"
        )
    head_size = HEADER_SIZE if version >= 2 else HEADER_SIZE_V1
    if n < head_size + 4:
        raise CodecError(f"chunk truncated: {n} bytes, the header alone needs {head_size + 4}")
    (_, version, flags, dtype_code, level_idx, scale_bits, width, group, layers, heads, head_dim, tokens, pid,
     n_streams, n_escapes, scales_len, tables_len, payload_words) = _HEAD_V1.unpack_from(data, 0)  # fmt: skip
    n_exact, exact_code = _HEAD_V2_EXTRA.unpack_from(data, HEADER_SIZE_V1) if version >= 2 else (0, 1)
    (crc,) = struct.unpack_from("<I", data, n - 4)
    if zlib.crc32(data[: n - 4]) != crc:
        raise CodecError("chunk checksum mismatch: the data is corrupted or truncated")
    if width != SYMBOL_WIDTH:
        raise CodecError(f"chunk uses {width} values per symbol; this build decodes {SYMBOL_WIDTH}")
    if dtype_code not in _CODE_DTYPES:
        raise CodecError(f"chunk has unknown dtype code {dtype_code}")
    lossless = bool(flags & FLAG_LOSSLESS)
    if lossless != (level_idx == LOSSLESS_LEVEL_CODE) or (level_idx >= len(LEVELS) and not lossless):
        raise CodecError(f"chunk has unknown level index {level_idx} (flags {flags:#x})")
    if exact_code not in EXACT_ITEMSIZE:
        raise CodecError(f"chunk has unknown exact-section dtype code {exact_code}")
    if not MIN_SCALE_BITS <= scale_bits <= MAX_SCALE_BITS:
        raise CodecError(f"chunk has invalid rANS scale_bits {scale_bits}")
    if min(layers, heads, head_dim, tokens, group) < 1 or head_dim % group:
        raise CodecError(f"chunk has invalid shape fields L={layers} H={heads} T={tokens} D={head_dim} G={group}")
    if flags & ~(FLAG_KEYS_PRE_ROPE | FLAG_PROFILE | FLAG_LOSSLESS | FLAG_VALUE_SCALES):
        raise CodecError(f"chunk has unknown flags {flags:#x}")
    has_profile = bool(flags & FLAG_PROFILE)
    if has_profile:
        try:
            profile_id = pid.decode("ascii")
        except UnicodeDecodeError:
            raise CodecError("chunk has a malformed profile id") from None
        if not all(c in "0123456789abcdef" for c in profile_id):
            raise CodecError("chunk has a malformed profile id")
        if scales_len or tables_len:
            raise CodecError("chunk coded with a profile must not carry scales or tables")
    else:
        profile_id = None
        if pid != b"\0" * 16:
            raise CodecError("chunk without a profile has a non-empty profile id")
    value_scales = bool(flags & FLAG_VALUE_SCALES)
    if version < 2 and (lossless or value_scales):
        raise CodecError(f"version-1 chunk has version-2 flags {flags:#x}")
    if lossless:
        if value_scales or has_profile or scales_len or tables_len or n_streams or n_escapes or payload_words:
            raise CodecError("lossless chunk must carry only its exact section")
        if n_exact != tokens or exact_code != dtype_code:
            raise CodecError("lossless chunk must store every token exactly in its own dtype")
    elif not has_profile:
        if scales_len != fallback_scales_len(layers, heads, head_dim):
            raise CodecError("chunk scales section has the wrong size")
        if tables_len < 2:
            raise CodecError("self-contained chunk lacks its probability tables")
    expected_streams = 0 if lossless else layers * 2 * heads * (head_dim // group)
    if n_exact > tokens:
        raise CodecError(f"chunk declares {n_exact} exact tokens but holds {tokens}")
    if n_streams != expected_streams:
        raise CodecError(f"chunk declares {n_streams} streams, its shape implies {expected_streams}")
    n_elements = layers * 2 * heads * tokens * head_dim
    if n_escapes > n_elements:
        raise CodecError("chunk declares more escapes than elements")
    off = head_size
    delta_off = off
    off += layers * 2
    scales_off = off
    off += scales_len
    tables_off = off
    off += tables_len
    counts_off = off
    off += 4 * n_streams
    esc_off = off
    off += 4 * n_escapes
    vexp_off = off
    off += (layers * heads * tokens + 1) // 2 if value_scales else 0
    exact_off = off
    off += n_exact * 4 + n_exact * layers * 2 * heads * head_dim * EXACT_ITEMSIZE[exact_code]
    payload_off = off
    off += 2 * payload_words
    if off + 4 != n:
        raise CodecError(f"chunk size mismatch: sections add up to {off + 4} bytes, got {n}")
    delta = np.frombuffer(data, dtype=np.uint8, count=layers * 2, offset=delta_off)
    if np.any(delta > 1):
        raise CodecError("chunk has invalid delta flags")
    counts = np.frombuffer(data, dtype="<u4", count=n_streams, offset=counts_off).astype(np.int64)
    if n_exact:
        etok = np.frombuffer(data, dtype="<i4", count=n_exact, offset=exact_off)
        if etok[0] < 0 or etok[-1] >= tokens or np.any(np.diff(etok) <= 0):
            raise CodecError("chunk's exact tokens are not ascending indices within the chunk")
    if np.any(counts < 2):
        raise CodecError("chunk has a stream shorter than its 2-word final state")
    if int(counts.sum()) != payload_words:
        raise CodecError("chunk stream lengths do not add up to its payload")
    sym_per_stream = 0 if lossless else tokens * group
    if n_streams and np.any(max_symbols_for_words(counts) < sym_per_stream):
        raise CodecError("chunk claims more symbols than its streams can hold")
    offsets = (np.cumsum(counts) - counts).astype(np.int64)
    return ChunkHeader(
        version=version,
        shape=(layers, 2, heads, tokens, head_dim),
        dtype=_CODE_DTYPES[dtype_code],
        level=LOSSLESS if lossless else LEVELS[level_idx],
        scale_bits=scale_bits,
        keys_pre_rope=bool(flags & FLAG_KEYS_PRE_ROPE),
        profile_id=profile_id,
        channels_per_stream=group,
        n_streams=n_streams,
        symbols_per_stream=sym_per_stream,
        delta=delta.reshape(layers, 2).astype(bool),
        stream_word_counts=counts,
        stream_word_offsets=offsets,
        scales_offset=scales_off,
        scales_len=scales_len,
        tables_offset=tables_off,
        tables_len=tables_len,
        escapes_offset=esc_off,
        n_escapes=n_escapes,
        n_exact=n_exact,
        exact_dtype=_CODE_DTYPES[exact_code],
        exact_offset=exact_off,
        value_scales=value_scales,
        value_exp_offset=vexp_off,
        payload_offset=payload_off,
        payload_words=payload_words,
        total_len=n,
    )
