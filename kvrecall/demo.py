"""The main job (``kvrecall demo``): a real model's real KV through the whole loading path, end to end.

1. Calibrate a codec profile on calibration texts (or load one).
2. Prefill a context from a held-out text; store its chunks, compressed, in a kvstore server on loopback.
3. A "new request" with the same prefix: one Exists call finds the cached prefix, the chunks stream back and
   decode; the model continues from the loaded KV. Compare with recomputing the prefill: next-token KL, top-1
   agreement, perplexity, bytes, and time.
4. Retrieval decoding (when a retriever profile can be calibrated): a longer context, every layer attending only
   to the top-k + sink + recent tokens picked from vector-quantized key codes; KL against dense attention.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    model: Path
    texts: Path
    tokens: int = 384
    chunk_tokens: int = 128
    continuation: int = 64
    level: str = "medium"
    profile: Path | None = None
    calib_texts: int = 6
    calib_tokens: int = 512
    retrieval_tokens: int = 2048
    retrieval_budget: float = 0.03
    retrieval_positions: int = 16
    seed: int = 0


def _kl_top1_ppl(ref_logits: torch.Tensor, got_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Mean KL(ref || got) over positions, top-1 agreement, and both perplexities on ``targets``."""
    ref = torch.log_softmax(ref_logits.float(), -1)
    got = torch.log_softmax(got_logits.float(), -1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    nll_ref = -ref[:-1].gather(-1, targets[1:, None]).mean().item()
    nll_got = -got[:-1].gather(-1, targets[1:, None]).mean().item()
    return {"kl": kl, "top1": top1, "ppl_ref": float(torch.tensor(nll_ref).exp()), "ppl": float(torch.tensor(nll_got).exp())}


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n== {title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def _codec_and_store(cfg: DemoConfig, model, tok, texts, model_id: str) -> dict:
    from kvrecall.context_cache import ContextCache
    from kvrecall.encoder import CodecProfile
    from kvrecall.kvstore import BackgroundServer, KVStoreClient, ServerConfig
    from kvrecall.models import capture_qkv, logits_with_context_kv, tokenize

    eval_name, eval_text = texts[0]
    calib = texts[1 : 1 + cfg.calib_texts]
    t0 = time.perf_counter()
    if cfg.profile is not None:
        profile = CodecProfile.load(cfg.profile)
        how = f"loaded {cfg.profile}"
    else:
        captured = [capture_qkv(model, tokenize(tok, text, cfg.calib_tokens)) for _, text in calib]
        profile = CodecProfile.calibrate([c.kv() for c in captured], model_id,
                                         query_samples=[c.q for c in captured])
        how = f"calibrated on {len(calib)} texts x {cfg.calib_tokens} tokens with their queries"
    calib_s = time.perf_counter() - t0

    ids = tokenize(tok, eval_text, cfg.tokens + cfg.continuation)
    if ids.numel() < cfg.tokens + cfg.continuation:
        raise ValueError(f"{eval_name} has only {ids.numel()} tokens; lower --tokens")
    ctx, cont = ids[: cfg.tokens], ids[cfg.tokens :]

    t0 = time.perf_counter()
    kv = capture_qkv(model, ctx).kv()
    prefill_s = time.perf_counter() - t0
    ref_logits = model(ids[None]).logits[0, cfg.tokens :].float()

    with tempfile.TemporaryDirectory(prefix="kvrecall-demo-") as disk, BackgroundServer(
        ServerConfig(host="127.0.0.1", port=0, disk_dir=disk, ram_bytes=256 << 20, disk_bytes=1 << 30)
    ) as server, KVStoreClient(server.target) as client:
        cache = ContextCache(client, model_id, profile, cfg.level, cfg.chunk_tokens)
        stored = cache.store(None, ctx, kv=kv)
        # A new request shares the prefix and asks for more: load what is cached, prefill only the rest.
        loaded = cache.load(ids)
        stats = client.stats()
    got_logits = logits_with_context_kv(model, loaded.kv, ids[loaded.tokens :])[cfg.tokens - loaded.tokens :]
    quality = _kl_top1_ppl(ref_logits, got_logits, cont)
    elements = kv[:, :, :, : loaded.tokens].numel()
    load_s = sum(loaded.timings.values())
    rows = [
        ("model", f"{cfg.model} (id {model_id})"),
        ("codec profile", f"{profile.profile_id} ({how}, {calib_s:.1f} s)"),
        ("context", f"{eval_name}: {cfg.tokens} tokens, continuation {cfg.continuation} tokens"),
        ("chunks stored", f"{stored.stored} of {stored.chunks} x {cache.chunk_tokens} tokens, level {cfg.level!r}"),
        ("cached prefix found", f"{loaded.tokens} tokens with one Exists call"),
        ("bytes", f"{loaded.bytes_read:,} compressed vs {elements * 2:,} fp16 "
                  f"({elements * 2 / max(loaded.bytes_read, 1):.1f}x smaller)"),
        ("bits per KV element", f"{8 * loaded.bytes_read / elements:.2f}"),
        ("KV relative error", f"{((loaded.kv - kv[:, :, :, :loaded.tokens]).norm() / kv[:, :, :, :loaded.tokens].norm()).item():.4f}"),
        ("next-token KL vs recompute", f"{quality['kl']:.5f} nats (top-1 agreement {quality['top1']:.1%})"),
        ("perplexity", f"{quality['ppl']:.3f} from loaded KV vs {quality['ppl_ref']:.3f} recomputed"),
        ("load time", "  ".join(f"{k} {1e3 * v:.1f} ms" for k, v in loaded.timings.items())),
        ("prefill time (recompute)", f"{1e3 * prefill_s:.1f} ms; loading took {load_s / prefill_s:.2f}x of that "
                                     "(loopback store, CPU decode, one run)"),
        ("store tiers", ", ".join(f"{t.name}: {t.objects} objects {t.bytes:,} B" for t in stats.tiers)),
    ]
    _print_table("context loading: prefill -> encode -> kvstore -> Exists/Get -> decode -> continue", rows)
    return {"kl": quality["kl"], "top1": quality["top1"], "bits_per_element": 8 * loaded.bytes_read / elements,
            "tokens_loaded": loaded.tokens}


def _retrieval(cfg: DemoConfig, model, tok, texts, model_id: str) -> dict:
    from kvrecall.models import capture_qkv, long_token_ids, logits_with_context_kv, model_info
    from kvrecall.retriever import calibrate, sparse_decode_logits
    from kvrecall.retriever.methods import IndexMethod, OracleMethod, StreamingMethod
    from kvrecall.models import rope_parameters

    n_calib = 40960  # >= 39 training points per centroid for FAISS k-means (1,024 centroids)
    calib_ids = long_token_ids(tok, texts[::-1], n_calib)  # disjoint from the evaluation text's start
    ids = long_token_ids(tok, texts, cfg.retrieval_tokens)
    t0 = time.perf_counter()
    # "positional" scoring: pre-RoPE VQ codes scored at their true positions (docs/retriever.md explains why the
    # A²ATS windowed approximation loses on these models).
    profile = calibrate(model, calib_ids, model_id=model_id, kind="vq", bits=10, rope_mode="positional",
                        progress=False)
    calib_s = time.perf_counter() - t0
    n = cfg.retrieval_positions
    ctx, cont = ids[:-n], ids[-n:]
    kv = capture_qkv(model, ctx).kv()
    dense = logits_with_context_kv(model, kv, cont)
    inv_freq, scaling = rope_parameters(model)
    info = model_info(model)
    rows = [
        ("retriever profile", f"query-aware VQ, {profile.bits_per_key} bits/key, calibrated on {n_calib:,} tokens "
                              f"({calib_s:.1f} s)"),
        ("context", f"{ctx.numel():,} tokens; {n} positions decoded teacher-forced, every layer sparse"),
        ("budget", f"{cfg.retrieval_budget:.0%} top-k + 8 sinks + 64 recent tokens per KV head"),
    ]
    out = {}
    methods = {
        "query-aware VQ": IndexMethod(profile),
        "oracle top-k": OracleMethod(inv_freq, scaling, info.group_size, info.head_dim),
        "StreamingLLM": StreamingMethod(info.group_size),
    }
    for name, method in methods.items():
        t0 = time.perf_counter()
        got = sparse_decode_logits(model, kv, cont, method, cfg.retrieval_budget)
        q = _kl_top1_ppl(dense, got, cont)
        out[name] = q
        rows.append((f"KL vs dense ({name})", f"{q['kl']:.5f} nats, top-1 agreement {q['top1']:.1%} "
                                              f"({time.perf_counter() - t0:.1f} s)"))
    _print_table("retrieval decoding: key codes -> top-k + sinks + window -> sparse attention", rows)
    return out


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo and print its tables; returns the headline figures."""
    from kvrecall.models import load_model, model_fingerprint, read_texts

    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model)
    model_id = model_fingerprint(cfg.model)
    texts = read_texts(cfg.texts, min_chars=20_000)
    if len(texts) < 2:
        raise ValueError(f"need at least two texts of 20,000+ characters under {cfg.texts}")
    out = {"codec": _codec_and_store(cfg, model, tok, texts, model_id)}
    if cfg.retrieval_tokens > 0:
        out["retrieval"] = _retrieval(cfg, model, tok, texts, model_id)
    return out
