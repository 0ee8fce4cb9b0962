"""The one home for kvrecall's defaults: the CLI and the library both read them from here.

A leaf module of the bottom layer: it imports nothing, so every sub-package (``encoder``, ``kvstore``,
``retriever``, ``kernels``) and the integration layer may read it. Change a default here and every entry point
follows.
"""

from __future__ import annotations

# ---- context chunks (ContextCache, prefix-chain keys, StreamSession blocks)
CHUNK_TOKENS = 256
"""Tokens per stored chunk; also the granularity of prefix reuse."""

# ---- codec
CODEC_LEVEL = "medium"
"""Codec level used when none is given (``kvrecall.encoder.LEVELS`` lists them)."""
CODEC_CALIBRATION_TOKENS = 32768
"""Tokens of KV collected to calibrate a codec profile (``calibrate-codec --max-tokens``)."""
CODEC_CALIBRATION_CONTEXT = 1024
"""Longest prefill per calibration sample (bounded by the model's trained context)."""
CODEC_TABLE_GROUPS = 4
"""Probability tables per layer and K/V in a codec profile."""

# ---- retriever
RETRIEVER_ROPE_MODE = "positional"
"""How codes are scored: 'positional' (pre-RoPE codes rotated to their true positions) won every measured
context on every model against A²ATS 'windowed' (see docs/retriever.md)."""
RETRIEVER_KIND = "vq"
RETRIEVER_BITS = 12
"""Bits per (sub-)code: 12 = 4,096 centroids per layer and KV head."""
RETRIEVER_PQ_M = 2
RETRIEVER_CALIBRATION_TOKENS = 65536
RETRIEVER_CALIBRATION_CHUNK = 1024
RETRIEVER_WINDOW_DISTANCE = 2048
RETRIEVER_KMEANS_ITERATIONS = 20
RETRIEVER_SEED = 1234

# ---- retrieval decoding
RETRIEVAL_BUDGET = 0.03
"""Fraction of the context (or a token count when > 1) selected per decode step."""
RETRIEVAL_SINKS = 8
RETRIEVAL_WINDOW = 64
RETRIEVAL_OFFLOAD = "exact"
"""Working form of offloaded rows: 'exact' (model dtype), 'float16', 'int8' or 'int4'."""
RETRIEVAL_SCORER = "banded"
"""How a decode step scores codes: 'banded' (positional near the query, one LUT per distance band far away),
'positional' or 'windowed' (see docs/retrieval-decoding.md)."""
RETRIEVAL_NEAR = 1024
"""Tokens nearer than this to the query are scored at their exact positions by the banded scorer."""
RETRIEVAL_BAND_RATIO = 2.0
"""Width ratio of the banded scorer's distance bands ([d, ratio * d))."""
RETRIEVAL_RERANK = 2.0
"""Candidates the codes pick per query head, as a multiple of the budget; their rows are gathered and scored
exactly, and attention runs over the exact top-k among them (SmolLM2 2K passcode at 3%: 8/10 without, 10/10 at 2.0,
as dense)."""
RETRIEVAL_RERANK_FLOOR = 2048
"""...and at least this many candidates per query head (SmolLM2 4K passcode at 3%: the codes rank the needle's
keys past 2 * k in the heads that read it; a shortlist of ~1,000 recovers the oracle's answers. SmolLM2 8K
next-token KL at 3% over the last 64 positions: 1.71x the oracle's with 1,024, 1.00x with 1,536 and 2,048)."""
PREFILL_CHUNK = 1024
"""Prompt tokens prefilled at a time by caches that bound prefill memory."""

# ---- kvstore server
SERVER_HOST = "127.0.0.1"
SERVER_PORT = 50051
SERVER_DRAIN_S = 1.0
"""Seconds the server reports NOT_SERVING before it refuses new calls (CLI); in-process servers use 0."""
SERVER_GRACE_S = 10.0
"""Seconds calls in flight get at shutdown."""

# ---- context loading (ContextCache, bench/e2e.py)
AUTO_LEVELS = ("fp16", "high", "medium")
"""Levels ``ContextCache(level="auto")`` stores every chunk at (the coarsest is the quality floor: the default
level); at load time the controller picks one per chunk
(or recompute). ``"fp16"`` is raw fp16 KV (no decode work); codec names are in ``kvrecall.encoder.LEVELS``."""
LOAD_FETCH_WORKERS = 4
"""Gets in flight at once while loading a context."""
LOAD_DECODE_WORKERS = 2
"""Threads decoding chunks as they arrive (the native rANS coder releases the GIL)."""
LOAD_PRIOR_BANDWIDTH_BPS = 1.25e9
"""Link bandwidth assumed before any Get was measured (10 Gbit/s)."""
LOAD_PRIOR_DECODE_BPS = 2.5e8
"""Decode throughput (fp16-equivalent bytes/s) assumed for a codec level before one was measured."""
LOAD_PRIOR_PREFILL_TOKENS_PER_S = 500.0
"""Prefill throughput assumed before one was measured (a small model on a few CPU cores)."""
LOAD_PRIOR_RAW_DECODE_BPS = 2e9
"""Throughput assumed for placing a raw (fp16/exact) chunk (copy + RoPE) before one was measured."""

# ---- streaming sessions and RAG
STREAM_WINDOW = 1024
"""Recent tokens a StreamSession attends to while appending (plus sinks)."""
STREAM_BLOCK = 64
"""Tokens per offloaded block of a stream."""
STREAM_TOP_BLOCKS = 8
"""Blocks retrieved for a question."""
STREAM_RERANK = 4
"""A StreamSession ask rescores its scorer's ``top_blocks * STREAM_RERANK`` best blocks from their decoded keys."""
STREAM_RERANK_FRACTION = 0.25
"""...and at least this fraction of all blocks: the shortlist grows with the stream (at 8K tokens, 112 blocks, the
``top_blocks * STREAM_RERANK`` floor rules; at 32K, 496 blocks, four times that was needed: docs/streaming.md)."""
STREAM_RERANK_DISTANCE = 2048
"""Relative distance at which the rerank stage scores blocks' keys (position-free: RoPE of this on the query)."""
STREAM_RAM_BYTES = 256 << 20
"""RAM for a stream's offloaded blocks before they spill to disk."""
RAG_LEVEL = "exact"
"""Level a RagPipeline stores documents' KV at (exact: answers equal full prefill)."""
