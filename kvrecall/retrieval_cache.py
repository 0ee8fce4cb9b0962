"""Retrieval decoding inside ``model.generate``: full KV off the device, top-k rows per decode step.

::

    from kvrecall import RetrievalCache
    from kvrecall.retriever import RetrieverProfile
    profile = RetrieverProfile.load(path)
    cache = RetrievalCache(model, profile, budget=0.03, sinks=8, window=64)
    out = model.generate(input_ids, cache=cache, max_new_tokens=64, do_sample=False)   # past_key_values= on 5.17
    cache.stats()

:class:`RetrievalCache` is a transformers ``Cache`` whose layers (:class:`RetrievalLayer`, a
``CacheLayerMixin``) keep resident only the first ``sinks`` tokens, the last ``window`` tokens and one code per
(KV head, token); every other K/V row lives in an :class:`~kvrecall.retrieval_store.OffloadStore`. The model's
attention is switched (``model.set_attn_implementation``) to ``kvrecall_retrieval``, registered with
``AttentionInterface``; for any other cache that function is plain SDPA, so the model keeps working with
``DynamicCache`` too. Per layer:

* **prefill** (several query tokens): dense causal attention, computed ``prefill_chunk`` queries at a time over
  the earlier rows (from the store) and the new ones, then every token but the last ``window`` is coded and
  moved to the store;
* **decode** (one query token): the token enters the window, the token leaving it is coded and stored, every
  stored token is scored from its code only and a shortlist of candidates is taken per query head and unioned
  per GQA group (:meth:`~kvrecall.retriever.fast_scoring.CodeScorer.candidates`); only those rows are read
  from the store and scored exactly (``rerank > 1``: each query head keeps its top-k of them), and attention
  runs over sinks, kept rows and window — O(selected), never O(context).

Keys are rotated at their true positions once, when they enter the window (the model's own post-RoPE keys) or
the store (:meth:`RetrievalCache.from_kv`); codes are of the pre-RoPE keys (the scorer applies RoPE through
its lookup tables). Exact scores and the weighted sum of values are computed from the stored rows directly
(:meth:`~kvrecall.retrieval_store.OffloadStore.dot` / ``mix``), and the attention reuses the rerank's scores.

``backend="triton"`` scores the far bands' codes with :func:`kvrecall.kernels.score_topk.lut_scores_triton`;
where the codes' shortlist is attended as it is (``rerank=1``, or a budget that covers the store) the fetched
rows go straight to :func:`kvrecall.kernels.sparse_attention.sparse_decode_attention` (``gathered=True``:
scores, softmax and the weighted sum of values in one pass). With a rerank the kept rows' exact scores already
exist, so the softmax over them and the sum of their values run in torch on the device (handing the kernel the
kept keys again would fetch them twice). ``"torch"`` (the default) computes everything in torch.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict

import torch

from kvrecall import defaults
from kvrecall.models import (apply_rope, model_info, rope_parameters, shared_rope_table,
                             shared_rope_table_bytes, undo_rope)
from kvrecall.retrieval_store import OFFLOAD_FORMS, OffloadStore, RetrievalError, resident_row_dtype
from kvrecall.retriever.code_buffer import CodeBuffer
from kvrecall.retriever.codebooks import code_dtype, encode
from kvrecall.retriever.fast_scoring import SCORERS, CodeScorer, compact_mask, padded_selection
from kvrecall.retriever.profile import RetrieverProfile
from kvrecall.retriever.selection import resolve_budget

__all__ = ["RetrievalCache", "RetrievalLayer", "RetrievalError", "ATTENTION_NAME", "BACKENDS"]

ATTENTION_NAME = "kvrecall_retrieval"
BACKENDS = ("torch", "triton")
_PENDING = threading.local()
_STAGES = ("score", "select", "gather", "attend", "offload", "prefill")


# ---------------------------------------------------------------------------------------------- attention hook
def _dense_fallback(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _retrieval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``kvrecall_retrieval`` attention: a :class:`RetrievalLayer` step when one is pending, else SDPA."""
    pending = getattr(_PENDING, "layer", None)
    if pending is None or pending.layer_idx != getattr(module, "layer_idx", None) or key is not pending._last_key:
        return _dense_fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    _PENDING.layer = None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = pending.attend(query, key, value, attention_mask, scale)  # [B, Hq, Q, D]
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _retrieval_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _REGISTERED = True


def rerank_candidates(k: int, rerank: float, floor: int, available: int) -> int:
    """Candidates the codes pick per query head before the exact rescoring of a ``rerank > 1`` step:
    ``max(ceil(rerank * k), floor)``, at most the ``available`` stored tokens."""
    return min(available, max(int(math.ceil(rerank * k)), floor))


def _check_no_padding(mask: torch.Tensor | None) -> None:
    """Raise if a 4-D attention mask hides any key from the last query (padding)."""
    if mask is None or not isinstance(mask, torch.Tensor):
        return
    last = mask[..., -1, :]
    ok = bool(last.all()) if mask.dtype == torch.bool else bool((last == 0).all())
    if not ok:
        raise RetrievalError("RetrievalCache does not support padded batches (attention_mask with zeros); "
                             "use prompts of equal length")


# ---------------------------------------------------------------------------------------------- the layer
try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:  # pragma: no cover - transformers < 4.56
    raise ImportError("RetrievalCache needs transformers >= 5.0 (cache-layer API)") from exc


class _RefusesReshaping:
    """Cache-API calls retrieval decoding does not support, refused alike by the cache and each of its layers
    (transformers calls either, depending on its version)."""

    def reorder_cache(self, beam_idx) -> None:
        raise RetrievalError("RetrievalCache does not support beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise RetrievalError("RetrievalCache cannot be cropped (assisted / speculative decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise RetrievalError("RetrievalCache does not support expanding the batch (num_return_sequences, beams)")

    def batch_select_indices(self, indices) -> None:
        raise RetrievalError("RetrievalCache does not support selecting batch rows")


class RetrievalLayer(_RefusesReshaping, CacheLayerMixin):
    """One layer of a :class:`RetrievalCache`: sinks + window + codes resident, other rows in the store.

    Token indices ``0 .. length-1`` are positions ``offset .. offset + length - 1``. Rows ``0 .. n_off-1`` are in
    the store and coded; ``n_off .. length-1`` form the resident window (post-RoPE keys, values).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: "RetrievalCache", layer_idx: int) -> None:
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.length = 0
        self.store: OffloadStore | None = None
        self.codes: CodeBuffer | None = None  # [B, Hkv, n_off, m]
        self.sink_k = self.sink_v = None  # [B, Hkv, <=sinks, D] post-RoPE
        self.win_k = self.win_v = None  # [B, Hkv, w, D] post-RoPE
        self._last_key = None
        self.last_gathered = 0  # rows gathered from the store at the last decode step (per KV head, max)
        self.last_attended = 0  # rows attended at the last decode step (per KV head, max)

    # ---- CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        o = self.owner
        b, hkv, _, d = key_states.shape
        if hkv != o.info.num_kv_heads or d != o.info.head_dim:
            raise RetrievalError(f"layer {self.layer_idx}: got KV [{hkv} heads, dim {d}], the profile is for "
                                 f"[{o.info.num_kv_heads}, {o.info.head_dim}]")
        self.batch_size = b
        self.device, self.dtype = key_states.device, key_states.dtype
        self.row_dtype = resident_row_dtype(self.dtype, o.offload)
        self.store = OffloadStore(b, hkv, d, o.offload, self.dtype)
        self.codes = CodeBuffer(b, hkv, o.profile.settings.m, o.profile.settings.bits, o.index_device)
        rows = key_states.new_empty(b, hkv, 0, d, dtype=self.row_dtype)
        self.sink_k = self.sink_v = self.win_k = self.win_v = rows
        self.keys = self.values = key_states.new_empty(b, hkv, 0, d)  # what transformers inspects (batch, dtype)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch_size:
            raise RetrievalError(f"batch size changed from {self.batch_size} to {key_states.shape[0]} "
                                 "(beam search and sequence expansion are not supported)")
        self._last_key = key_states
        _PENDING.layer = self
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.offset + self.length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.owner, self.layer_idx)


    # ---- bookkeeping
    @property
    def n_off(self) -> int:
        return self.store.length if self.store is not None else 0

    def resident_bytes(self) -> int:
        """Codes (as allocated) + sink and window rows of this layer."""
        if not self.is_initialized:
            return 0
        rows = sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.win_k, self.win_v))
        return self.codes.nbytes + rows

    def _offload(self, keys: torch.Tensor, values: torch.Tensor, keys_pre: torch.Tensor | None = None) -> None:
        """Code and store rows ``[B, Hkv, n, D]`` (keys post-RoPE) at the next store indices; keep the first
        ones as sinks. The codes are of the pre-RoPE keys: ``keys_pre`` when given, else undone from ``keys``."""
        o = self.owner
        n = keys.shape[2]
        if n == 0:
            return
        t0 = time.perf_counter()
        start = self.n_off
        if keys_pre is None:
            keys_pre = o.unrotate(keys, torch.arange(o.offset + start, o.offset + start + n, device=keys.device))
        take = max(0, min(n, o.sinks - start))
        if take:
            self.sink_k = torch.cat([self.sink_k, keys[:, :, :take].to(self.row_dtype)], dim=2)
            self.sink_v = torch.cat([self.sink_v, values[:, :, :take].to(self.row_dtype)], dim=2)
        self.store.append(keys, values)
        self.codes.append(o.encode_keys(self.layer_idx, keys_pre))  # [B, Hkv, n, m]
        o._time("offload", t0)

    def _slide_window(self) -> None:
        """Move the rows beyond the last ``window`` tokens from the window to the store (and the index)."""
        extra = self.win_k.shape[2] - self.owner.window
        if extra > 0:
            self._offload(self.win_k[:, :, :extra], self.win_v[:, :, :extra])
            self.win_k, self.win_v = self.win_k[:, :, extra:].contiguous(), self.win_v[:, :, extra:].contiguous()

    # ---- attention
    def attend(self, query, key, value, attention_mask, scale: float) -> torch.Tensor:
        """Attention for the ``Q`` new tokens whose post-RoPE ``key/value [B, Hkv, Q, D]`` just arrived."""
        q_len = query.shape[2]
        if self.layer_idx == 0:
            _check_no_padding(attention_mask)
        if q_len > 1 or self.length == 0:
            out = self._prefill(query, key, value, scale)
        else:
            out = self._decode(query, key, value, scale, self.owner.offset + self.length)
        self.length += q_len
        self._slide_window()  # the window keeps the last `window` tokens; older ones go to the store
        return out

    def _prefill(self, query, key, value, scale: float) -> torch.Tensor:
        """Dense causal attention of ``Q`` new queries over all earlier rows + the new ones, in query chunks."""
        o = self.owner
        t0 = time.perf_counter()
        q_len = query.shape[2]
        past = self.length
        if past:
            sk, sv = self.store.all_rows(key.device)
            k_past = torch.cat([sk, self.win_k.to(sk.dtype)], dim=2)
            v_past = torch.cat([sv, self.win_v.to(sv.dtype)], dim=2)
            keys, values = torch.cat([k_past.to(key.dtype), key], dim=2), torch.cat([v_past.to(value.dtype), value], dim=2)
        else:
            keys, values = key, value
        outs = []
        group = query.shape[1] // keys.shape[1]
        for s in range(0, q_len, o.prefill_chunk):
            e = min(q_len, s + o.prefill_chunk)
            kv_end = past + e
            qi = torch.arange(past + s, past + e, device=key.device)[:, None]
            mask = torch.arange(kv_end, device=key.device)[None, :] <= qi  # [q, kv]
            k_ = keys[:, :, :kv_end].repeat_interleave(group, dim=1)
            v_ = values[:, :, :kv_end].repeat_interleave(group, dim=1)
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e], k_, v_, attn_mask=mask, scale=scale))
        self.win_k = torch.cat([self.win_k, key.to(self.row_dtype)], dim=2)
        self.win_v = torch.cat([self.win_v, value.to(self.row_dtype)], dim=2)
        o._time("prefill", t0)
        return torch.cat(outs, dim=2)

    def _decode(self, query, key, value, scale: float, pos: int) -> torch.Tensor:
        """One decode step: shortlist from codes, exact scores of the shortlist, attend over sinks + kept + window.

        Stages (``stats()["timings_ms"]``): ``score`` codes -> candidate rows; ``gather`` their keys fetched
        from the store and scored exactly (``OffloadStore.dot``); ``select`` each query head's top-k of those
        scores, unioned per GQA group (rerank only); ``attend`` softmax over sinks + kept + window and the kept
        rows' values (``OffloadStore.mix``). The Triton backend without a rerank fetches the candidates' keys
        and values (``gather``) and attends them in the sparse kernel (``attend``)."""
        o = self.owner
        b, hq, _, d = query.shape
        hkv, g = o.info.num_kv_heads, o.info.group_size
        dev = query.device
        # the new token enters the window; the one leaving it goes to the store (and the index) first
        self.win_k = torch.cat([self.win_k, key.to(self.row_dtype)], dim=2)
        self.win_v = torch.cat([self.win_v, value.to(self.row_dtype)], dim=2)
        self._slide_window()
        n_off = self.n_off
        lo = min(o.sinks, n_off)
        total = self.length + 1
        k = resolve_budget(o.budget, total)
        # ---- score (codes only): candidate rows
        t0 = time.perf_counter()
        q_post = query[:, :, 0].float()  # [B, Hq, D], rotated at pos by the model
        q_pre = o.unrotate(q_post, torch.tensor([pos], device=dev)).float()
        rerank = o.rerank > 1.0 and o.selector is None and k < n_off - lo
        k_pick = rerank_candidates(k, o.rerank, o.rerank_floor, n_off - lo) if rerank else k
        idx, valid = self._candidates(q_pre.to(o.index_device), lo, n_off, k_pick, pos)
        idx, valid = idx.to("cpu"), valid.to(dev)
        t1 = time.perf_counter()
        o.timings["score"] += t1 - t0
        self.last_gathered = idx.shape[2]
        qg = q_post.reshape(b, hkv, g, d)
        if o.backend == "triton" and not rerank:  # the sparse kernel scores, weighs and sums the fetched rows itself
            sel_k, sel_v = self.store.gather(idx, dev)
            o.timings["gather"] += time.perf_counter() - t1
            t2 = self._note_attended(q_pre, idx, valid, lo, n_off, k, pos)
            out = self._attend_triton(query, sel_k, sel_v, valid, scale)
            o.timings["attend"] += time.perf_counter() - t2
            return out
        # ---- gather: the candidates' keys, scored exactly
        logits = self.store.dot(idx, qg).mul_(scale).masked_fill_(~valid[:, :, None, :], float("-inf"))
        t2 = time.perf_counter()
        o.timings["gather"] += t2 - t1
        if rerank:  # ---- select: each head's exact top-k of the candidates, unioned per group
            top = logits.topk(min(k, logits.shape[-1]), dim=-1, sorted=False).indices  # [B, Hkv, g, k]
            keep = torch.zeros(b, hkv, logits.shape[-1], dtype=torch.bool, device=dev)
            keep.scatter_(2, top.reshape(b, hkv, -1), True)
            keep &= valid
            order, valid = compact_mask(keep)  # [B, Hkv, S'] positions of the kept candidates, in order
            idx = idx.gather(2, order.cpu())
            logits = logits.gather(3, order[:, :, None, :].expand(b, hkv, g, order.shape[2]))
            logits.masked_fill_(~valid[:, :, None, :], float("-inf"))  # padding of heads that kept fewer rows
            o.timings["select"] += time.perf_counter() - t2
        t3 = self._note_attended(q_pre, idx, valid, lo, n_off, k, pos)
        # ---- attend: softmax over sinks + window and the kept rows' exact scores, the kept rows' values summed
        res_k = torch.cat([self.sink_k, self.win_k], dim=2).float()
        res_v = torch.cat([self.sink_v, self.win_v], dim=2).float()
        res_logits = torch.matmul(qg, res_k.transpose(2, 3)) * scale  # [B, Hkv, g, sinks + window]
        w = torch.softmax(torch.cat([res_logits, logits], dim=-1), dim=-1)
        r = res_k.shape[2]
        out = torch.matmul(w[..., :r], res_v)
        if idx.shape[2]:
            out = out + self.store.mix(idx, w[..., r:].contiguous())
        out = out.reshape(b, hq, 1, d).to(query.dtype)
        o.timings["attend"] += time.perf_counter() - t3
        return out

    def _note_attended(self, q_pre, idx, valid, lo: int, n_off: int, k: int, pos: int) -> float:
        """Count the step's attended rows (``last_attended``, ``mean_selected``) and show them to the bench's probe;
        returns the time the attend stage starts at (after the probe)."""
        o = self.owner
        b, hkv = idx.shape[:2]
        if o.probe is not None:  # measurement hook (bench): sees the step's query and the rows it attends
            chosen = [[idx[bi, h][valid[bi, h].cpu()] for h in range(hkv)] for bi in range(b)]
            o.probe(self, q_pre, chosen, lo, n_off, k, pos)
        n_sink, n_win = self.sink_k.shape[2], self.win_k.shape[2]
        self.last_attended = n_sink + idx.shape[2] + n_win
        o.selected_sum += (n_sink + n_win) + float(valid.sum()) / (b * hkv)
        o.selected_steps += 1
        return time.perf_counter()

    def _candidates(self, q_pre: torch.Tensor, lo: int, n_off: int, k: int, pos: int):
        """Rows to fetch: ``idx, valid [B, Hkv, S]`` (token indices, ascending; padding invalid)."""
        o = self.owner
        b, hkv = q_pre.shape[0], o.info.num_kv_heads
        if n_off <= lo or k <= 0:
            return torch.zeros(b, hkv, 0, dtype=torch.int64), torch.zeros(b, hkv, 0, dtype=torch.bool)
        if o.selector is not None:  # a baseline selection method in the same runtime
            return padded_selection(o.selector(self, q_pre, lo, n_off, k, pos))
        return o.scorer.candidates(self.layer_idx, q_pre, self.codes, lo, n_off, pos, k)

    def _attend_triton(self, query, sel_k, sel_v, valid, scale):
        """Fetched rows ``sel_k, sel_v [B, Hkv, S, D]`` (``valid`` marks the live ones) attended with sinks and
        window by the sparse kernel (scores, softmax and the weighted sum in one pass)."""
        from kvrecall.kernels.sparse_attention import sparse_decode_attention

        b, hkv = valid.shape[:2]
        keys = torch.cat([self.sink_k.to(sel_k.dtype), sel_k, self.win_k.to(sel_k.dtype)], dim=2)
        values = torch.cat([self.sink_v.to(sel_v.dtype), sel_v, self.win_v.to(sel_v.dtype)], dim=2)
        n_sink, n_win = self.sink_k.shape[2], self.win_k.shape[2]
        ones = torch.ones(b, hkv, n_sink, dtype=torch.bool, device=valid.device)
        live = torch.cat([ones, valid, ones[:, :, :0].new_ones(b, hkv, n_win)], dim=2)
        # gathered mode: row r holds a selected token; live rows first (their order does not matter: no RoPE)
        order = torch.argsort((~live).to(torch.int8), dim=-1, stable=True)
        s = keys.shape[2]
        kk = torch.gather(keys, 2, order[..., None].expand(b, hkv, s, keys.shape[3])).contiguous()
        vv = torch.gather(values, 2, order[..., None].expand(b, hkv, s, values.shape[3])).contiguous()
        rows = torch.arange(s, device=query.device).expand(b, hkv, s).contiguous()
        out = sparse_decode_attention(query[:, :, 0].contiguous(), kk, vv, rows, live.sum(-1), rope=None,
                                      sm_scale=scale, gathered=True, validate=False)
        return out[:, :, None, :]


# ---------------------------------------------------------------------------------------------- the cache
class RetrievalCache(_RefusesReshaping, Cache):
    """A transformers ``Cache`` for retrieval decoding (see the module docstring).

    Parameters
    ----------
    model : a Llama-family transformers model (RoPE, GQA allowed). Its attention implementation is switched to
        ``kvrecall_retrieval`` (SDPA for every other cache); :meth:`restore_attention` switches it back.
    profile : RetrieverProfile of ``model`` (``positional`` or ``windowed`` codes of pre-RoPE keys).
    budget : float in (0, 1] (fraction of the current context) or int (tokens): top-k per query head.
    sinks, window : tokens always attended at the start and the end of the context.
    prefill_chunk : queries per dense attention block at prefill (bounds the attention's peak memory; pass
        ``prefill_chunk_size=cache.prefill_chunk`` to ``generate`` to chunk the whole forward too).
    offload : working form of stored rows, one of ``"exact"`` (model dtype), ``"float16"``, ``"int8"``,
        ``"int4"``. The resident sink and window rows are held in the model's dtype under ``"exact"`` and in a
        16-bit dtype otherwise (float16 for a float32 model; :func:`resident_row_dtype`), upcast to attend.
    scorer : ``"banded"``, ``"positional"`` or ``"windowed"`` (see :mod:`kvrecall.retriever.fast_scoring`).
    near, band_ratio : banded scorer settings.
    rerank : float >= 1. Above 1, codes pick ``ceil(rerank * k)`` candidates per query head (exactly below
        4,096 or 8x the candidates stored tokens, about that many above: a sampled threshold per head,
        :meth:`~kvrecall.retriever.fast_scoring.CodeScorer.candidates`); their keys are read and scored
        exactly, and attention runs over each query head's exact top-``k`` among them (unioned per GQA group).
        Costs ``rerank`` times the gathered keys; 1.0 attends the codes' shortlist of ``k`` directly. Default
        ``kvrecall.defaults.RETRIEVAL_RERANK``.
    rerank_floor : int >= 0. With ``rerank > 1`` the codes pick at least this many candidates per query head
        (``max(ceil(rerank * k), rerank_floor)``): at short contexts a budget's ``rerank * k`` is too few to hold
        keys the codes rank badly (docs/retrieval-decoding.md). Default ``kvrecall.defaults.RETRIEVAL_RERANK_FLOOR``.
    backend : ``"torch"`` or ``"triton"``: the far bands' code scores through
        :func:`kvrecall.kernels.score_topk.lut_scores_triton` and, where no rerank runs, the attention over the
        fetched rows through :func:`kvrecall.kernels.sparse_attention.sparse_decode_attention` (module
        docstring; on CPU only under ``TRITON_INTERPRET=1``).
    selector : optional callable ``(layer, q_pre [B, Hq, D], lo, n_off, k, pos) -> list[list[indices]]``
        replacing code scoring (oracle / Quest / StreamingLLM baselines in the same runtime).

    Raises
    ------
    RetrievalError
        On a profile of another model shape, bad settings, and at run time on padding, beam search, batch
        expansion or cropping.
    """

    def __init__(
        self,
        model,
        profile: RetrieverProfile,
        budget: int | float = defaults.RETRIEVAL_BUDGET,
        sinks: int = defaults.RETRIEVAL_SINKS,
        window: int = defaults.RETRIEVAL_WINDOW,
        *,
        prefill_chunk: int = defaults.PREFILL_CHUNK,
        offload: str = defaults.RETRIEVAL_OFFLOAD,
        scorer: str = defaults.RETRIEVAL_SCORER,
        near: int = defaults.RETRIEVAL_NEAR,
        band_ratio: float = defaults.RETRIEVAL_BAND_RATIO,
        backend: str = "torch",
        selector=None,
        rerank: float = defaults.RETRIEVAL_RERANK,
        rerank_floor: int = defaults.RETRIEVAL_RERANK_FLOOR,
    ) -> None:
        from kvrecall.retriever.errors import RetrieverError

        if not isinstance(profile, RetrieverProfile):
            raise RetrievalError(f"profile must be a RetrieverProfile, got {type(profile).__name__}")
        try:
            profile.check_model(model)
        except RetrieverError as exc:
            raise RetrievalError(str(exc)) from exc
        resolve_budget(budget, 1000)  # type / range check (RetrieverError is a ValueError)
        for name, value in (("sinks", sinks), ("window", window)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RetrievalError(f"{name} must be an int >= 0, got {value!r}")
        if window < 1:
            raise RetrievalError("window must be >= 1 (the current token is always attended)")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise RetrievalError(f"prefill_chunk must be a positive int, got {prefill_chunk!r}")
        if offload not in OFFLOAD_FORMS:
            raise RetrievalError(f"offload must be one of {OFFLOAD_FORMS}, got {offload!r}")
        if scorer not in SCORERS:
            raise RetrievalError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if backend not in BACKENDS:
            raise RetrievalError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(rerank, bool) or not isinstance(rerank, (int, float)) or not rerank >= 1.0:
            raise RetrievalError(f"rerank must be a number >= 1.0, got {rerank!r}")
        if isinstance(rerank_floor, bool) or not isinstance(rerank_floor, int) or rerank_floor < 0:
            raise RetrievalError(f"rerank_floor must be an int >= 0, got {rerank_floor!r}")
        self.model, self.profile = model, profile
        self.info = model_info(model)
        self.inv_freq, self.rope_scaling = rope_parameters(model)
        self.budget, self.sinks, self.window = budget, sinks, window
        self.prefill_chunk, self.offload, self.backend = prefill_chunk, offload, backend
        self.selector = selector
        self.rerank, self.rerank_floor = float(rerank), rerank_floor
        self.probe = None
        self.offset = 0
        self.index_device = next(model.parameters()).device
        lut_scores = None
        if backend == "triton":  # far-band code scores through the Triton LUT + gather kernel
            from functools import partial

            from kvrecall.kernels.score_topk import lut_scores_triton

            lut_scores = partial(lut_scores_triton, validate=False)
        self.scorer = CodeScorer(profile, scorer, near=near, band_ratio=band_ratio, device=self.index_device,
                                 lut_scores=lut_scores)
        self._key_t = profile.key_transform.to(self.index_device)
        self._books = profile.codebooks.to(self.index_device)
        self._book_norms = (self._books[:, :, 0] ** 2).sum(-1)  # [L, Hkv, K] (vq)
        self.timings: dict[str, float] = defaultdict(float)
        self.selected_sum, self.selected_steps = 0.0, 0
        super().__init__(layers=[RetrievalLayer(self, i) for i in range(self.info.num_layers)])
        _register()
        self._previous_attention = model.config._attn_implementation
        if self._previous_attention != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)

    # ---- construction from prefilled KV
    @classmethod
    def from_kv(cls, model, profile: RetrieverProfile, kv: torch.Tensor, last_position: int | None = None,
                **kwargs) -> "RetrievalCache":
        """A cache already holding a prefilled context, without running the model.

        Parameters
        ----------
        kv : Tensor[layers, 2, kv_heads, T, head_dim], keys **pre-RoPE** (``kvrecall.models.prefill_kv``, or
            decoded chunks), batch 1.
        last_position : position of the last token of ``kv`` (default ``T - 1``); the tokens sit at positions
            ``last_position - T + 1 .. last_position``.
        **kwargs : the constructor's settings (``budget``, ``sinks``, ``window``, ``offload``, ...).

        Continue with ``model.generate(ids, cache=cache)`` where ``ids`` holds the whole prompt (the first
        ``last_position + 1`` tokens are then skipped as cached) plus at least one uncached token.
        """
        cache = cls(model, profile, **kwargs)
        info = cache.info
        if not isinstance(kv, torch.Tensor) or kv.ndim != 5 or kv.shape[0] != info.num_layers or kv.shape[1] != 2 \
                or kv.shape[2] != info.num_kv_heads or kv.shape[4] != info.head_dim:
            raise RetrievalError(f"kv must be [layers={info.num_layers}, 2, kv_heads={info.num_kv_heads}, T, "
                                 f"head_dim={info.head_dim}], got {tuple(getattr(kv, 'shape', ()))}")
        t = kv.shape[3]
        if t == 0:
            raise RetrievalError("kv holds no tokens")
        last = t - 1 if last_position is None else int(last_position)
        if last < t - 1:
            raise RetrievalError(f"last_position {last} is before the end of {t} tokens starting at position 0")
        cache.offset = last - (t - 1)
        param = next(model.parameters())
        positions = torch.arange(cache.offset, cache.offset + t, device=param.device)
        for i, layer in enumerate(cache.layers):
            k_pre = kv[i, 0].unsqueeze(0).to(param.device, param.dtype)
            v = kv[i, 1].unsqueeze(0).to(param.device, param.dtype)
            k = cache.rotate(k_pre, positions)
            layer.lazy_initialization(k[:, :, :0], v[:, :, :0])
            keep = min(cache.window, t)
            layer._offload(k[:, :, : t - keep], v[:, :, : t - keep], keys_pre=k_pre[:, :, : t - keep])
            layer.win_k = k[:, :, t - keep :].to(layer.row_dtype).contiguous()
            layer.win_v = v[:, :, t - keep :].to(layer.row_dtype).contiguous()
            layer.length = t
        return cache

    # ---- helpers used by the layers
    def rope_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``cos, sin [*positions.shape, D]`` of integer ``positions``: rows of the model's
        :func:`~kvrecall.models.shared_rope_table` (``rope_table_bytes`` in :meth:`stats`), equal to
        :func:`~kvrecall.models.rope_tables` (computing them per step cost more than the attention it served:
        7 ms for 15K rows on one core)."""
        flat = positions.reshape(-1).long()
        need = int(flat.max()) + 1 if flat.numel() else 0
        table = shared_rope_table(self.inv_freq.to(flat.device), self.rope_scaling, need)
        cos, sin = table[0].index_select(0, flat), table[1].index_select(0, flat)
        return cos.reshape(*positions.shape, -1), sin.reshape(*positions.shape, -1)

    def rotate(self, keys_pre: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE rows ``[..., n, D]`` rotated at ``positions [n]`` as the model rotates its keys (tables
        include the rotary embedding's ``attention_scaling``), in the rows' dtype."""
        cos, sin = self.rope_rows(positions)
        return apply_rope(keys_pre, cos.to(keys_pre.dtype), sin.to(keys_pre.dtype))

    def unrotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rotate`: post-RoPE rows ``[..., n, D]`` at ``positions [n]`` -> pre-RoPE rows
        (the scaled tables rotate and scale by ``s``, so undoing them scales by ``s`` again: divide by ``s**2``)."""
        cos, sin = self.rope_rows(positions)
        pre = undo_rope(keys, cos.to(keys.dtype), sin.to(keys.dtype))
        return pre / self.rope_scaling ** 2 if self.rope_scaling != 1.0 else pre

    def encode_keys(self, layer: int, keys_pre: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, Hkv, n, m]`` of pre-RoPE keys ``[B, Hkv, n, D]`` (query-aware transform, nearest centroid)."""
        k = keys_pre.to(self.index_device).float()
        kt = torch.einsum("bhnd,hde->bhne", k, self._key_t[layer])
        if self._books.shape[2] != 1:  # product codes: per sub-vector nearest centroid
            return torch.stack([encode(kt[:, h], self._books[layer, h]) for h in range(kt.shape[1])], dim=1)
        books = self._books[layer, :, 0]  # [Hkv, K, D]
        norms = self._book_norms[layer]  # [Hkv, K]
        b, h, n, _ = kt.shape
        out = torch.empty(b, h, n, 1, dtype=code_dtype(self.profile.settings.bits), device=kt.device)
        step = 2048
        for bi in range(b):
            for s in range(0, n, step):
                part = kt[bi, :, s : s + step]  # [Hkv, c, D]
                dist = norms[:, None, :] - 2 * torch.bmm(part, books.transpose(1, 2))
                out[bi, :, s : s + step, 0] = dist.argmin(-1).to(out.dtype)
        return out

    def _time(self, stage: str, start: float) -> None:
        self.timings[stage] += time.perf_counter() - start

    def restore_attention(self) -> None:
        """Switch the model back to the attention implementation it had before this cache."""
        if self._previous_attention != ATTENTION_NAME:
            self.model.set_attn_implementation(self._previous_attention)

    # ---- accounting
    def stats(self) -> dict:
        """Memory and time accounting.

        Returns
        -------
        dict with ``resident_bytes`` (codes + sink + window rows of every layer, per cache: what would sit in
        GPU memory; the scorer keeps no per-token state of its own), ``codebook_bytes`` (per-model decoded
        codebooks, shared by all sequences, reported apart), ``rope_table_bytes`` (the RoPE cos/sin table of
        the positions seen, shared by every cache of the model, reported apart),
        ``offloaded_bytes`` (the store), ``fetched_bytes`` (rows and their scales read from the stores so far,
        in their stored form, prefill included: on a GPU the bytes copied to it), ``dense_fp16_bytes`` (the same
        tokens as an fp16 KV cache), ``tokens``, ``batch``, ``mean_selected`` (rows attended per KV head per
        decode step, averaged over layers and steps),
        ``decode_steps`` and ``timings_ms`` totals: ``score`` (codes -> shortlist), ``gather`` (the shortlist's
        keys read from the store and scored exactly), ``select`` (each head's top-k of those scores, rerank
        only), ``attend`` (softmax, the kept rows' values), ``offload`` (coding and storing rows leaving the
        window), ``prefill``.
        """
        layers = [layer for layer in self.layers if layer.is_initialized]
        tokens = layers[0].length if layers else 0
        batch = layers[0].batch_size if layers else 0
        dense = 2 * self.info.num_layers * self.info.num_kv_heads * self.info.head_dim * 2 * tokens * batch
        return {
            "resident_bytes": sum(layer.resident_bytes() for layer in layers),
            "codebook_bytes": self.scorer.codebook_bytes,
            "rope_table_bytes": shared_rope_table_bytes(self.inv_freq.to(self.index_device), self.rope_scaling),
            "offloaded_bytes": sum(layer.store.nbytes for layer in layers),
            "fetched_bytes": sum(layer.store.fetched_bytes for layer in layers),
            "dense_fp16_bytes": dense,
            "tokens": tokens,
            "batch": batch,
            "mean_selected": self.selected_sum / self.selected_steps if self.selected_steps else 0.0,
            "decode_steps": self.selected_steps // max(1, self.info.num_layers),
            "timings_ms": {stage: 1e3 * self.timings.get(stage, 0.0) for stage in _STAGES},
        }
