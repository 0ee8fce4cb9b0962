"""Raw (uncompressed) KV chunks: the ``"fp16"`` and ``"exact"`` load options next to the codec's levels.

A raw chunk is a 32-byte header followed by the tensor's bytes::

    magic b"KVRAW\\x01" | dtype code (u8) | pad (u8) | shape [layers, 2, kv_heads, tokens, head_dim] (5 x u32 LE)
    | pad to 32 bytes | data (C order, little-endian)

``"fp16"`` stores float16 (CacheGen's "raw KV" baseline: no decode work, 2 bytes per element); ``"exact"`` stores
the tensor in its own dtype, bit for bit (lossless: loading it gives exactly the prefill's KV). The kvstore's
CRC-32 guards the bytes end to end, so the header carries none.
"""

from __future__ import annotations

import struct

import torch

__all__ = ["RAW_LEVELS", "RawChunkError", "encode_raw", "decode_raw", "is_raw"]

RAW_LEVELS: tuple[str, ...] = ("fp16", "exact")

_MAGIC = b"KVRAW\x01"
_HEADER = struct.Struct("<6sBB5I6x")  # 32 bytes
_DTYPES = {1: torch.float16, 2: torch.bfloat16, 3: torch.float32}
_CODES = {v: k for k, v in _DTYPES.items()}


class RawChunkError(ValueError):
    """A raw chunk is malformed, or a tensor cannot be stored raw."""


def is_raw(data) -> bool:
    """True when ``data`` (bytes-like) starts like a raw chunk."""
    return bytes(memoryview(data)[: len(_MAGIC)]) == _MAGIC


def encode_raw(kv: torch.Tensor, level: str) -> bytes:
    """Serialize ``kv`` (``Tensor[layers, 2, kv_heads, tokens, head_dim]``) as a raw chunk.

    Parameters
    ----------
    level : {"fp16", "exact"}
        ``"fp16"`` casts to float16; ``"exact"`` keeps ``kv``'s dtype (float16, bfloat16 or float32).
    """
    if level not in RAW_LEVELS:
        raise RawChunkError(f"unknown raw level {level!r}; choose one of {RAW_LEVELS}")
    if kv.ndim != 5 or kv.shape[1] != 2:
        raise RawChunkError(f"kv must be [layers, 2, kv_heads, tokens, head_dim], got {tuple(kv.shape)}")
    x = kv.detach().to("cpu", torch.float16 if level == "fp16" else kv.dtype).contiguous()
    if x.dtype not in _CODES:
        raise RawChunkError(f"cannot store dtype {x.dtype} raw (float16, bfloat16, float32)")
    header = _HEADER.pack(_MAGIC, _CODES[x.dtype], 0, *x.shape)
    body = x.view(torch.uint8).numpy().tobytes() if x.dtype == torch.bfloat16 else x.numpy().tobytes()
    return header + body


def decode_raw(data, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor of a raw chunk (``Tensor[layers, 2, kv_heads, tokens, head_dim]``), as ``dtype`` on ``device``.

    Raises
    ------
    RawChunkError
        If the header is not a raw chunk's or the body's size disagrees with its shape.
    """
    mv = memoryview(data).cast("B")
    if mv.nbytes < _HEADER.size:
        raise RawChunkError(f"raw chunk of {mv.nbytes} bytes is shorter than its {_HEADER.size}-byte header")
    magic, code, _, *shape = _HEADER.unpack_from(mv)
    if magic != _MAGIC or code not in _DTYPES:
        raise RawChunkError("not a raw KV chunk (bad magic or dtype code)")
    src = _DTYPES[code]
    numel = shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
    need = numel * torch.empty((), dtype=src).element_size()
    if mv.nbytes - _HEADER.size != need or shape[1] != 2:
        raise RawChunkError(f"raw chunk body is {mv.nbytes - _HEADER.size} bytes; shape {shape} needs {need}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype or src, device=device)
    body = mv[_HEADER.size :]
    if body.readonly:  # torch.frombuffer wants a writable buffer; fetched buffers (bytearrays) are
        body = memoryview(bytearray(body))
    flat = torch.frombuffer(body, dtype=src)  # a view of the fetched buffer, no copy
    return flat.reshape(shape).to(device=device, dtype=dtype or src)
