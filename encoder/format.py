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

__all__ = ["MAGIC", "FORMAT_VERSION", "ChunkHeader", "parse_header", "pack_chunk", "DTYPE_CODES"]

MAGIC = b"KVRC"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<4sBBBBBBHHHHI16sIIIII")
SYMBOL_WIDTH = 1  # values per rANS symbol; the header byte is reserved for joint (multi-value) symbols
HEADER_SIZE = _HEAD.size  # 58 bytes
FLAG_KEYS_PRE_ROPE = 1
FLAG_PROFILE = 2
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


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
        Name from ``LEVELS``.
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
    payload_offset: int = 0
    payload_words: int = 0
    total_len: int = 0

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape))


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
) -> bytes:
    """Serialize one chunk (see ``docs/format.md``). Inputs are trusted (they come from the encoder)."""
    layers, _, heads, tokens, head_dim = shape
    flags = (FLAG_KEYS_PRE_ROPE if keys_pre_rope else 0) | (FLAG_PROFILE if profile_id else 0)
    pid = profile_id.encode("ascii") if profile_id else b"\0" * 16
    head = _HEAD.pack(
        MAGIC, FORMAT_VERSION, flags, DTYPE_CODES[dtype], LEVELS.index(level), scale_bits, SYMBOL_WIDTH,
        channels_per_stream, layers, heads, head_dim, tokens, pid,
        int(word_counts.size), int(escapes.size), len(scales), len(tables), int(words.size),
    )  # fmt: skip
    body = b"".join(
        [
            head,
            np.asarray(delta, dtype=np.uint8).tobytes(),
            scales,
            tables,
            np.asarray(word_counts, dtype="<u4").tobytes(),
            np.asarray(escapes, dtype="<i4").tobytes(),
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
    if n < HEADER_SIZE + 4:
        raise CodecError(f"chunk truncated: {n} bytes, the header alone needs {HEADER_SIZE + 4}")
    (_, version, flags, dtype_code, level_idx, scale_bits, width, group, layers, heads, head_dim, tokens, pid,
     n_streams, n_escapes, scales_len, tables_len, payload_words) = _HEAD.unpack_from(data, 0)  # fmt: skip
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported chunk format version {version} (this build reads version {FORMAT_VERSION})")
    (crc,) = struct.unpack_from("<I", data, n - 4)
    if zlib.crc32(data[: n - 4]) != crc:
        raise CodecError("chunk checksum mismatch: the data is corrupted or truncated")
    if width != SYMBOL_WIDTH:
        raise CodecError(f"chunk uses {width} values per symbol; this build decodes {SYMBOL_WIDTH}")
    if dtype_code not in _CODE_DTYPES:
        raise CodecError(f"chunk has unknown dtype code {dtype_code}")
    if level_idx >= len(LEVELS):
        raise CodecError(f"chunk has unknown level index {level_idx}")
    if not MIN_SCALE_BITS <= scale_bits <= MAX_SCALE_BITS:
        raise CodecError(f"chunk has invalid rANS scale_bits {scale_bits}")
    if min(layers, heads, head_dim, tokens, group) < 1 or head_dim % group:
        raise CodecError(f"chunk has invalid shape fields L={layers} H={heads} T={tokens} D={head_dim} G={group}")
    if flags & ~(FLAG_KEYS_PRE_ROPE | FLAG_PROFILE):
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
        if scales_len != fallback_scales_len(layers, heads, head_dim):
            raise CodecError("chunk scales section has the wrong size")
        if tables_len < 2:
            raise CodecError("self-contained chunk lacks its probability tables")
    expected_streams = layers * 2 * heads * (head_dim // group)
    if n_streams != expected_streams:
        raise CodecError(f"chunk declares {n_streams} streams, its shape implies {expected_streams}")
    n_elements = layers * 2 * heads * tokens * head_dim
    if n_escapes > n_elements:
        raise CodecError("chunk declares more escapes than elements")
    off = HEADER_SIZE
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
    payload_off = off
    off += 2 * payload_words
    if off + 4 != n:
        raise CodecError(f"chunk size mismatch: sections add up to {off + 4} bytes, got {n}")
    delta = np.frombuffer(data, dtype=np.uint8, count=layers * 2, offset=delta_off)
    if np.any(delta > 1):
        raise CodecError("chunk has invalid delta flags")
    counts = np.frombuffer(data, dtype="<u4", count=n_streams, offset=counts_off).astype(np.int64)
    if np.any(counts < 2):
        raise CodecError("chunk has a stream shorter than its 2-word final state")
    if int(counts.sum()) != payload_words:
        raise CodecError("chunk stream lengths do not add up to its payload")
    sym_per_stream = tokens * group
    if np.any(max_symbols_for_words(counts) < sym_per_stream):
        raise CodecError("chunk claims more symbols than its streams can hold")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return ChunkHeader(
        version=version,
        shape=(layers, 2, heads, tokens, head_dim),
        dtype=_CODE_DTYPES[dtype_code],
        level=LEVELS[level_idx],
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
        payload_offset=payload_off,
        payload_words=payload_words,
        total_len=n,
    )
