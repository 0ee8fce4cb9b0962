"""The main job (``kvrecall demo``): one long context, stored once, answered three ways.

An embedded kvstore server runs on loopback with a temporary directory. A long book text gets a five-digit passcode
planted in its middle (:mod:`kvrecall.passcode`), and the model is asked for it:

1. **request 1** prefills the prompt, stores its KV chunks (compressed) and answers;
2. **request 2**, as another process would (a new client and a new :class:`~kvrecall.context_cache.ContextCache`,
   nothing shared in memory but the store), loads the chunks and answers;
3. **request 3** loads the same chunks into a :class:`~kvrecall.retrieval_cache.RetrievalCache` (top 3% + sinks +
   window per decode step) and answers.

One table: bytes stored vs fp16, time to first token of loading vs recompute, the three answers and whether they
are right, resident bytes, and next-token KL of requests 2 and 3 against request 1.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvrecall import defaults

__all__ = ["DemoConfig", "DemoError", "run_demo"]


class DemoError(ValueError):
    """The demo cannot run with the given model or texts."""


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the CLI's flags)."""

    model: str | Path = "smollm2-135m"
    texts: Path = Path("../shared/data/texts")
    context_tokens: int = 2048
    depth: float = 0.5
    passcode: str = "48213"
    level: str = defaults.CODEC_LEVEL
    chunk_tokens: int = defaults.CHUNK_TOKENS
    budget: float = defaults.RETRIEVAL_BUDGET
    calib_tokens: int = 1024
    retriever_bits: int = 8
    progress: bool = True
    seed: int = 0


class _FirstTokenClock:
    """A logits processor that records when ``generate`` has the first new token's logits (TTFT) and keeps them."""

    def __init__(self) -> None:
        self.t_first: float | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.logits = scores[0].detach().float().clone()
        return scores


def _answer(model, tok, ids: torch.Tensor, cache, max_new: int, t0: float):
    """Greedy answer from ``cache``; returns ``(text, ttft_s, first_logits)`` with TTFT measured from ``t0``."""
    from transformers import LogitsProcessorList

    from kvrecall.models import cache_kwargs

    clock = _FirstTokenClock()
    kwargs = cache_kwargs(model, cache) if cache is not None else {}
    gc = model.generation_config
    pad = gc.pad_token_id if gc.pad_token_id is not None else (gc.eos_token_id[0] if isinstance(
        gc.eos_token_id, (list, tuple)) else gc.eos_token_id)
    with torch.no_grad():
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=max_new,
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                             logits_processor=LogitsProcessorList([clock]), **kwargs)
    text = tok.decode(out[0, ids.numel():], skip_special_tokens=True).strip()
    return text, clock.t_first - t0, clock.logits


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    r, g = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    return float((r.exp() * (r - g)).sum())


def _bar(cfg: DemoConfig, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not cfg.progress, leave=False)


def _check(cfg: DemoConfig) -> None:
    """Reject bad settings before the (slow) model load and calibrations."""
    from kvrecall.context_cache import AUTO
    from kvrecall.encoder import LEVELS
    from kvrecall.loading_raw import RAW_LEVELS

    if cfg.level != AUTO and cfg.level not in (*LEVELS, *RAW_LEVELS):
        raise DemoError(f"unknown --level {cfg.level!r}; choose auto or one of {', '.join((*LEVELS, *RAW_LEVELS))}")
    if cfg.context_tokens < 64:
        raise DemoError(f"--tokens must be >= 64, got {cfg.context_tokens}")
    if cfg.chunk_tokens < 1:
        raise DemoError(f"--chunk-tokens must be >= 1, got {cfg.chunk_tokens}")
    if not 0 < cfg.budget <= 1 and not (cfg.budget > 1 and float(cfg.budget).is_integer()):
        raise DemoError(f"--budget must be a fraction in (0, 1] or a whole token count, got {cfg.budget}")
    if not Path(cfg.texts).is_dir():
        raise DemoError(f"text folder not found: {cfg.texts}")


def run_demo(cfg: DemoConfig) -> dict:
    """Run the three requests and print the table; returns the figures as a dict."""
    from kvrecall.context_cache import ContextCache
    from kvrecall.encoder import CodecProfile
    from kvrecall.kvstore import BackgroundServer, KVStoreClient, ServerConfig
    from kvrecall.models import (
        capture_qkv, kv_to_cache, load_model, long_token_ids, model_fingerprint, read_texts, resolve_model,
    )
    from kvrecall.passcode import ANSWER_TOKENS, make_case
    from kvrecall.retriever import calibrate

    _check(cfg)
    resolve_model(cfg.model)  # an unusable model is reported before any progress bar starts (converts it once)
    torch.manual_seed(cfg.seed)
    with _bar(cfg, 4, "setup: model, codec profile, retriever profile, prompt") as bar:
        t0 = time.perf_counter()
        model, tok = load_model(cfg.model)
        model_id = model_fingerprint(cfg.model)
        load_s = time.perf_counter() - t0
        bar.update()
        texts = read_texts(cfg.texts, min_chars=20_000)
        if len(texts) < 2:
            raise DemoError(f"need at least two texts of 20,000+ characters under {cfg.texts}")
        # The context comes from the longest text; the profiles are calibrated on the others.
        texts.sort(key=lambda t: len(t[1]), reverse=True)
        (name, text), others = texts[0], texts[1:]
        calib = capture_qkv(model, long_token_ids(tok, others, cfg.calib_tokens))
        codec = CodecProfile.calibrate([calib.kv()], model_id, query_samples=[calib.q])
        bar.update()
        retr_ids = long_token_ids(tok, others[::-1], max(cfg.calib_tokens, min(40 << cfg.retriever_bits, 4096)))
        retriever = calibrate(model, retr_ids, model_id=model_id, bits=cfg.retriever_bits, niter=5,
                              chunk=min(cfg.calib_tokens, 1024), progress=False)
        bar.update()
        case = make_case(tok, text, cfg.context_tokens, cfg.depth, cfg.passcode, name, offset_chars=len(text) // 3)
        ids = case.input_ids
        bar.update()
    out: dict = {"model": str(cfg.model), "model_load_s": load_s, "context": name, "prompt_tokens": ids.numel(),
                 "passcode": case.passcode}
    with tempfile.TemporaryDirectory(prefix="kvrecall-demo-") as disk, BackgroundServer(
        ServerConfig(host="127.0.0.1", port=0, disk_dir=disk, ram_bytes=512 << 20, disk_bytes=2 << 30)
    ) as server:
        with _bar(cfg, 3, "requests") as bar:
            # Request 1: prefill, store, answer.
            with KVStoreClient(server.target) as c1:
                cc1 = ContextCache(c1, model_id, codec, cfg.level, cfg.chunk_tokens)
                t0 = time.perf_counter()
                kv = capture_qkv(model, ids).kv()
                prefill_s = time.perf_counter() - t0
                a1, ttft1, logits1 = _answer(model, tok, ids, kv_to_cache(model, kv[:, :, :, :-1]), ANSWER_TOKENS,
                                             t0)
                stored = cc1.store(None, ids, kv=kv)
            bar.update()
            # Request 2: a new client and cache object, nothing shared in memory but the store.
            with KVStoreClient(server.target) as c2:
                cc2 = ContextCache(c2, model_id, codec, cfg.level, cfg.chunk_tokens)
                t0 = time.perf_counter()
                cache, _ = cc2.prefill_cache(model, ids)
                a2, ttft2, logits2 = _answer(model, tok, ids, cache, ANSWER_TOKENS, t0)
                report2 = cc2.last_report
                dense_bytes = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 2
            bar.update()
            # Request 3: the same chunks into a RetrievalCache.
            with KVStoreClient(server.target) as c3:
                cc3 = ContextCache(c3, model_id, codec, cfg.level, cfg.chunk_tokens)
                t0 = time.perf_counter()
                rcache = cc3.load_retrieval_cache(model, ids, retriever, budget=cfg.budget)
                try:
                    a3, ttft3, logits3 = _answer(model, tok, ids, rcache, ANSWER_TOKENS, t0)
                    stats = rcache.stats()
                finally:
                    rcache.restore_attention()
            bar.update()
    fp16_bytes = kv.numel() * 2
    right = [case.is_correct(a) for a in (a1, a2, a3)]
    out.update({
        "bytes_stored": stored.bytes_written, "fp16_bytes": fp16_bytes, "chunks": stored.chunks,
        "level": cfg.level, "ttft_recompute_s": ttft1, "ttft_load_s": ttft2, "ttft_retrieval_s": ttft3,
        "prefill_s": prefill_s, "load_breakdown": dict(report2.timings), "tokens_loaded": report2.tokens,
        "answers": {"recompute": a1, "loaded": a2, "retrieval": a3},
        "correct": {"recompute": right[0], "loaded": right[1], "retrieval": right[2]},
        "kl_loaded": _kl(logits1, logits2), "kl_retrieval": _kl(logits1, logits3),
        "resident_bytes": {"dense_fp16": dense_bytes, "retrieval": int(stats.get("resident_bytes", 0))},
    })
    _print_table(out, cfg)
    return out


def _print_table(r: dict, cfg: DemoConfig) -> None:
    mark = {True: "right", False: "wrong"}
    rows = [
        ("model", f"{r['model']} (loaded in {r['model_load_s']:.1f} s)"),
        ("context", f"{r['context']}: {r['prompt_tokens']} prompt tokens, passcode {r['passcode']} planted at "
                    f"depth {cfg.depth:.0%}"),
        ("bytes stored vs fp16", f"{r['bytes_stored']:,} B at level {r['level']!r} vs {r['fp16_bytes']:,} B fp16 "
                                 f"({r['fp16_bytes'] / max(r['bytes_stored'], 1):.1f}x smaller, {r['chunks']} chunks)"),
        ("TTFT recompute (req 1)", f"{r['ttft_recompute_s']:.2f} s"),
        ("TTFT load (req 2)", f"{r['ttft_load_s']:.2f} s ({r['ttft_recompute_s'] / r['ttft_load_s']:.1f}x faster; "
                              + ", ".join(f"{k[:-2]} {1e3 * v:.0f} ms" for k, v in r["load_breakdown"].items())
                              + f"; {r['tokens_loaded']} tokens loaded)"),
        ("TTFT retrieval (req 3)", f"{r['ttft_retrieval_s']:.2f} s"),
        ("answer 1 (recompute)", f"{r['answers']['recompute']!r} -> {mark[r['correct']['recompute']]}"),
        ("answer 2 (loaded)", f"{r['answers']['loaded']!r} -> {mark[r['correct']['loaded']]}"),
        ("answer 3 (retrieval 3%)", f"{r['answers']['retrieval']!r} -> {mark[r['correct']['retrieval']]}"),
        ("resident bytes", f"dense fp16 cache {r['resident_bytes']['dense_fp16']:,} B; RetrievalCache "
                           f"{r['resident_bytes']['retrieval']:,} B"),
        ("next-token KL vs req 1", f"loaded {r['kl_loaded']:.5f} nats, retrieval {r['kl_retrieval']:.5f} nats"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n== kvrecall demo: store once, answer three ways")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
