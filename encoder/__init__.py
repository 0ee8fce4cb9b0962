"""CacheGen-style KV codec: per-channel uniform quantization with per-layer-group steps, per-token value scales and
attention sinks stored exactly (format 2, designed on SmolLM2: ``docs/codec.md``), optional delta coding along
tokens, and static-table rANS over many independent streams; ``level="lossless"`` stores every value exactly.

Public API::

    encode(kv, profile=None, level="medium") -> bytes            # kv: Tensor[L, 2, H, T, D], keys pre-RoPE
    encode_many(kvs, profile=None, level="medium") -> list[bytes] # same bytes, streams of all chunks in one loop
    decode(data, profile=None, device="cpu", dtype=None) -> Tensor[L, 2, H, T, D]
    decode_many(chunks, profile=None, ...) -> list[Tensor]        # all streams of all chunks in one loop
    decode_symbols(data, profile=None) -> QuantizedChunk             # integer symbols + steps, no dequantization
    quantize(kv, profile=None, level=...) -> QuantizedChunk ; dequantize(q) -> Tensor
    CodecProfile.calibrate(kv_samples, model_id) ; profile.save(path) ; CodecProfile.load(path)
    parse_header(data) -> ChunkHeader ; LEVELS ; CodecError
    parse_chunk(data, profile=None) -> ParsedChunk   # header + tables + steps + payload views, for decoders
    finish_symbols(coded, delta, n_escapes, escape_values)  # escapes/delta/range, numpy or torch, in place

Guarantee: ``decode(encode(x, p, lvl), p) == dequantize(quantize(x, p, lvl))`` exactly.
The bitstream is specified in ``docs/format.md``.
"""

from kvrecall.encoder.codec import (
    decode,
    decode_many,
    decode_many_symbols,
    decode_symbols,
    encode,
    encode_many,
    parse_chunk,
    ParsedChunk,
    quantize,
)
from kvrecall.encoder.errors import CodecError
from kvrecall.encoder.format import ChunkHeader, parse_header
from kvrecall.encoder.profile import CodecProfile
from kvrecall.encoder.tables import finish_symbols
from kvrecall.encoder.quantize import LEVELS, LOSSLESS, QuantizedChunk, dequantize

__all__ = [
    "CodecError",
    "CodecProfile",
    "ChunkHeader",
    "LEVELS",
    "LOSSLESS",
    "QuantizedChunk",
    "encode",
    "encode_many",
    "decode",
    "decode_many",
    "decode_many_symbols",
    "decode_symbols",
    "quantize",
    "dequantize",
    "parse_header",
    "parse_chunk",
    "ParsedChunk",
    "finish_symbols",
]
