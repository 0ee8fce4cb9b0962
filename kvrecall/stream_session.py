"""Streaming sessions (ReKV-style): an endless stream encoded with sliding-window attention, old KV offloaded in
compressed blocks, question-aware block retrieval at ``ask``.

::

    s = StreamSession(model, store=client_or_None, retriever_profile=..., codec_profile=..., window=1024, block=64)
    s.append(input_ids=...)        # or inputs_embeds=[1, n, hidden] for frames from a vision encoder
    answer_ids = s.ask(question_ids, max_new_tokens=32)   # the question never enters the stream
    s.close(); s2 = StreamSession.open(model, store, session_id)   # reopen from the store

How it works (``docs/streaming.md`` has the measurements):

* **append.** New tokens are encoded ``block`` at a time over the first ``sinks`` tokens of the stream plus the
  last ``window`` tokens, whose pre-RoPE KV is rotated at contiguous positions ``0 .. S-1`` (the new tokens follow
  at ``S ..``): StreamingLLM/InfLLM-style positions inside the cache, so the positions stay inside the model's
  trained range however long the stream grows, and the cost per segment stays flat. Pre-RoPE K/V of the new
  tokens are read from the projections (exact). When the window holds more than ``window`` tokens, its oldest
  ``block`` tokens leave as one block: encoded with the codec (``level``) and kept in RAM up to ``ram_bytes``,
  then on disk, or in the kvstore when ``store`` is given; the block's mean keys go into one FAISS index per
  layer (ReKV's summary) and its tokens' query-aware VQ codes (with a retriever profile) into the code table.
* **ask.** The question runs once over sinks + window to get its queries (it is not added to the stream); each
  layer scores every block (``scorer``); with ``rerank > 1`` the ``top_blocks * rerank`` best are decoded and
  rescored from their keys (two-stage retrieval: codes are cheap but coarse, decoded keys are exact up to the
  codec); the ``top_blocks`` best are loaded, and the model answers over sinks +
  retrieved blocks (in stream order) + window. Positions (``positions``): ``"contiguous"`` (default) places the
  assembled tokens at ``0 .. S-1`` and the question after them (re-positioned pre-RoPE keys, valid at any stream
  length); ``"true"`` rotates every token at its stream position and the question at the stream's end (only
  meaningful while the stream fits the model's trained context). With a retriever profile and contiguous
  positions the answer runs through :class:`~kvrecall.retrieval_cache.RetrievalCache` (``answer_budget`` of the
  assembled tokens attended per step; 1.0 = all of them).
* **close / open.** With a store, blocks are written as they leave the window and :meth:`flush` (called by
  :meth:`close`) writes the session state (sinks, window, index, codes, metadata) under the session id, so another
  process or machine can :meth:`open` it and continue or answer.
"""

from __future__ import annotations

import io
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from kvrecall import defaults
from kvrecall.models import model_info
from kvrecall.rag_decode import cache_at_positions, capture_kv, eos_ids, greedy_generate
from kvrecall.stream_blocks import BlockTier, StreamError, state_key
from kvrecall.stream_scoring import code_scores, mean_key_scores

__all__ = ["StreamSession", "StreamError", "AskResult", "POSITIONS", "SCORERS", "SELECTIONS"]

POSITIONS = ("contiguous", "true")
SELECTIONS = ("global", "per-layer")
SCORERS = ("codes", "codes-positional", "mean-key")
CODE_SCORERS = ("codes", "codes-positional")
STREAM_WINDOW = defaults.STREAM_WINDOW
STREAM_BLOCK = defaults.STREAM_BLOCK
STREAM_TOP_BLOCKS = defaults.STREAM_TOP_BLOCKS
STREAM_RAM_BYTES = defaults.STREAM_RAM_BYTES
"""Defaults of this module, proposed for kvrecall.defaults (window, block, blocks per ask, RAM budget)."""
_FORMAT = 1


@dataclass
class AskResult:
    """What the last :meth:`StreamSession.ask` did.

    Attributes
    ----------
    tokens : list[int]
        The answer's ids (greedy; the EOS that ended it included).
    blocks : list[list[int]]
        Block numbers loaded per layer (stream order).
    block_ranges : list[tuple[int, int]]
        Stream token range ``[start, end)`` of every block of the session.
    context_tokens : int
        Tokens attended per layer (sinks + retrieved blocks + window); 0 for an empty stream.
    empty : bool
        The stream held nothing: the model answered the question alone.
    timings : dict
        ``queries_s``, ``score_s``, ``load_s``, ``ttft_s``, ``total_s``.
    """

    tokens: list[int]
    blocks: list[list[int]]
    block_ranges: list[tuple[int, int]]
    context_tokens: int
    empty: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise StreamError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class StreamSession:
    """A stream of tokens or frame embeddings that can be questioned about any moment (see the module docstring).

    Parameters
    ----------
    model : Llama-family transformers causal LM (RoPE).
    store : kvrecall.kvstore.KVStoreClient or None
        Blocks and state go there (needed for :meth:`open`); None keeps blocks in RAM, spilling to disk.
    retriever_profile : kvrecall.retriever.RetrieverProfile or None
        Gives every stored token a key code (``scorer="codes"``) and answers through ``RetrievalCache``.
    codec_profile : kvrecall.encoder.CodecProfile or None
        Codec profile of blocks (None: the codec's profile-free fallback).
    window : int
        Recent tokens attended by every new segment and by the answer.
    block : int
        Tokens per offloaded block (and per encoding step of ``append``); ``window >= block``.
    sinks : int
        First tokens of the stream always attended.
    top_blocks : int
        Blocks loaded per layer at ``ask`` (0: window only).
    level : codec level of blocks (``kvrecall.encoder.LEVELS``) or ``"fp16"`` / ``"exact"`` (raw).
    positions : ``"contiguous"`` or ``"true"``.
    scorer : ``"codes"`` (needs ``retriever_profile``; codes scored at the profile's fixed distance),
        ``"codes-positional"`` (the same codes scored at each token's true distance from the question: exact
        relative RoPE within 1,024 tokens, distance bands beyond), ``"mean-key"`` (ReKV), or a callable
        ``(session, question_ids) -> Tensor[n_blocks] | Tensor[layers, n_blocks]``.
    selection : ``"global"`` (default: per-layer scores z-scored and averaged, the same blocks for every layer)
        or ``"per-layer"`` (ReKV: each layer its own top blocks).
    rerank : int
        Two-stage retrieval: the scorer's ``top_blocks * rerank`` best blocks are decoded and rescored from their
        keys (exact up to the codec, queries at a fixed distance: ``defaults.STREAM_RERANK_DISTANCE``), and the
        ``top_blocks`` best of those are loaded. 1: the scorer alone. A callable ``scorer``'s blocks are used as
        they are (no rerank).
    rerank_fraction : float in [0, 1]
        The rerank shortlist holds at least this fraction of all blocks (when ``rerank > 1``), so it grows with
        the stream: ``max(top_blocks * rerank, ceil(rerank_fraction * n_blocks))`` candidates.
    answer_budget : float or int
        ``RetrievalCache`` budget over the assembled tokens (1.0: attend all).
    ram_bytes : RAM budget of blocks (no store); beyond it the oldest blocks spill to ``spill_dir``.
    spill_dir : folder for spilled blocks (default: a temporary folder).
    session_id : str (default: a random id).
    """

    def __init__(self, model, store=None, retriever_profile=None, codec_profile=None, window: int = STREAM_WINDOW,
                 block: int = STREAM_BLOCK, *, sinks: int = defaults.RETRIEVAL_SINKS,
                 top_blocks: int = STREAM_TOP_BLOCKS, level: str = defaults.CODEC_LEVEL,
                 positions: str = "contiguous", scorer=None, answer_budget: float | int = 1.0,
                 ram_bytes: int = STREAM_RAM_BYTES, spill_dir: str | Path | None = None,
                 session_id: str | None = None, selection: str = "global",
                 rerank: int = defaults.STREAM_RERANK,
                 rerank_fraction: float = defaults.STREAM_RERANK_FRACTION) -> None:
        from kvrecall.encoder import LEVELS
        from kvrecall.loading_raw import RAW_LEVELS

        _check_int("block", block, 1)
        _check_int("window", window, block)
        _check_int("sinks", sinks, 0)
        _check_int("top_blocks", top_blocks, 0)
        _check_int("rerank", rerank, 1)
        if isinstance(rerank_fraction, bool) or not isinstance(rerank_fraction, (int, float)) \
                or not 0 <= rerank_fraction <= 1:
            raise StreamError(f"rerank_fraction must be a number in [0, 1], got {rerank_fraction!r}")
        if level not in (*LEVELS, *RAW_LEVELS):
            raise StreamError(f"level must be one of {[*LEVELS, *RAW_LEVELS]}, got {level!r}")
        if selection not in SELECTIONS:
            raise StreamError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if positions not in POSITIONS:
            raise StreamError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if scorer is None:
            scorer = "codes" if retriever_profile is not None else "mean-key"
        if not callable(scorer) and scorer not in SCORERS:
            raise StreamError(f"scorer must be one of {SCORERS} or a callable, got {scorer!r}")
        if scorer in CODE_SCORERS and retriever_profile is None:
            raise StreamError(f"scorer={scorer!r} needs a retriever_profile")
        if retriever_profile is not None:
            from kvrecall.retriever.errors import RetrieverError

            try:
                retriever_profile.check_model(model)
            except RetrieverError as exc:
                raise StreamError(str(exc)) from exc
        self.model = model
        self.info = model_info(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.store, self.retriever_profile, self.codec_profile = store, retriever_profile, codec_profile
        self.window, self.block, self.sinks, self.top_blocks = window, block, sinks, top_blocks
        self.level, self.positions, self.scorer, self.answer_budget = level, positions, scorer, answer_budget
        self.selection, self.rerank, self.rerank_fraction = selection, rerank, float(rerank_fraction)
        self.session_id = session_id or uuid.uuid4().hex
        self.tier = BlockTier(self.session_id, store, ram_bytes, spill_dir)
        L, H, D = self.info.num_layers, self.info.num_kv_heads, self.info.head_dim
        empty = torch.empty(L, 2, H, 0, D, dtype=self.dtype, device=self.device)
        self.sink_kv, self.win_kv = empty, empty.clone()  # pre-RoPE
        self.sink_ids: list[int] = []  # token id per sink token (-1 for an embedding)
        self.win_ids: list[int] = []
        self.n_tokens = 0
        self.block_ranges: list[tuple[int, int]] = []
        self.block_token_ids: list[torch.Tensor | None] = []
        self.indexes = [faiss.IndexFlatIP(H * D) for _ in range(L)]
        self._codes: list[torch.Tensor] = []  # per block [L, H, block, m]
        self._code_scorer = None
        self._positional_scorer = None
        self.closed = False
        self.stop_ids = eos_ids(model)
        self.last: AskResult | None = None
        self.append_timings: list[float] = []  # wall seconds per append
        self.append_cpu_timings: list[float] = []  # CPU seconds of the calling thread per append

    # ------------------------------------------------------------------------------------------ append
    def append(self, input_ids=None, inputs_embeds=None) -> int:
        """Add a segment to the stream: ``input_ids [n]`` / ``[1, n]`` or ``inputs_embeds [1, n, hidden]``.

        Returns
        -------
        int
            Stream length after the segment.
        """
        if self.closed:
            raise StreamError(f"session {self.session_id!r} is closed; open it again to append")
        if (input_ids is None) == (inputs_embeds is None):
            raise StreamError("append takes exactly one of input_ids or inputs_embeds")
        t0, c0 = time.perf_counter(), time.thread_time()
        if input_ids is not None:
            ids = torch.as_tensor(input_ids)
            if ids.ndim == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise StreamError(f"input_ids must be integer [n] or [1, n], got {tuple(ids.shape)} {ids.dtype}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.info.vocab_size):
                raise StreamError(f"input_ids must lie in [0, {self.info.vocab_size})")
            n = ids.numel()
        else:
            emb = inputs_embeds
            hidden = self.model.config.hidden_size
            if not isinstance(emb, torch.Tensor) or emb.ndim != 3 or emb.shape[0] != 1 or emb.shape[2] != hidden:
                raise StreamError(f"inputs_embeds must be a tensor [1, n, {hidden}], got "
                                  f"{tuple(getattr(emb, 'shape', ()))}")
            if not emb.dtype.is_floating_point or not torch.isfinite(emb).all():
                raise StreamError("inputs_embeds must be finite floating-point values")
            n = emb.shape[1]
        for s in range(0, n, self.block):
            if input_ids is not None:
                self._encode_step(ids[s : s + self.block], None)
            else:
                self._encode_step(None, inputs_embeds[:, s : s + self.block])
        self.append_timings.append(time.perf_counter() - t0)
        self.append_cpu_timings.append(time.thread_time() - c0)
        return self.n_tokens

    def _resident_cache(self):
        kv = torch.cat([self.sink_kv, self.win_kv], dim=3)
        return cache_at_positions(self.model, kv, torch.arange(kv.shape[3])), kv.shape[3]

    @torch.no_grad()
    def _encode_step(self, ids: torch.Tensor | None, embeds: torch.Tensor | None) -> None:
        cache, start = self._resident_cache()
        n = ids.numel() if ids is not None else embeds.shape[1]
        pos = torch.arange(start, start + n, device=self.device)[None]
        with capture_kv(self.model) as grab:
            if ids is not None:
                self.model(ids[None].to(self.device), position_ids=pos, use_cache=True,
                           **self._cache_kwargs(cache))
            else:
                self.model(inputs_embeds=embeds.to(self.device, self.dtype), position_ids=pos, use_cache=True,
                           **self._cache_kwargs(cache))
        kv = grab.kv().to(self.dtype)
        tok = ids.tolist() if ids is not None else [-1] * n
        take = max(0, min(n, self.sinks - self.sink_kv.shape[3]))
        if take:
            self.sink_kv = torch.cat([self.sink_kv, kv[:, :, :, :take]], dim=3)
            self.sink_ids += tok[:take]
        self.win_kv = torch.cat([self.win_kv, kv[:, :, :, take:]], dim=3)
        self.win_ids += tok[take:]
        self.n_tokens += n
        while self.win_kv.shape[3] > self.window:
            self._offload_block()

    def _cache_kwargs(self, cache) -> dict:
        from kvrecall.models import cache_kwargs

        return cache_kwargs(self.model, cache)

    def _offload_block(self) -> None:
        b = self.block
        kv, self.win_kv = self.win_kv[:, :, :, :b].contiguous(), self.win_kv[:, :, :, b:].contiguous()
        ids, self.win_ids = self.win_ids[:b], self.win_ids[b:]
        index = len(self.block_ranges)
        end = self.n_tokens - self.win_kv.shape[3]
        self.block_ranges.append((end - b, end))
        self.block_token_ids.append(None if min(ids) < 0 else torch.tensor(ids, dtype=torch.int32))
        self.tier.put(index, self._encode_block(kv))
        keys = kv[:, 0].float().cpu()  # [L, H, b, D]
        summary = keys.mean(dim=2).reshape(keys.shape[0], -1).numpy()  # [L, H * D]
        for layer, faiss_index in enumerate(self.indexes):
            faiss_index.add(np.ascontiguousarray(summary[layer : layer + 1]))
        if self.retriever_profile is not None:
            self._codes.append(self._key_codes(keys))

    def _encode_block(self, kv: torch.Tensor) -> bytes:
        from kvrecall.loading_raw import RAW_LEVELS, encode_raw

        if self.level in RAW_LEVELS:
            return encode_raw(kv.cpu(), self.level)
        from kvrecall.encoder import encode

        return encode(kv.float().cpu(), self.codec_profile, self.level)

    def _decode_block(self, data: bytes) -> torch.Tensor:
        from kvrecall.loading_raw import decode_raw, is_raw

        if is_raw(data):
            return decode_raw(data, self.device, self.dtype)
        from kvrecall.encoder import decode

        return decode(data, self.codec_profile, device=self.device, dtype=self.dtype)

    def _key_codes(self, keys: torch.Tensor) -> torch.Tensor:
        """Codes ``[L, H, b, m]`` of pre-RoPE keys ``[L, H, b, D]`` (query-aware transform, nearest centroid)."""
        from kvrecall.retriever.codebooks import encode

        prof = self.retriever_profile
        kt = torch.einsum("lhnd,lhde->lhne", keys, prof.key_transform.float())
        return torch.stack([torch.stack([encode(kt[l, h], prof.codebooks[l, h]) for h in range(kt.shape[1])])
                            for l in range(kt.shape[0])])

    # ------------------------------------------------------------------------------------------ ask
    def _block_scores(self, q: torch.Tensor, question_ids: torch.Tensor) -> torch.Tensor:
        n_blocks = len(self.block_ranges)
        if callable(self.scorer):
            s = torch.as_tensor(self.scorer(self, question_ids), dtype=torch.float32)
            if s.ndim == 1:
                s = s.expand(self.info.num_layers, -1)
            if tuple(s.shape) != (self.info.num_layers, n_blocks):
                raise StreamError(f"scorer returned shape {tuple(s.shape)}, expected [{n_blocks}] or "
                                  f"[{self.info.num_layers}, {n_blocks}]")
            return s
        if self.scorer == "mean-key":
            return mean_key_scores(self.indexes, q.cpu(), self.info.num_kv_heads, n_blocks)
        from kvrecall.retriever.fast_scoring import CodeScorer

        codes = torch.cat(self._codes, dim=2)
        if self.scorer == "codes-positional":  # stored token i sits at stream position first + i
            if self._positional_scorer is None:
                self._positional_scorer = CodeScorer(self.retriever_profile, "banded")
            distance = self.n_tokens - self.block_ranges[0][0] - codes.shape[2]
            return code_scores(self._positional_scorer, codes, q.cpu(), self.block, distance)
        if self._code_scorer is None:
            self._code_scorer = CodeScorer(self.retriever_profile, "windowed")
        return code_scores(self._code_scorer, codes, q.cpu(), self.block,
                           self.retriever_profile.settings.window_distance)

    @torch.no_grad()
    def ask(self, question_ids, max_new_tokens: int = 32) -> torch.Tensor:
        """Answer a question about the stream so far; the question is not added to the stream.

        Parameters
        ----------
        question_ids : Tensor[n] or Tensor[1, n], n >= 1
        max_new_tokens : int

        Returns
        -------
        Tensor[new_tokens], int64
            The greedy answer (EOS included when it ended the answer). :attr:`last` tells which blocks were
            loaded and the timings; an empty stream answers from the question alone (``last.empty``).
        """
        if self.closed:
            raise StreamError(f"session {self.session_id!r} is closed; open it again to ask")
        q_ids = torch.as_tensor(question_ids)
        if q_ids.ndim == 2 and q_ids.shape[0] == 1:
            q_ids = q_ids[0]
        if q_ids.ndim != 1 or q_ids.numel() == 0 or q_ids.dtype.is_floating_point:
            raise StreamError(f"question_ids must be a non-empty integer [n] or [1, n], got {tuple(q_ids.shape)}")
        _check_int("max_new_tokens", max_new_tokens, 1)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        if self.n_tokens == 0:
            from transformers import DynamicCache

            res = greedy_generate(self.model, DynamicCache(config=self.model.config), q_ids, 0, max_new_tokens,
                                  self.stop_ids)
            timings.update(ttft_s=res.first_token_s, total_s=time.perf_counter() - t0)
            self.last = AskResult(res.tokens, [[] for _ in range(self.info.num_layers)], [], 0, True, timings)
            return torch.tensor(res.tokens, dtype=torch.long)
        chosen: list[list[int]] = [[] for _ in range(self.info.num_layers)]
        decoded: dict[int, torch.Tensor] = {}  # blocks decoded by the rerank stage, reused by _assemble
        n_blocks = len(self.block_ranges)
        if n_blocks and self.top_blocks:
            cache, start = self._resident_cache()
            with capture_kv(self.model, queries=True) as grab:
                pos = torch.arange(start, start + q_ids.numel(), device=self.device)[None]
                self.model(q_ids[None].to(self.device), position_ids=pos, use_cache=True,
                           **self._cache_kwargs(cache))
            q = grab.q()
            timings["queries_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            scores = self._block_scores(q, q_ids)
            k = min(self.top_blocks, n_blocks)
            if self.rerank > 1 and n_blocks > k and not callable(self.scorer):  # a callable's scores stand
                scores = self._rerank_scores(scores, q, self.n_candidates(n_blocks), decoded)
            chosen = self._select(scores, k)
            timings["score_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        kv, positions = self._assemble(chosen, decoded)
        timings["load_s"] = time.perf_counter() - t2
        context = kv.shape[3]
        restore = None
        if self.positions == "true":
            cache, start = cache_at_positions(self.model, kv, positions), self.n_tokens
        elif self.retriever_profile is not None:
            from kvrecall.retrieval_cache import RetrievalCache

            cache = RetrievalCache.from_kv(self.model, self.retriever_profile, kv, budget=self.answer_budget,
                                           sinks=self.sinks, window=min(defaults.RETRIEVAL_WINDOW, context))
            start, restore = context, cache
        else:
            cache, start = cache_at_positions(self.model, kv, torch.arange(context)), context
        t3 = time.perf_counter()
        try:
            res = greedy_generate(self.model, cache, q_ids, start, max_new_tokens, self.stop_ids)
        finally:
            if restore is not None:
                restore.restore_attention()
        timings["ttft_s"] = t3 - t0 + res.first_token_s
        timings["total_s"] = time.perf_counter() - t0
        self.last = AskResult(res.tokens, chosen, list(self.block_ranges), context, False, timings)
        return torch.tensor(res.tokens, dtype=torch.long)

    def n_candidates(self, n_blocks: int) -> int:
        """Blocks the rerank stage rescores out of ``n_blocks``: ``max(top_blocks * rerank,
        ceil(rerank_fraction * n_blocks))``, at most ``n_blocks``."""
        k = self.top_blocks * self.rerank
        return min(n_blocks, max(k, math.ceil(self.rerank_fraction * n_blocks)))

    def _select(self, scores: torch.Tensor, k: int) -> list[list[int]]:
        """The ``k`` best blocks per layer (stream order) from ``scores [L, n_blocks]`` (-inf: not a candidate)."""
        if self.selection == "global":  # one vote of all layers (z-scored per layer), same blocks everywhere
            finite = torch.where(torch.isfinite(scores), scores, torch.nan)
            mean = finite.nanmean(dim=1, keepdim=True)
            std = ((finite - mean) ** 2).nanmean(dim=1, keepdim=True).sqrt().clamp(min=1e-12)
            vote = torch.nan_to_num((finite - mean) / std, nan=-1e9).mean(dim=0)
            best = sorted(torch.topk(vote, k).indices.tolist())
            return [list(best) for _ in range(scores.shape[0])]
        return [sorted(torch.topk(scores[layer], k).indices.tolist()) for layer in range(scores.shape[0])]

    def _rerank_scores(self, scores: torch.Tensor, q: torch.Tensor, n_candidates: int,
                       decoded: dict[int, torch.Tensor]) -> torch.Tensor:
        """Second stage: the ``n_candidates`` best blocks of ``scores`` (per :meth:`_select`, united over layers)
        rescored from their decoded keys (:func:`~kvrecall.stream_scoring.exact_block_scores`); other blocks
        get -inf. Decoded blocks are left in ``decoded``."""
        from kvrecall.models import rope_parameters
        from kvrecall.stream_scoring import exact_block_scores

        candidates = sorted({b for row in self._select(scores, n_candidates) for b in row})
        decoded.update({b: self._decode_block(self.tier.get(b)) for b in candidates})
        keys = torch.cat([decoded[b][:, 0] for b in candidates], dim=2).cpu()  # [L, H, C * block, D]
        inv_freq, rope_scaling = rope_parameters(self.model)
        exact = exact_block_scores(keys, q.cpu(), self.block, defaults.STREAM_RERANK_DISTANCE, inv_freq,
                                   rope_scaling)
        out = torch.full_like(scores, float("-inf"))
        out[:, candidates] = exact
        return out

    def _assemble(self, chosen: list[list[int]], decoded: dict[int, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer: sinks + chosen blocks + window (pre-RoPE) ``[L, 2, H, S, D]`` and true positions ``[L, S]``.
        ``decoded`` holds blocks already decoded (by the rerank stage)."""
        needed = sorted({b for row in chosen for b in row})
        decoded = decoded if decoded is not None else {}
        blocks = {b: decoded[b] if b in decoded else self._decode_block(self.tier.get(b)) for b in needed}
        n_sink, n_win = self.sink_kv.shape[3], self.win_kv.shape[3]
        win_pos = torch.arange(self.n_tokens - n_win, self.n_tokens)
        layers, pos_rows = [], []
        for layer, row in enumerate(chosen):
            parts = [self.sink_kv[layer]] + [blocks[b][layer].to(self.dtype) for b in row] + [self.win_kv[layer]]
            layers.append(torch.cat(parts, dim=2))
            pos_rows.append(torch.cat([torch.arange(n_sink)] + [torch.arange(*self.block_ranges[b]) for b in row]
                                      + [win_pos]))
        return torch.stack(layers), torch.stack(pos_rows)

    # ------------------------------------------------------------------------------------------ accounting
    def stats(self) -> dict:
        """Memory accounting: ``resident_bytes`` (sinks + window KV, what the append path keeps on the model's
        device), ``index_bytes`` (FAISS mean-key summaries + token codes, host), the block tiers' bytes
        (``ram_block_bytes``, ``disk_block_bytes``, ``store_block_bytes``), ``tokens`` and ``blocks``."""
        kv_bytes = (self.sink_kv.numel() + self.win_kv.numel()) * self.sink_kv.element_size()
        summaries = sum(ix.ntotal * ix.d * 4 for ix in self.indexes)
        codes = sum(c.numel() * c.element_size() for c in self._codes)
        return {"resident_bytes": kv_bytes, "index_bytes": summaries + codes, "tokens": self.n_tokens,
                "blocks": len(self.block_ranges), **self.tier.stats()}

    # ------------------------------------------------------------------------------------------ persistence
    def _state(self) -> dict:
        codes = torch.cat(self._codes, dim=2) if self._codes else torch.empty(0)
        summaries = torch.from_numpy(np.stack([ix.reconstruct_n(0, ix.ntotal) for ix in self.indexes])) \
            if self.block_ranges else torch.empty(0)
        return {
            "format": _FORMAT, "session_id": self.session_id, "n_tokens": self.n_tokens,
            "settings": {"window": self.window, "block": self.block, "sinks": self.sinks,
                         "top_blocks": self.top_blocks, "level": self.level, "positions": self.positions,
                         "scorer": self.scorer if isinstance(self.scorer, str) else "mean-key",
                         "answer_budget": self.answer_budget, "selection": self.selection,
                         "rerank": self.rerank, "rerank_fraction": self.rerank_fraction},
            "model": {"layers": self.info.num_layers, "kv_heads": self.info.num_kv_heads,
                      "head_dim": self.info.head_dim},
            "codec_profile_id": getattr(self.codec_profile, "profile_id", None),
            "retriever": self.retriever_profile is not None,
            "sink_kv": self.sink_kv.cpu(), "win_kv": self.win_kv.cpu(),
            "sink_ids": torch.tensor(self.sink_ids, dtype=torch.int64),
            "win_ids": torch.tensor(self.win_ids, dtype=torch.int64),
            "block_ranges": torch.tensor(self.block_ranges, dtype=torch.int64).reshape(-1, 2),
            "block_ids": [t if t is not None else torch.empty(0, dtype=torch.int32) for t in self.block_token_ids],
            "summaries": summaries, "codes": codes,
        }

    def flush(self) -> None:
        """Write the session state to the store (blocks are already there), so :meth:`open` can resume it."""
        if self.store is None:
            raise StreamError("flush needs a store (StreamSession(model, store=client))")
        buf = io.BytesIO()
        torch.save(self._state(), buf)
        self.store.put(state_key(self.session_id), buf.getvalue())

    def close(self) -> None:
        """Flush to the store (when there is one) and release the session; further appends and asks raise."""
        if self.closed:
            return
        if self.store is not None:
            self.flush()
        self.closed = True
        self.tier.close()
        self.sink_kv = self.win_kv = self.sink_kv[:, :, :, :0]

    @classmethod
    def open(cls, model, store, session_id: str, retriever_profile=None, codec_profile=None,
             **overrides) -> "StreamSession":
        """Reopen a flushed or closed session from ``store``; it continues as if it had never been closed.

        ``retriever_profile`` / ``codec_profile`` must be the profiles the session was written with; ``overrides``
        replace reader-side settings (``top_blocks``, ``positions``, ``scorer``, ``answer_budget``, ``rerank``, ``rerank_fraction``).

        Raises
        ------
        StreamError
            If the store has no such session, or it was written for another model shape or codec profile.
        """
        if store is None:
            raise StreamError("open needs the store the session was written to")
        data = store.get(state_key(session_id))
        if data is None:
            raise StreamError(f"no stream session {session_id!r} in the store")
        st = torch.load(io.BytesIO(bytes(data)), weights_only=True)
        if st.get("format") != _FORMAT:
            raise StreamError(f"session {session_id!r} has state format {st.get('format')}, expected {_FORMAT}")
        info = model_info(model)
        if st["model"] != {"layers": info.num_layers, "kv_heads": info.num_kv_heads, "head_dim": info.head_dim}:
            raise StreamError(f"session {session_id!r} was written for a model of shape {st['model']}")
        if st["codec_profile_id"] != getattr(codec_profile, "profile_id", None):
            raise StreamError(f"session {session_id!r} was written with codec profile {st['codec_profile_id']}")
        if st["retriever"] and retriever_profile is None and overrides.get("scorer", st["settings"]["scorer"]) \
                in CODE_SCORERS:
            raise StreamError(f"session {session_id!r} uses key codes: pass its retriever_profile")
        settings = {**st["settings"], **overrides}
        if not st["retriever"] or retriever_profile is None:
            settings["scorer"] = settings["scorer"] if settings["scorer"] not in CODE_SCORERS else "mean-key"
        s = cls(model, store, retriever_profile if st["retriever"] else None, codec_profile,
                session_id=session_id, **settings)
        s.n_tokens = int(st["n_tokens"])
        s.sink_kv = st["sink_kv"].to(s.device, s.dtype)
        s.win_kv = st["win_kv"].to(s.device, s.dtype)
        s.sink_ids, s.win_ids = st["sink_ids"].tolist(), st["win_ids"].tolist()
        s.block_ranges = [tuple(r) for r in st["block_ranges"].tolist()]
        s.block_token_ids = [t if t.numel() else None for t in st["block_ids"]]
        if s.block_ranges:
            summ = st["summaries"].numpy()
            for layer, ix in enumerate(s.indexes):
                ix.add(np.ascontiguousarray(summ[layer]))
            if st["retriever"] and st["codes"].numel():
                codes = st["codes"]
                s._codes = [codes[:, :, i * s.block : (i + 1) * s.block] for i in range(len(s.block_ranges))]
        s.tier.adopt_store_blocks(len(s.block_ranges))
        return s
