"""Store a context's KV once, compressed, in a kvstore, and load it back into ``model.generate``.

::

    cc = ContextCache(client, model_id=..., profile=codec_profile, level="auto", chunk_tokens=256)
    cc.store(model, input_ids)                     # prefill (or pass kv=...), store the chunks the store lacks
    cache, n = cc.load_cache(model, input_ids)     # a transformers Cache for the first n tokens, n <= len - 1
    out = cc.generate(model, input_ids, max_new_tokens=64)   # load the longest prefix, prefill the rest, generate

How it works (``docs/context-loading.md`` has the whole story):

- **Keys.** Each chunk of ``chunk_tokens`` tokens (and the final partial chunk) is named by a SHA-256 prefix chain
  over the token ids, the model id, the codec profile id and the level (:func:`kvrecall.kvstore.chunk_keys`), so
  equal prefixes share keys across processes and machines and every level is its own object.
- **Levels.** A codec level (:data:`kvrecall.encoder.LEVELS`), ``"fp16"`` (raw fp16, no decode work),
  ``"exact"`` (raw, the KV's own dtype: lossless), or ``"auto"``: every chunk is stored at each of
  ``auto_levels`` and the loader picks per chunk a level or recompute (CacheGen's adaptation,
  :class:`kvrecall.controller.Controller`) from the measured bandwidth, decode and prefill throughput
  (:class:`kvrecall.loading_meter.ThroughputMeter`), to minimize time to first token under the quality floor.
- **Loading** (:mod:`kvrecall.loading_pipeline`): one Exists call for every level's keys, then Gets in flight
  while earlier chunks decode on ``decode_workers`` threads, each chunk decoded, rotated to its positions (keys
  are stored before RoPE) and written straight into its slice of the cache tensors; no concatenation afterwards.
- **The one-token rule.** :meth:`load_cache` never covers the whole prompt: at least the last prompt token is left
  for the model, so ``generate`` computes the first new token's logits from it instead of re-feeding the prompt.
- **Failures.** A missing or evicted chunk ends the loaded prefix (the rest is prefilled). If the store is down,
  loading returns nothing with one ``RuntimeWarning`` and storing writes nothing, with one warning.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvrecall import defaults
from kvrecall.controller import RECOMPUTE, Controller, LoadOption
from kvrecall.loading_meter import ThroughputMeter
from kvrecall.loading_pipeline import LOG, ChunkChoice, LoadReport, run_pipeline
from kvrecall.loading_raw import RAW_LEVELS, decode_raw, encode_raw

__all__ = ["ContextCache", "ContextCacheError", "LoadResult", "LoadReport", "StoreResult", "AUTO"]

AUTO = "auto"


class ContextCacheError(ValueError):
    """Invalid arguments to :class:`ContextCache`."""


@dataclass
class StoreResult:
    """What :meth:`ContextCache.store` did.

    Attributes
    ----------
    chunks : int
        Chunks in the context (the final partial chunk included).
    stored : int
        Objects newly written (chunk x level); chunks already present are not re-encoded.
    bytes_written : int
    bytes_by_level : dict
        Bytes written per level.
    encode_s, put_s, prefill_s : float
    error : str
        Why nothing was stored when the store failed (empty otherwise).
    """

    chunks: int
    stored: int
    bytes_written: int
    encode_s: float = 0.0
    put_s: float = 0.0
    prefill_s: float = 0.0
    bytes_by_level: dict[str, int] = field(default_factory=dict)
    error: str = ""


@dataclass
class LoadResult:
    """What :meth:`ContextCache.load` found: ``kv`` covers the first ``tokens`` tokens (None when 0).

    ``kv`` is ``Tensor[layers, 2, kv_heads, tokens, head_dim]`` with keys before RoPE.
    """

    tokens: int
    kv: torch.Tensor | None
    bytes_read: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    report: LoadReport | None = None


def _model_geometry(model) -> tuple[int, int, int, torch.dtype, torch.device]:
    from kvrecall.models import model_info

    info = model_info(model)
    p = next(model.parameters())
    return info.num_layers, info.num_kv_heads, info.head_dim, p.dtype, p.device


def _install_layer(cache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make ``keys``/``values`` (``[1, kv_heads, tokens, head_dim]``) the content of a ``DynamicCache`` layer.

    Uses the cache-layer API (``lazy_initialization`` then the layer's ``keys``/``values``) so the tensors are
    adopted as they are, without the copy ``update`` makes by concatenating onto an empty tensor. Any other layer
    type goes through ``update``.
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is not None and layer < len(layers) and type(layers[layer]) is DynamicLayer:
        target = layers[layer]
        try:
            target.lazy_initialization(keys, values)
        except TypeError:  # transformers releases whose lazy_initialization takes the keys only
            target.lazy_initialization(keys)
        target.keys, target.values = keys, values
    else:
        cache.update(keys, values, layer)


class _CacheSink:
    """Destination of a dense load: per-layer key/value tensors, keys rotated to their positions on arrival."""

    def __init__(self, model, n_tokens: int, chunk_tokens: int) -> None:
        from kvrecall.models import rope_cos_sin

        layers, heads, head_dim, dtype, device = _model_geometry(model)
        self.model, self.n, self.c, self.dtype, self.device = model, n_tokens, chunk_tokens, dtype, device
        self.k = torch.empty(layers, heads, n_tokens, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.cos, self.sin = rope_cos_sin(model, torch.arange(n_tokens, device=device))

    def place(self, i: int, kv: torch.Tensor) -> None:
        from kvrecall.models import apply_rope

        s = i * self.c
        t = min(self.c, self.n - s)
        if t <= 0:
            return
        kv = kv.to(device=self.device, dtype=self.dtype)
        self.k[:, :, s : s + t] = apply_rope(kv[:, 0, :, :t], self.cos[s : s + t], self.sin[s : s + t])
        self.v[:, :, s : s + t] = kv[:, 1, :, :t]

    def finish(self, n_loaded: int):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.k.shape[0]):
            _install_layer(cache, layer, self.k[layer, None, :, :n_loaded], self.v[layer, None, :, :n_loaded])
        return cache


class _TensorSink:
    """Destination of :meth:`ContextCache.load`: one pre-RoPE ``[layers, 2, kv_heads, tokens, head_dim]`` tensor,
    allocated when the first chunk arrives (its shape and dtype come from the stored chunks)."""

    def __init__(self, n_tokens: int, chunk_tokens: int, dtype: torch.dtype | None) -> None:
        self.n, self.c, self.dtype, self.device = n_tokens, chunk_tokens, dtype, "cpu"
        self.kv: torch.Tensor | None = None
        self._lock = threading.Lock()

    def place(self, i: int, kv: torch.Tensor) -> None:
        s = i * self.c
        t = min(self.c, self.n - s)
        with self._lock:
            if self.kv is None:
                layers, _, heads, _, head_dim = kv.shape
                self.kv = torch.empty(layers, 2, heads, self.n, head_dim, dtype=self.dtype or kv.dtype)
        self.kv[:, :, :, s : s + t] = kv[:, :, :, :t]

    def finish(self, n_loaded: int):
        return None if self.kv is None or n_loaded == 0 else self.kv[:, :, :, :n_loaded]


class ContextCache:
    """Chunked, compressed KV of contexts in a kvstore, loaded back as a transformers cache.

    Parameters
    ----------
    client : kvrecall.kvstore.KVStoreClient
        A connected client (or anything with its ``exists``/``get``/``put``, e.g. a
        :class:`kvrecall.kvstore.throttle.ThrottledClient`).
    model_id : str
        Identifies the model weights (e.g. :func:`kvrecall.models.model_fingerprint`).
    profile : kvrecall.encoder.CodecProfile or None
        Codec profile; None uses the codec's profile-free fallback.
    level : str
        A codec level (:data:`kvrecall.encoder.LEVELS`), ``"fp16"``, ``"exact"``, or ``"auto"``.
    chunk_tokens : int
        Tokens per stored chunk; the final partial chunk is stored too.
    auto_levels : tuple of str
        Levels ``"auto"`` stores every chunk at (default :data:`kvrecall.defaults.AUTO_LEVELS`).
    quality : dict, optional
        Measured quality loss per level (e.g. next-token KL against exact KV); levels missing count as 0.
    max_quality_loss : float, optional
        The quality floor: ``"auto"`` never loads a level whose ``quality`` exceeds it.
    meter : ThroughputMeter, optional
        Shared measurements (default: a new meter with the priors of :mod:`kvrecall.defaults`).
    recompute : bool
        Whether ``"auto"`` may choose to recompute chunks instead of loading them.
    fetch_workers, decode_workers : int
        Gets in flight and decode threads during a load.
    """

    def __init__(
        self,
        client,
        model_id: str,
        profile=None,
        level: str = defaults.CODEC_LEVEL,
        chunk_tokens: int = defaults.CHUNK_TOKENS,
        *,
        auto_levels: tuple[str, ...] = defaults.AUTO_LEVELS,
        quality: dict[str, float] | None = None,
        max_quality_loss: float | None = None,
        meter: ThroughputMeter | None = None,
        recompute: bool = True,
        fetch_workers: int = defaults.LOAD_FETCH_WORKERS,
        decode_workers: int = defaults.LOAD_DECODE_WORKERS,
    ) -> None:
        from kvrecall.encoder import LEVELS

        valid = (*LEVELS, *RAW_LEVELS)
        if level != AUTO and level not in valid:
            raise ContextCacheError(f"unknown level {level!r}; choose 'auto' or one of {list(valid)}")
        bad = [lv for lv in auto_levels if lv not in valid]
        if level == AUTO and (bad or not auto_levels):
            raise ContextCacheError(f"auto_levels must be a non-empty subset of {list(valid)}; bad: {bad}")
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ContextCacheError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        if not model_id or not isinstance(model_id, str):
            raise ContextCacheError("model_id must be a non-empty string")
        if fetch_workers < 1 or decode_workers < 1:
            raise ContextCacheError("fetch_workers and decode_workers must be >= 1")
        if max_quality_loss is not None and not max_quality_loss >= 0:
            raise ContextCacheError("max_quality_loss must be >= 0")
        self.client = client
        self.model_id = model_id
        self.profile = profile
        self.level = level
        self.chunk_tokens = chunk_tokens
        self.levels: tuple[str, ...] = tuple(dict.fromkeys(auto_levels)) if level == AUTO else (level,)
        self.quality = dict(quality or {})
        self.max_quality_loss = max_quality_loss
        self.meter = meter if meter is not None else ThroughputMeter()
        self.recompute = recompute
        self.fetch_workers = fetch_workers
        self.decode_workers = decode_workers
        self.last_report: LoadReport | None = None

    # ------------------------------------------------------------------------------------------------ keys
    @property
    def profile_id(self) -> str:
        return self.profile.profile_id if self.profile is not None else "fallback"

    def _ids(self, input_ids) -> torch.Tensor:
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(input_ids)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ContextCacheError(f"input_ids must be integer [tokens] or [1, tokens], got {tuple(ids.shape)} "
                                    f"{ids.dtype}")
        return ids.to("cpu", torch.long)

    def keys(self, input_ids, level: str | None = None) -> list[bytes]:
        """Prefix-chain keys of every chunk of ``input_ids`` at ``level`` (full chunks, then the partial one)."""
        from kvrecall.kvstore import chunk_key, chunk_keys

        level = level or self.levels[0]
        ids = self._ids(input_ids)
        tag = f"{self.profile_id}:{level}"
        keys = chunk_keys(ids, self.model_id, tag, self.chunk_tokens)
        rest = ids[len(keys) * self.chunk_tokens :]
        if rest.numel():
            keys.append(chunk_key(keys[-1] if keys else b"", rest.tolist(), self.model_id, tag))
        return keys

    def _chunk_len(self, i: int, total: int) -> int:
        return min(self.chunk_tokens, total - i * self.chunk_tokens)

    def _warn_store(self, what: str, exc: Exception) -> str:
        msg = f"kvrecall: kvstore unavailable during {what} ({type(exc).__name__}: {exc})"
        warnings.warn(msg + ("; recomputing the prefill" if what == "load" else "; nothing stored"),
                      RuntimeWarning, 3)
        return msg

    # ------------------------------------------------------------------------------------------------ store
    def store(self, model, input_ids, kv: torch.Tensor | None = None) -> StoreResult:
        """Store every chunk of a context (the final partial one included) that the store does not hold yet.

        Parameters
        ----------
        model : transformers model or None
            Prefills ``input_ids`` when ``kv`` is not given and some chunk is missing from the store (the store
            is asked first; the prefill speed is measured for ``"auto"``).
        input_ids : Tensor[tokens] or Tensor[1, tokens]
        kv : Tensor[layers, 2, kv_heads, tokens, head_dim], optional
            The context's KV with keys before RoPE (e.g. :func:`kvrecall.models.prefill_kv`).
        """
        from kvrecall.encoder import encode_many
        from kvrecall.kvstore import KVStoreError

        ids = self._ids(input_ids)
        prefill_s = 0.0
        if kv is None:
            if model is None:
                raise ContextCacheError("store needs a model to prefill with, or kv=")
            if ids.numel() == 0:
                raise ContextCacheError("cannot store an empty context")
        elif kv.ndim != 5 or kv.shape[1] != 2 or kv.shape[3] != ids.numel():
            raise ContextCacheError(
                f"input_ids [{tuple(ids.shape)}] and kv [{tuple(kv.shape)}] disagree on the token count "
                "(kv must be [layers, 2, kv_heads, tokens, head_dim])"
            )
        keys = {lv: self.keys(ids, lv) for lv in self.levels}
        n = len(keys[self.levels[0]])
        if n == 0:
            return StoreResult(0, 0, 0, prefill_s=prefill_s)
        flat = [k for lv in self.levels for k in keys[lv]]
        try:
            present = self.client.exists(flat).present
        except KVStoreError as exc:
            return StoreResult(n, 0, 0, prefill_s=prefill_s, error=self._warn_store("store", exc))
        if all(present):  # nothing to write: no prefill either (keys depend on the token ids only)
            return StoreResult(n, 0, 0, prefill_s=prefill_s)
        if kv is None:
            from kvrecall.models import prefill_kv

            t0 = time.perf_counter()
            kv = prefill_kv(model, ids)
            prefill_s = time.perf_counter() - t0
            self.meter.observe_prefill(ids.numel(), prefill_s)
        c = self.chunk_tokens
        jobs: list[tuple[bytes, bytes, str]] = []
        t0 = time.perf_counter()
        for j, lv in enumerate(self.levels):
            missing = [i for i in range(n) if not present[j * n + i]]
            parts = [kv[:, :, :, i * c : (i + 1) * c] for i in missing]
            if lv in RAW_LEVELS:
                blobs = [encode_raw(p, lv) for p in parts]
            else:
                blobs = encode_many(parts, self.profile, lv) if parts else []
            jobs += [(keys[lv][i], b, lv) for i, b in zip(missing, blobs)]
        t1 = time.perf_counter()
        try:
            with ThreadPoolExecutor(self.fetch_workers, thread_name_prefix="kvrecall-put") as pool:
                list(pool.map(lambda job: self.client.put(job[0], job[1]), jobs))
        except KVStoreError as exc:
            return StoreResult(n, 0, 0, t1 - t0, prefill_s=prefill_s, error=self._warn_store("store", exc))
        by_level: dict[str, int] = {}
        for _, b, lv in jobs:
            by_level[lv] = by_level.get(lv, 0) + len(b)
        return StoreResult(n, len(jobs), sum(by_level.values()), t1 - t0, time.perf_counter() - t1, prefill_s,
                           by_level)

    # ------------------------------------------------------------------------------------------------ load
    def _decider(self, present, sizes, n_target: int, fp16_per_token: int):
        """``decide(i)`` for the pipeline: the fixed level, or the controller's per-chunk choice."""
        def fixed(i: int) -> ChunkChoice:
            return ChunkChoice(i, self.levels[0], math.nan, self.meter.bandwidth_Bps)

        if self.level != AUTO:
            return fixed

        def auto(i: int) -> ChunkChoice:
            chunk_tokens_stored = min(self.chunk_tokens, sizes["_tokens"] - i * self.chunk_tokens)
            options = []
            for j, lv in enumerate(self.levels):
                if not present[j][i]:
                    continue
                prior = defaults.LOAD_PRIOR_RAW_DECODE_BPS if lv in RAW_LEVELS else None
                per_s = (self.meter.decode_Bps(lv, prior) * self.decode_workers / fp16_per_token
                         if fp16_per_token else math.inf)
                options.append(LoadOption(lv, sizes[lv][i] / chunk_tokens_stored, per_s, self.quality.get(lv, 0.0)))
            remaining = n_target - i * self.chunk_tokens
            prefill = self.meter.prefill.value if self.recompute else 0.0
            allowed = [o for o in options if self.max_quality_loss is None or o.quality_loss <= self.max_quality_loss]
            if not allowed:
                return ChunkChoice(i, RECOMPUTE, remaining / prefill if prefill else math.inf,
                                   self.meter.bandwidth_Bps)
            ctl = Controller(allowed, prefill, None, self.chunk_tokens)
            d = ctl.choose(remaining, self.meter.bandwidth_Bps)
            return ChunkChoice(i, d.choice, d.estimated_s, self.meter.bandwidth_Bps, dict(d.estimates))

        return auto

    def _fp16_bytes_per_token(self, keys: torch.Tensor | None) -> int:
        """fp16 bytes of one token's KV (all layers and heads): from the destination, else from the profile."""
        if keys is not None:
            return keys.shape[0] * 2 * keys.shape[1] * keys.shape[3] * 2
        if self.profile is not None:
            return self.profile.num_layers * 2 * self.profile.num_kv_heads * self.profile.head_dim * 2
        return 0  # unknown (tensor load without a profile): decode speed is then not modelled

    @staticmethod
    def _fp16_of(sink) -> int:
        kv = getattr(sink, "kv", None)
        return 0 if kv is None else kv.shape[0] * 2 * kv.shape[2] * kv.shape[4] * 2

    def _load_into(self, input_ids, n_max: int, make_sink) -> tuple[object, LoadReport]:
        """Exists, then the pipeline into ``make_sink(n_tokens)``; returns ``(sink.finish(n), report)``."""
        from kvrecall.encoder import decode
        from kvrecall.kvstore import KVStoreError

        ids = self._ids(input_ids)
        report = LoadReport()
        self.last_report = report
        keys = {lv: self.keys(ids, lv) for lv in self.levels}
        n_chunks = len(keys[self.levels[0]])
        if n_chunks == 0 or n_max <= 0:
            return None, report
        flat = [k for lv in self.levels for k in keys[lv]]
        t0 = time.perf_counter()
        try:
            info = self.client.exists(flat)
        except KVStoreError as exc:
            report.error = self._warn_store("load", exc)
            report.timings["exists_s"] = time.perf_counter() - t0
            return None, report
        report.timings["exists_s"] = time.perf_counter() - t0
        present = [info.present[j * n_chunks : (j + 1) * n_chunks] for j in range(len(self.levels))]
        sizes = {lv: info.sizes[j * n_chunks : (j + 1) * n_chunks] for j, lv in enumerate(self.levels)}
        sizes["_tokens"] = ids.numel()
        stored = 0
        while stored < n_chunks and any(p[stored] for p in present):
            stored += 1
        report.stored_tokens = min(stored * self.chunk_tokens, ids.numel())
        n_target = min(report.stored_tokens, n_max)
        if n_target <= 0:
            return None, report
        want = -(-n_target // self.chunk_tokens)
        sink = make_sink(n_target)
        fp16_per_token = self._fp16_bytes_per_token(getattr(sink, "k", None))
        device = getattr(sink, "device", "cpu")
        dtype = getattr(sink, "dtype", None)
        profile = self.profile

        def fetch(i: int, level: str):
            return self.client.get(keys[level][i])

        def decode_chunk(i: int, level: str, data) -> torch.Tensor:
            if level in RAW_LEVELS:
                return decode_raw(data, device=device, dtype=dtype)
            return decode(data, profile, device=device, dtype=dtype)

        decide = self._decider(present, sizes, n_target, fp16_per_token)
        t1 = time.perf_counter()
        try:
            loaded, choices, nbytes, timings = run_pipeline(
                want, decide, fetch, decode_chunk, sink.place,
                lambda i: self._chunk_len(i, ids.numel()) * (fp16_per_token or self._fp16_of(sink)), self.meter,
                self.fetch_workers, self.decode_workers,
            )  # fmt: skip
        except KVStoreError as exc:
            report.error = self._warn_store("load", exc)
            report.timings["load_s"] = time.perf_counter() - t1
            return None, report
        report.timings.update(timings)
        report.timings["load_s"] = time.perf_counter() - t1
        report.choices, report.bytes_read = choices, nbytes
        report.tokens = min(loaded * self.chunk_tokens, n_target)
        if choices and self.level == AUTO:
            report.expected_s = choices[0].estimated_s
        LOG.info(
            "loaded %d of %d stored tokens (%s) in %.1f ms, expected %.1f ms; %s", report.tokens,
            report.stored_tokens, report.levels or "nothing", 1e3 * report.actual_s, 1e3 * report.expected_s,
            "; ".join(f"chunk {c.index}: {c.choice} (est {1e3 * c.estimated_s:.1f} ms at "
                      f"{c.bandwidth_Bps / 1e9:.2f} GB/s)" for c in choices),
        )  # fmt: skip
        return (sink.finish(report.tokens) if report.tokens else None), report

    def load(self, input_ids, dtype: torch.dtype | None = None) -> LoadResult:
        """Fetch and decode the longest stored prefix of ``input_ids`` as a tensor (keys before RoPE).

        Returns
        -------
        LoadResult
            ``kv`` is ``Tensor[layers, 2, kv_heads, tokens, head_dim]`` for the stored ``tokens`` (in the stored
            dtype unless ``dtype`` is given), or None when nothing is stored.
        """
        ids = self._ids(input_ids)
        kv, report = self._load_into(ids, ids.numel(), lambda n: _TensorSink(n, self.chunk_tokens, dtype))
        return LoadResult(report.tokens if kv is not None else 0, kv, report.bytes_read, dict(report.timings), report)

    def load_cache(self, model, input_ids):
        """A transformers cache holding the longest stored prefix of ``input_ids``, at most ``len - 1`` tokens.

        Parameters
        ----------
        input_ids : Tensor[tokens] or Tensor[1, tokens]

        Returns
        -------
        (cache, n)
            A ``DynamicCache`` on the model's device and dtype for the first ``n`` tokens (keys rotated at their
            positions), or ``(None, 0)`` when nothing is stored. ``n <= tokens - 1`` always: the model gets at
            least the last prompt token. :attr:`last_report` tells how the load went.
        """
        ids = self._ids(input_ids)
        cache, report = self._load_into(ids, ids.numel() - 1,
                                        lambda n: _CacheSink(model, n, self.chunk_tokens))
        return (None, 0) if cache is None else (cache, report.tokens)

    def prefill_cache(self, model, input_ids):
        """Load the longest stored prefix, then prefill the rest of the prompt but its last token.

        Returns
        -------
        (cache, report)
            A ``DynamicCache`` of ``tokens - 1`` tokens and the :class:`LoadReport` (``timings["prefill_s"]``
            added). The prefill speed is fed to the meter.
        """
        from transformers import DynamicCache

        from kvrecall.models import cache_kwargs

        ids = self._ids(input_ids)
        if ids.numel() == 0:
            raise ContextCacheError("input_ids is empty")
        cache, n = self.load_cache(model, ids)
        report = self.last_report
        if cache is None:
            cache = DynamicCache(config=model.config)
        rest = ids[n : ids.numel() - 1]
        t0 = time.perf_counter()
        if rest.numel():
            device = next(model.parameters()).device
            with torch.no_grad():
                model(rest[None].to(device), use_cache=True, **cache_kwargs(model, cache))
            self.meter.observe_prefill(rest.numel(), time.perf_counter() - t0)
        report.timings["prefill_s"] = time.perf_counter() - t0
        return cache, report

    def generate(self, model, input_ids, max_new_tokens: int = 64, **generate_kwargs) -> torch.Tensor:
        """Load the longest stored prefix, prefill the rest, and ``model.generate`` from there.

        Parameters
        ----------
        input_ids : Tensor[tokens] or Tensor[1, tokens]
        max_new_tokens : int
        **generate_kwargs
            Passed to ``model.generate``; greedy (``do_sample=False``) unless given.

        Returns
        -------
        Tensor[1, tokens + new_tokens]
            Prompt and generated ids, as ``model.generate`` returns them.
        """
        from kvrecall.models import cache_kwargs

        ids = self._ids(input_ids)
        cache, _ = self.prefill_cache(model, ids)
        device = next(model.parameters()).device
        prompt = ids[None].to(device)
        generate_kwargs.setdefault("do_sample", False)
        if generate_kwargs["do_sample"] is False:
            generate_kwargs.setdefault("temperature", None)
            generate_kwargs.setdefault("top_p", None)
            generate_kwargs.setdefault("top_k", None)
        gc = getattr(model, "generation_config", None)
        if gc is not None and gc.pad_token_id is None and "pad_token_id" not in generate_kwargs:
            eos = gc.eos_token_id
            generate_kwargs["pad_token_id"] = eos[0] if isinstance(eos, (list, tuple)) else eos
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                  **cache_kwargs(model, cache), **generate_kwargs)

    def load_retrieval_cache(self, model, input_ids, retriever_profile, budget: float = defaults.RETRIEVAL_BUDGET,
                             **retrieval_kwargs):
        """The same stored chunks, decoded into a :class:`kvrecall.retrieval_cache.RetrievalCache` (no dense cache).

        The longest stored prefix (at most ``len - 1`` tokens, the one-token rule) is decoded on the host into
        pre-RoPE KV and handed to ``RetrievalCache.from_kv``, which keeps sinks, window and key codes resident and
        moves every other row to its offload store. Continue with
        ``model.generate(input_ids, **cache_kwargs(model, rcache))``; uncached tokens are prefilled through it.

        Parameters
        ----------
        retriever_profile : kvrecall.retriever.RetrieverProfile
        budget : float or int
            Top-k per query head (fraction of the context, or tokens).
        **retrieval_kwargs
            ``sinks``, ``window``, ``offload``, ... of :class:`~kvrecall.retrieval_cache.RetrievalCache`.

        Returns
        -------
        RetrievalCache
            Holding :attr:`last_report`'s ``tokens`` tokens (empty when nothing is stored).
        """
        from kvrecall.retrieval_cache import RetrievalCache

        ids = self._ids(input_ids)
        dtype = next(model.parameters()).dtype
        kv, report = self._load_into(ids, ids.numel() - 1, lambda n: _TensorSink(n, self.chunk_tokens, dtype))
        if kv is None:
            return RetrievalCache(model, retriever_profile, budget, **retrieval_kwargs)
        return RetrievalCache.from_kv(model, retriever_profile, kv, budget=budget, **retrieval_kwargs)
