"""Store a context's KV once, compressed, in a kvstore, and load the longest cached prefix back.

``ContextCache`` joins the three pieces of the loading path:

1. :func:`kvrecall.kvstore.chunk_keys` names each full chunk of ``chunk_tokens`` tokens by a SHA-256 prefix chain
   (parent key, token ids, model id, codec profile id), so equal prefixes share keys across processes and machines.
2. :func:`kvrecall.encoder.encode` turns each chunk's KV (``[layers, 2, kv_heads, chunk_tokens, head_dim]``, keys
   before RoPE) into a bitstream at a codec level; the store keeps it.
3. :meth:`ContextCache.load` asks the store once (Exists) how many leading chunks it holds, fetches them in
   parallel into one buffer and decodes all their streams in one vectorized pass
   (:func:`kvrecall.encoder.decode_many`).

Which hook runs when, for a serving engine:

- after a prefill (or when a request finishes): :meth:`store` with the request's token ids and KV;
- before a prefill: :meth:`load` with the new request's token ids; prefill only the tokens past the returned prefix,
  with the loaded KV as the cache (keys re-rotated at their positions by :func:`kvrecall.models.kv_to_cache`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["ContextCache", "ContextCacheError", "LoadResult", "StoreResult"]


class ContextCacheError(ValueError):
    """Invalid arguments to :class:`ContextCache`."""


@dataclass
class StoreResult:
    """What :meth:`ContextCache.store` did."""

    chunks: int  # full chunks in the context
    stored: int  # chunks newly written (others were already present)
    bytes_written: int
    encode_s: float
    put_s: float


@dataclass
class LoadResult:
    """What :meth:`ContextCache.load` found: ``kv`` covers the first ``tokens`` tokens (None when 0)."""

    tokens: int
    kv: torch.Tensor | None
    bytes_read: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class ContextCache:
    """Chunked, compressed KV of contexts in a kvstore.

    Parameters
    ----------
    client : kvrecall.kvstore.KVStoreClient
        A connected client.
    model_id : str
        Identifies the model weights (e.g. :func:`kvrecall.models.model_fingerprint`).
    profile : kvrecall.encoder.CodecProfile or None
        Codec profile; None uses the codec's profile-free fallback.
    level : str
        Codec level for new chunks (one of :data:`kvrecall.encoder.LEVELS`).
    chunk_tokens : int
        Tokens per stored chunk; a trailing partial chunk is not stored.
    """

    def __init__(self, client, model_id: str, profile=None, level: str = "medium", chunk_tokens: int = 256) -> None:
        from kvrecall.encoder import LEVELS

        if level not in LEVELS:
            raise ContextCacheError(f"unknown codec level {level!r}; choose one of {list(LEVELS)}")
        if chunk_tokens < 1:
            raise ContextCacheError("chunk_tokens must be >= 1")
        if not model_id:
            raise ContextCacheError("model_id must be a non-empty string")
        self.client = client
        self.model_id = model_id
        self.profile = profile
        self.level = level
        self.chunk_tokens = chunk_tokens

    @property
    def profile_id(self) -> str:
        return self.profile.profile_id if self.profile is not None else "fallback"

    def keys(self, token_ids: torch.Tensor) -> list[bytes]:
        """Prefix-chain keys of the full chunks of ``token_ids`` (``[tokens]``)."""
        from kvrecall.kvstore import chunk_keys

        return chunk_keys(token_ids, self.model_id, self.profile_id, self.chunk_tokens)

    def store(self, token_ids: torch.Tensor, kv: torch.Tensor) -> StoreResult:
        """Encode and store every full chunk of a context that the store does not hold yet.

        Parameters
        ----------
        token_ids : Tensor[tokens]
        kv : Tensor[layers, 2, kv_heads, tokens, head_dim], keys before RoPE
        """
        from kvrecall.encoder import encode_many

        if token_ids.ndim != 1 or kv.ndim != 5 or kv.shape[3] != token_ids.numel():
            raise ContextCacheError(
                f"token_ids [{tuple(token_ids.shape)}] and kv [{tuple(kv.shape)}] disagree on the token count"
            )
        keys = self.keys(token_ids)
        present = self.client.exists(keys).present if keys else []
        missing = [i for i, have in enumerate(present) if not have]
        c = self.chunk_tokens
        t0 = time.perf_counter()
        blobs = encode_many([kv[:, :, :, i * c : (i + 1) * c] for i in missing], self.profile, self.level)
        t1 = time.perf_counter()
        for i, blob in zip(missing, blobs):
            self.client.put(keys[i], blob)
        put_s = time.perf_counter() - t1
        return StoreResult(len(keys), len(missing), sum(map(len, blobs)), t1 - t0, put_s)

    def load(self, token_ids: torch.Tensor, dtype: torch.dtype | None = None) -> LoadResult:
        """Fetch and decode the longest stored prefix of ``token_ids`` (``[tokens]``).

        Returns
        -------
        LoadResult
            ``kv`` is ``Tensor[layers, 2, kv_heads, tokens, head_dim]`` for the cached ``tokens`` (a multiple of
            ``chunk_tokens``), or None when nothing is cached.
        """
        from kvrecall.encoder import decode_many

        if token_ids.ndim != 1:
            raise ContextCacheError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
        keys = self.keys(token_ids)
        t0 = time.perf_counter()
        n = self.client.cached_prefix_length(keys) if keys else 0
        t1 = time.perf_counter()
        if n == 0:
            return LoadResult(0, None, 0, {"exists_s": t1 - t0})
        blobs = self.client.get_many(keys[:n])
        t2 = time.perf_counter()
        if any(b is None for b in blobs):  # evicted between Exists and Get: keep the prefix that arrived
            n = next(i for i, b in enumerate(blobs) if b is None)
            blobs = blobs[:n]
            if n == 0:
                return LoadResult(0, None, 0, {"exists_s": t1 - t0, "get_s": t2 - t1})
        chunks = decode_many(blobs, self.profile, dtype=dtype)  # views into one fetch buffer, no copy
        kv = torch.cat(chunks, dim=3)
        t3 = time.perf_counter()
        return LoadResult(
            n * self.chunk_tokens,
            kv,
            sum(len(b) for b in blobs),
            {"exists_s": t1 - t0, "get_s": t2 - t1, "decode_s": t3 - t2},
        )
