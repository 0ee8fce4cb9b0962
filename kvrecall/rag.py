"""Long-context RAG whose documents' KV is computed once, stored compressed, and loaded instead of prefilled.

::

    rag = RagPipeline(model, store=client, embedder="all-MiniLM-L6-v2", mode="exact-prefix")
    rag.add_documents(texts)                 # embed (FAISS inner product), store each document's KV once
    answer = rag.answer(question, k=3, max_new_tokens=32)   # str; rag.last holds ids, sources, timings

Prompts are ``head + (doc + sep) * k + tail`` at the token level (:class:`~kvrecall.rag_prompt.PromptLayout`);
the retrieved documents are placed in a fixed order (ascending document id), so the same set of documents always
gives the same prefix. Modes:

``"exact-prefix"`` (default)
    Reuse only KV that a full prefill would compute bit for bit: the longest stored token prefix of
    ``head + docs`` (ContextCache prefix-chain chunks; each document's ``head + doc`` is stored at
    :meth:`RagPipeline.add_documents`, and every answered prefix is stored after the answer, so a repeated
    document set is loaded whole). The rest of the prompt is prefilled. With a lossless level (``"exact"``, the
    default) the answer's greedy tokens equal a full prefill's.
``"independent"``
    Every document's own KV (prefilled after ``head`` alone), its pre-RoPE keys re-positioned to where the
    document sits in the prompt; only the question is prefilled. Documents after the first never attended to the
    documents before them (CacheBlend's observation), so answers can differ from a full prefill; ``recompute``
    (a fraction) re-runs that share of those documents' tokens over the assembled cache (CacheBlend-style
    selective recompute: the first tokens of each later document, which lost the most context).
``"full"``
    The baseline: prefill the whole prompt, no reuse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kvrecall import defaults
from kvrecall.embedder import Embedder
from kvrecall.rag_decode import cache_at_positions, eos_ids, greedy_generate
from kvrecall.rag_prompt import PromptLayout

__all__ = ["RagPipeline", "RagError", "RagAnswer", "MODES"]

MODES = ("exact-prefix", "independent", "full")
RAG_LEVEL = defaults.RAG_LEVEL
"""Level of stored document KV (lossless, so exact-prefix answers equal full prefill); proposed for defaults.py."""


class RagError(ValueError):
    """Bad arguments to :class:`RagPipeline` (mode, k, empty corpus, question type, ...)."""


@dataclass
class RagAnswer:
    """What :meth:`RagPipeline.answer` did.

    Attributes
    ----------
    text : str
        The decoded answer.
    ids : list[int]
        Its token ids (greedy).
    sources : list[int]
        Document ids used, in prompt order; ``scores`` their embedding similarity (same order).
    prompt_ids : Tensor[n]
    reused_tokens : int
        Prompt tokens whose KV was loaded instead of computed.
    recomputed_tokens : int
        Loaded tokens recomputed (``independent`` with ``recompute``).
    timings : dict
        ``retrieve_s``, ``load_s``, ``recompute_s``, ``prefill_s`` (prompt forward to the first token),
        ``ttft_s`` (from the call to the first token), ``total_s``, ``store_s`` (storing the prefix afterwards,
        not part of TTFT).
    """

    text: str
    ids: list[int]
    sources: list[int]
    scores: list[float]
    mode: str
    prompt_ids: torch.Tensor = field(repr=False)
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def _default_model_id(model) -> str:
    from kvrecall.models import model_fingerprint

    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        return model_fingerprint(name)
    except Exception:  # not a folder we can fingerprint: fall back to the config's identity
        return f"{type(model).__name__}:{name}"


class RagPipeline:
    """Retrieve documents with a sentence embedder and answer from their cached KV (see the module docstring).

    Parameters
    ----------
    model : a Llama-family transformers causal LM.
    store : kvrecall.kvstore.KVStoreClient (or anything :class:`~kvrecall.context_cache.ContextCache` takes).
    embedder : str, Path or Embedder
        A folder, the name ``"all-MiniLM-L6-v2"``, or a loaded :class:`~kvrecall.embedder.Embedder`.
    mode : one of :data:`MODES`.
    tokenizer : the model's tokenizer (default: loaded from ``model.name_or_path``, offline).
    codec_profile : kvrecall.encoder.CodecProfile or None
    level : level of stored KV (``"exact"``, ``"fp16"`` or a codec level).
    model_id : identifies the weights in store keys (default: :func:`kvrecall.models.model_fingerprint`).
    recompute : float in [0, 1)
        ``independent`` only: fraction of the tokens of every document after the first to recompute.
    chunk_tokens : ContextCache chunk size (prefix reuse granularity).
    """

    def __init__(self, model, store, embedder="all-MiniLM-L6-v2", mode: str = "exact-prefix", *, tokenizer=None,
                 codec_profile=None, level: str = RAG_LEVEL, model_id: str | None = None, recompute: float = 0.0,
                 chunk_tokens: int = defaults.CHUNK_TOKENS) -> None:
        from kvrecall.context_cache import ContextCache

        if mode not in MODES:
            raise RagError(f"mode must be one of {MODES}, got {mode!r}")
        if store is None:
            raise RagError("RagPipeline needs a kvstore client (store=KVStoreClient(address))")
        if not 0.0 <= float(recompute) < 1.0:
            raise RagError(f"recompute must be a fraction in [0, 1), got {recompute!r}")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.recompute = float(recompute)
        self.embedder = embedder if isinstance(embedder, Embedder) else Embedder(embedder)
        self.layout = PromptLayout(tokenizer)
        self.cache = ContextCache(store, model_id=model_id or _default_model_id(model), profile=codec_profile,
                                  level=level, chunk_tokens=chunk_tokens)
        import faiss

        self.index = faiss.IndexFlatIP(self.embedder.dim)
        self.documents: list[str] = []
        self.doc_ids: list[torch.Tensor] = []
        self.vector_owner: list[int] = []  # FAISS row -> document id (long documents have several windows)
        self.stop_ids = eos_ids(model, tokenizer)
        self.last: RagAnswer | None = None

    # ------------------------------------------------------------------------------------------ corpus
    def add_documents(self, texts: list[str], precompute: bool = True) -> list[int]:
        """Embed ``texts``, add them to the FAISS index and store each one's ``head + doc`` KV once.

        With ``precompute=False`` a document's KV is computed and stored the first time an answer uses it.

        Returns
        -------
        list[int]
            The new documents' ids.
        """
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise RagError("texts must be a non-empty list of non-empty strings")
        first = len(self.documents)
        pieces, owners = [], []
        for j, text in enumerate(texts):  # every window of a long document is indexed, owned by the document
            for piece in self.embedder.windows(text):
                pieces.append(piece)
                owners.append(first + j)
        vectors = self.embedder.embed(pieces)
        for text in texts:
            ids = self.layout.document_ids(text)
            self.documents.append(text)
            self.doc_ids.append(ids)
            unit = torch.cat([self.layout.head_ids, ids])
            if precompute and not self._stored(unit):  # never prefill a document whose KV is already in the store
                self.cache.store(self.model, unit)
        self.index.add(np.ascontiguousarray(vectors))
        self.vector_owner.extend(owners)
        return list(range(first, len(self.documents)))

    def ensure_stored(self, doc_ids: list[int]) -> int:
        """Store the ``head + doc`` KV of the given documents if the store lacks it; returns how many were computed."""
        computed = 0
        for d in doc_ids:
            unit = torch.cat([self.layout.head_ids, self.doc_ids[d]])
            if not self._stored(unit):
                self.cache.store(self.model, unit)
                computed += 1
        return computed

    def _stored(self, ids: torch.Tensor) -> bool:
        from kvrecall.kvstore import KVStoreError

        try:
            return all(self.cache.client.exists(self.cache.keys(ids)).present)
        except KVStoreError:
            return False

    def retrieve(self, question: str, k: int) -> tuple[list[int], list[float]]:
        """Top-``k`` document ids by cosine similarity of their best window (best first) and their scores."""
        if not isinstance(question, str) or not question.strip():
            raise RagError("question must be a non-empty string")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RagError(f"k must be a positive int, got {k!r}")
        if not self.documents:
            raise RagError("no documents: call add_documents first")
        k = min(k, len(self.documents))
        want = k
        while True:  # a document's best window counts; search deeper until k distinct documents are found
            scores, idx = self.index.search(self.embedder.embed([question]), min(self.index.ntotal, 4 * want))
            docs: dict[int, float] = {}
            for s, i in zip(scores[0], idx[0]):
                if i >= 0:
                    docs.setdefault(self.vector_owner[int(i)], float(s))
            if len(docs) >= k or 4 * want >= self.index.ntotal:
                best = list(docs.items())[:k]
                return [d for d, _ in best], [s for _, s in best]
            want *= 4

    # ------------------------------------------------------------------------------------------ answering
    def answer(self, question: str, k: int = 3, max_new_tokens: int = 32, *, sources: list[int] | None = None,
               mode: str | None = None) -> str:
        """Answer ``question`` from its top-``k`` documents; details in :attr:`last`.

        ``sources`` (document ids) skips retrieval; ``mode`` overrides the pipeline's mode for this call (to
        compare modes on one corpus).
        """
        t0 = time.perf_counter()
        mode = self.mode if mode is None else mode
        if mode not in MODES:
            raise RagError(f"mode must be one of {MODES}, got {mode!r}")
        if sources is None:
            found, sims = self.retrieve(question, k)
        else:
            if not sources or any(not 0 <= int(s) < len(self.documents) for s in sources):
                raise RagError(f"sources must be document ids in [0, {len(self.documents)})")
            found, sims = [int(s) for s in sources], [float("nan")] * len(sources)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise RagError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        order = sorted(range(len(found)), key=lambda i: found[i])  # fixed document order: ascending id
        used, used_scores = [found[i] for i in order], [sims[i] for i in order]
        timings = {"retrieve_s": time.perf_counter() - t0}
        prefix = torch.cat([self.layout.head_ids, *(self.doc_ids[d] for d in used)])
        prompt = torch.cat([prefix, self.layout.tail_ids(question)])
        t1 = time.perf_counter()
        reused, recomputed, kv_prefix = 0, 0, None
        if mode == "full":
            cache, start = None, 0
        elif mode == "exact-prefix":
            loaded = self.cache.load(prefix)
            reused = loaded.tokens
            cache = cache_at_positions(self.model, loaded.kv, torch.arange(reused)) if reused else None
            start, kv_prefix = reused, loaded.kv
        else:
            kv = self._independent_kv(used)
            reused = kv.shape[3]
            timings["load_s"] = time.perf_counter() - t1
            cache = cache_at_positions(self.model, kv, torch.arange(reused))
            if self.recompute > 0 and len(used) > 1:
                t2 = time.perf_counter()
                cache, recomputed = self._recompute(cache, kv, prefix, used)
                timings["recompute_s"] = time.perf_counter() - t2
            start = reused
        timings.setdefault("load_s", time.perf_counter() - t1)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        capture = mode == "exact-prefix" and reused < prefix.numel()
        res = greedy_generate(self.model, cache, prompt[start:], start, max_new_tokens, self.stop_ids,
                              capture=capture)
        timings["prefill_s"] = res.first_token_s
        timings["ttft_s"] = time.perf_counter() - t0 - (res.total_s - res.first_token_s)
        timings["total_s"] = time.perf_counter() - t0
        if capture:  # store the whole prefix so the same documents are loaded whole next time
            t3 = time.perf_counter()
            rest = res.kv[:, :, :, : prefix.numel() - reused]
            full = rest if kv_prefix is None else torch.cat([kv_prefix.to(rest.dtype), rest], dim=3)
            self.cache.store(None, prefix, kv=full)
            timings["store_s"] = time.perf_counter() - t3
        text = self.tokenizer.decode([t for t in res.tokens if t not in self.stop_ids], skip_special_tokens=True)
        self.last = RagAnswer(text, res.tokens, used, used_scores, mode, prompt, reused, recomputed, timings)
        return text

    # ------------------------------------------------------------------------------------------ independent
    def _document_kv(self, doc: int) -> torch.Tensor:
        """Pre-RoPE KV of ``head + doc`` (loaded; prefilled and stored again if the store lost it)."""
        from kvrecall.models import prefill_kv

        ids = torch.cat([self.layout.head_ids, self.doc_ids[doc]])
        loaded = self.cache.load(ids)
        if loaded.tokens == ids.numel():
            return loaded.kv
        kv = prefill_kv(self.model, ids)
        self.cache.store(None, ids, kv=kv)
        return kv

    def _independent_kv(self, used: list[int]) -> torch.Tensor:
        """``head`` KV then each document's own KV: ``[layers, 2, kv_heads, prefix, head_dim]`` (pre-RoPE)."""
        h = self.layout.head_ids.numel()
        parts = []
        for j, doc in enumerate(used):
            kv = self._document_kv(doc)
            parts.append(kv if j == 0 else kv[:, :, :, h:])
        dtype = next(self.model.parameters()).dtype
        return torch.cat([p.to(dtype) for p in parts], dim=3)

    @torch.no_grad()
    def _recompute(self, cache, kv: torch.Tensor, prefix: torch.Tensor, used: list[int]):
        """Recompute the first ``recompute`` share of every later document's tokens over the assembled cache.

        The chosen tokens run through the model as new queries at their own positions, attending to every cached
        token before them (their own stale entries masked out) and to each other causally; their fresh K/V then
        replace the stale entries, layer by layer as CacheBlend does. Returns ``(new cache, tokens recomputed)``.
        """
        from kvrecall.models import cache_kwargs
        from kvrecall.rag_decode import capture_kv

        h = self.layout.head_ids.numel()
        chosen, start = [], h + self.doc_ids[used[0]].numel()
        for doc in used[1:]:
            n = self.doc_ids[doc].numel()
            chosen.extend(range(start, start + max(1, int(round(self.recompute * n)))))
            start += n
        sel = torch.tensor(chosen, dtype=torch.long)
        total = kv.shape[3]
        device = next(self.model.parameters()).device
        old = torch.arange(total)
        allow_old = old[None, :] < sel[:, None]  # [S, total]: cached tokens strictly before
        stale = torch.zeros(total, dtype=torch.bool)
        stale[sel] = True
        allow_old &= ~stale[None, :]
        allow_new = sel[None, :] <= sel[:, None]  # causal among the chosen
        mask = torch.cat([allow_old, allow_new], dim=1)[None, None].to(device)  # [1, 1, S, total + S]
        with capture_kv(self.model) as grab:
            self.model(prefix[sel][None].to(device), position_ids=sel[None].to(device), attention_mask=mask,
                       use_cache=True, **cache_kwargs(self.model, cache))
        fresh = grab.kv().to(kv.dtype)  # [L, 2, H, S, D] pre-RoPE
        kv = kv.clone()
        kv[:, :, :, sel] = fresh
        return cache_at_positions(self.model, kv, torch.arange(total)), int(sel.numel())
