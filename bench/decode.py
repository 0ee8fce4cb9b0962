"""Retrieval decoding in model.generate: speed, memory and quality against dense decoding, side by side.

    python bench/decode.py --quick --json bench/results/decode-quick.json          # < 60 s (stories260K)
    python bench/decode.py --profile P.safetensors --json bench/results/decode-smollm2.json   # SmolLM2-135M

Per context length, in one run and one runtime (``RetrievalCache``; baselines are selectors in the same cache):
dense (``DynamicCache``, sdpa) vs ours (code scoring) at each budget, oracle top-k, StreamingLLM and Quest at
3%. Reported: decode tokens/s and the per-step breakdown (score, select, gather, attend, rest of the model),
resident and offloaded bytes per sequence (codebooks apart), and against dense: next-token KL teacher-forced over
the last positions, attention mass of the selection (and its ratio to the oracle's), greedy agreement over the
generated tokens, passcode accuracy (a five-digit number planted at depths 10-90% of a book excerpt, asked
through the chat template; ``--passcode-budgets`` for accuracy vs budget, ``--passcode-only`` for just those
runs). Quality contexts use real prefills; speed-only contexts (past the model's training
length) tile the real KV of the longest quality context (speed and memory do not depend on the values).
A separate table times scoring + selection per layer per step for each scorer at the speed contexts on one thread.

``--gpu`` (CUDA machine, run by ``bench/gpu_check.sh``; ``--gpu --smoke`` checks the code path on CPU, no figures):
attention step per layer per decode step at 32K and 128K, 3%: dense ``scaled_dot_product_attention`` over fp16
K/V on the GPU vs the runtime's own layer step (``RetrievalLayer.attend``: LUT-kernel code scores, candidates
fetched from the pinned int8 offload store, rescored, selected, attended) and the Triton sparse kernel alone over
rows already on the device, CUDA-event medians; and
decode tokens/s of SmolLM2-135M's configuration with random weights (speed does not depend on them), dense vs
RetrievalCache at 32K.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def model_spec(name: str):
    from kvrecall.models import MODEL_NAMES

    return name if name in MODEL_NAMES else SHARED / "models" / name


# ------------------------------------------------------------------------------------------- runtime helpers
def make_cache(model, profile, method: str, budget, args, kv):
    """A cache holding ``kv`` (pre-RoPE, batch 1) for ``method``: 'dense' or ours / a baseline selector."""
    from kvrecall.models import kv_to_cache
    from kvrecall.retrieval_baselines import SELECTORS
    from kvrecall.retrieval_cache import RetrievalCache

    if method == "dense":
        return kv_to_cache(model, kv)
    scorer = method.split(":", 1)[1] if method.startswith("ours") and ":" in method else args.scorer
    return RetrievalCache.from_kv(model, profile, kv, budget=budget, sinks=args.sinks, window=args.window,
                                  offload=args.offload if method.startswith("ours") else "exact",
                                  scorer=scorer, selector=SELECTORS.get(method), rerank=args.rerank,
                                  rerank_floor=args.rerank_floor)


def restore(model, cache):
    if hasattr(cache, "restore_attention"):
        cache.restore_attention()


@torch.no_grad()
def teacher_forced(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits ``[n, vocab]`` of feeding ``ids[start:]`` one token per step after a cache of ``start`` tokens."""
    from kvrecall.models import cache_kwargs

    out = []
    for i in range(start, ids.numel()):
        pos = torch.tensor([[i]])
        res = model(ids[i : i + 1][None], position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
        out.append(res.logits[0, -1].float())
    return torch.stack(out)


@torch.no_grad()
def greedy(model, cache, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """Greedy continuation ``[n]`` of ``prompt`` (the cache holds ``prompt[:-1]``) and seconds per token."""
    from kvrecall.models import cache_kwargs

    t = time.perf_counter()
    out = model.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         **cache_kwargs(model, cache))
    return out[0, prompt.numel():], (time.perf_counter() - t) / n


def mass_probe(store: dict):
    """Probe recording the attention mass of the rows each step attends (after any rerank; every query head
    attends its group's union) and of the oracle's top-k union at the same budget."""
    from kvrecall.retrieval_baselines import true_scores
    from kvrecall.retriever.fast_scoring import topk_union

    def probe(layer, q_pre, chosen, lo, n_off, k, pos):
        if n_off <= lo or store.get("skip"):
            return
        o = layer.owner
        scores = true_scores(layer, q_pre, 0, n_off, pos)  # stored tokens
        wk = layer.win_k.float()  # post-RoPE window incl. the current token
        q = o.rotate(q_pre.float()[:, :, None], torch.tensor([pos]))[:, :, 0]
        b, hq, d = q.shape
        g = o.info.group_size
        ws = torch.matmul(q.reshape(b, -1, g, d), wk.transpose(2, 3)).reshape(b, hq, -1)
        probs = torch.softmax(torch.cat([scores, ws], -1) * d ** -0.5, -1)  # [B, Hq, total]
        orc = topk_union(scores[:, :, lo:], g, k, offset=lo)

        def mass(sel):
            keep = torch.zeros_like(probs, dtype=torch.bool)
            keep[:, :, :lo] = True
            keep[:, :, n_off:] = True
            for bi, row in enumerate(sel):
                for h, idx in enumerate(row):
                    keep[bi, h * g : (h + 1) * g, idx] = True
            return float((probs * keep).sum(-1).mean())

        store.setdefault("mass", []).append(mass(chosen))
        store.setdefault("oracle_mass", []).append(mass(orc))

    return probe


def kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    lp = torch.log_softmax(dense_logits.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


# ------------------------------------------------------------------------------------------- scoring speed
def scoring_rows(profile, contexts, budget, reps, threads, rerank=1.0, rerank_floor=0):
    """Score + select time per layer per decode step (one layer, batch 1) for each scorer, ``threads`` threads.

    Each scorer is timed three ways side by side on the same codes and queries: ``shortlist``
    (``CodeScorer.candidates``, the runtime's path: exact per-head top-k below 4,096 or 8x the candidates, a
    sampled threshold per head and one boolean LUT lookup per KV head above; one call, so only its total is
    reported), ``fast`` (``CodeScorer.scores`` + ``topk_union``: every head's exact top-k) and ``reference``
    (``scores_reference`` + ``topk_union_reference``, the per-band, per-head, per-row twin). The codes sit in a
    ``CodeBuffer`` as in the runtime (packed for 9-12 bits); selection picks the runtime's candidate count
    ``max(ceil(rerank * k), rerank_floor)`` (the exact rescoring of the candidates is in the runtime's per-step
    breakdown, not here). The query moves one position per repetition, as in decoding.
    """
    from kvrecall.retrieval_cache import rerank_candidates
    from kvrecall.retriever.code_buffer import CodeBuffer
    from kvrecall.retriever.fast_scoring import SCORERS, CodeScorer, topk_union, topk_union_reference
    from kvrecall.retriever.selection import resolve_budget

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    s = profile.settings
    gen = torch.Generator().manual_seed(0)
    rows = []
    try:
        for method in SCORERS:
            for T in contexts:
                codes = CodeBuffer(1, s.num_kv_heads, 1, s.bits)
                codes.append(torch.randint(0, 1 << s.bits, (1, s.num_kv_heads, T, 1), generator=gen))
                qs = [torch.randn(1, s.num_heads, s.head_dim, generator=gen) for _ in range(reps + 1)]
                k = resolve_budget(budget, T)
                if rerank > 1.0:
                    k = rerank_candidates(k, rerank, rerank_floor, T - 8)
                for impl in ("shortlist", "fast", "reference"):
                    scorer = CodeScorer(profile, method)
                    score_fn = scorer.scores if impl == "fast" else scorer.scores_reference
                    select_fn = topk_union if impl == "fast" else topk_union_reference
                    times = {"score": [], "select": []}
                    for rep in range(reps + 1):
                        t0 = time.perf_counter()
                        if impl == "shortlist":
                            scorer.candidates(0, qs[rep], codes, 8, T, T + 63 + rep, k)
                            t1 = t2 = time.perf_counter()
                        else:
                            sc = score_fn(0, qs[rep], codes, 8, T, T + 63 + rep)
                            t1 = time.perf_counter()
                            select_fn(sc, s.group_size, k, offset=8)
                            t2 = time.perf_counter()
                        times["score"].append(t1 - t0)
                        times["select"].append(t2 - t1)
                    score = 1e3 * statistics.median(times["score"][1:])
                    select = 1e3 * statistics.median(times["select"][1:])
                    split = impl != "shortlist"
                    rows.append({"scorer": method, "impl": impl, "context": T, "budget": budget, "threads": threads,
                                 "candidates": k, "score_ms": score if split else None,
                                 "select_ms": select if split else None, "score_select_ms": score + select})
    finally:
        torch.set_num_threads(old)
    for r in rows:
        ref = next(x for x in rows if x["scorer"] == r["scorer"] and x["context"] == r["context"]
                   and x["impl"] == "reference")
        r["speedup_vs_reference"] = ref["score_select_ms"] / r["score_select_ms"]
    return rows


def print_scoring(rows) -> None:
    print(f"{'scorer':10s} {'impl':9s} {'ctx':>6s} {'cands':>6s} {'score':>7s} {'select':>7s} {'total':>7s} "
          f"{'x ref':>6s}  ms per layer per step, 1 thread (medians)")
    for r in rows:
        split = "-" if r["score_ms"] is None else None
        print(f"{r['scorer']:10s} {r['impl']:9s} {r['context']:6d} {r['candidates']:6d} "
              f"{split or format(r['score_ms'], '7.2f'):>7s} {split or format(r['select_ms'], '7.2f'):>7s} "
              f"{r['score_select_ms']:7.2f} {r['speedup_vs_reference']:6.1f}")


def recall_rows(model, profile, args, T: int, eval_ids: torch.Tensor, positions: int = 8) -> list[dict]:
    """Candidate recall of each scorer on real queries: the share of the oracle's top-``k`` attention mass
    (``k`` = the main budget; sinks and the window excluded, they are always attended) that falls inside the
    scorer's top ``C`` candidates, for ``C`` = ``rerank * k`` and the rerank floor, averaged over the last
    ``positions`` queries of a ``T``-token text, every layer and query head."""
    from kvrecall.models import apply_rope, capture_qkv, rope_tables
    from kvrecall.retrieval_cache import RetrievalCache
    from kvrecall.retriever.fast_scoring import SCORERS, CodeScorer
    from kvrecall.retriever.selection import resolve_budget

    qkv = capture_qkv(model, eval_ids[:T])
    layers, hq, _, d = qkv.q.shape
    group = hq // qkv.k.shape[1]
    encoder = RetrievalCache(model, profile)
    encoder.restore_attention()
    codes = [encoder.encode_keys(layer, qkv.k[layer][None]) for layer in range(layers)]
    scorers = {name: CodeScorer(profile, name) for name in SCORERS}
    k = resolve_budget(args.main_budget, T)
    sizes = sorted({math.ceil(args.rerank * k), args.rerank_floor} - {0})
    got = {(name, c): [] for name in scorers for c in sizes}
    inv = profile.inv_freq
    for pos in range(T - positions, T):
        n = pos - args.window  # stored tokens 0 .. n-1
        cos, sin = rope_tables(inv, torch.arange(n), profile.settings.rope_scaling)
        cq, sq = rope_tables(inv, torch.tensor([pos]), profile.settings.rope_scaling)
        for layer in range(layers):
            keys = apply_rope(qkv.k[layer][:, :n].float(), cos, sin).repeat_interleave(group, 0)
            q = qkv.q[layer][:, pos].float()  # [Hq, D] pre-RoPE
            w = torch.softmax((apply_rope(q[:, None], cq, sq) * keys).sum(-1) / d ** 0.5, -1)
            w[:, : args.sinks] = 0
            top = w.topk(k, -1)
            for name, scorer in scorers.items():
                scores = scorer.scores(layer, q[None], codes[layer], args.sinks, n, pos)[0]
                for c in sizes:
                    inside = torch.zeros_like(w, dtype=torch.bool)
                    inside.scatter_(1, scores.topk(min(c, n - args.sinks), -1).indices + args.sinks, True)
                    share = (top.values * inside.gather(1, top.indices)).sum(-1) / top.values.sum(-1)
                    got[(name, c)].append(float(share.mean()))
    return [{"context": T, "scorer": name, "candidates": c, "k": k, "recall_of_oracle_mass": statistics.mean(v)}
            for (name, c), v in got.items()]


# ------------------------------------------------------------------------------------------- main loops
def quality_for_context(model, tok, profile, args, T, text_ids, eval_ids, methods, budgets, bar):
    """KL, mass, greedy agreement, tokens/s and bytes for one real context of ``T`` tokens."""
    from kvrecall.models import capture_qkv

    rows = []
    n_kl = args.kl_positions
    ids = eval_ids[:T]
    qkv = capture_qkv(model, ids)
    kv_all = qkv.kv()
    dense_logits = qkv.logits[T - n_kl :]
    kv_ctx = kv_all[..., : T - n_kl, :]
    prompt = ids[: T - n_kl + 1]
    kv_prompt = kv_all[..., : T - n_kl, :]
    dense_tokens = None
    for method, budget in [(m, b) for m in methods for b in (budgets if m.startswith("ours") else [args.main_budget])]:
        if method == "dense" and budget != budgets[0] and method != "dense":
            continue
        row = {"context": T, "method": method, "budget": None if method == "dense" else budget}
        cache = make_cache(model, profile, method, budget, args, kv_ctx)
        probe: dict = {}
        if method != "dense" and method != "oracle":
            cache.probe = mass_probe(probe)
        logits = teacher_forced(model, cache, ids, T - n_kl)
        restore(model, cache)
        row["kl"] = 0.0 if method == "dense" else kl(dense_logits, logits)
        if probe.get("mass"):
            row["mass"] = statistics.fmean(probe["mass"])
            row["oracle_mass"] = statistics.fmean(probe["oracle_mass"])
            row["mass_ratio"] = row["mass"] / row["oracle_mass"]
        cache = make_cache(model, profile, method, budget, args, kv_prompt)
        toks, s_per_tok = greedy(model, cache, prompt, args.new_tokens)
        restore(model, cache)
        if method == "dense":
            dense_tokens = toks
        row["greedy_agreement"] = float((toks == dense_tokens).float().mean())
        row["tokens_per_s"] = 1.0 / s_per_tok
        row.update(memory_and_breakdown(cache, s_per_tok, args.new_tokens))
        rows.append(row)
        bar.update(1)
    return rows


def memory_and_breakdown(cache, s_per_tok: float, n_new: int) -> dict:
    if not hasattr(cache, "stats"):
        return {"resident_bytes": None, "offloaded_bytes": 0, "step_ms": 1e3 * s_per_tok}
    st = cache.stats()
    steps = max(1, st["decode_steps"])
    per = {f"{k}_ms": v / steps for k, v in st["timings_ms"].items() if k in ("score", "select", "gather", "attend")}
    step_ms = 1e3 * s_per_tok
    per["rest_ms"] = step_ms - sum(per.values())
    return {"resident_bytes": st["resident_bytes"], "offloaded_bytes": st["offloaded_bytes"],
            "codebook_bytes": st["codebook_bytes"], "rope_table_bytes": st["rope_table_bytes"],
            "dense_fp16_bytes": st["dense_fp16_bytes"],
            "resident_fraction": st["resident_bytes"] / st["dense_fp16_bytes"], "mean_selected": st["mean_selected"],
            "step_ms": step_ms, **per}


def passcode_runs(methods, budgets) -> list[tuple[str, float | None]]:
    """(method, budget) pairs of the passcode runs: dense once, every sparse method at every budget."""
    return [(m, None) if m == "dense" else (m, b) for m in methods for b in ([None] if m == "dense" else budgets)]


def passcode_rows(model, tok, profile, args, T, texts, methods, bar):
    """Passcode accuracy per method and budget (``--passcode-budgets``) at ``T`` tokens on
    :func:`kvrecall.passcode.make_cases` (depths 10-90%, chat template, ``ANSWER_TOKENS`` greedy tokens, the
    first five-digit number of the answer must be the passcode). Every run of a case reuses its prefill."""
    from kvrecall.models import prefill_kv
    from kvrecall.passcode import ANSWER_TOKENS, make_cases

    runs = passcode_runs(methods, args.passcode_budgets)
    results = {run: [] for run in runs}
    for case in make_cases(tok, texts, args.passcode_cases, T, seed=T):
        prompt = case.input_ids
        kv = prefill_kv(model, prompt[:-1])
        for method, budget in runs:
            cache = make_cache(model, profile, method, args.main_budget if budget is None else budget, args, kv)
            toks, _ = greedy(model, cache, prompt, ANSWER_TOKENS)
            restore(model, cache)
            results[(method, budget)].append(case.is_correct(tok.decode(toks)))
            bar.update(1)
    return [{"context": T, "method": m, "budget": b, "passcode_accuracy": sum(v) / len(v),
             "passcode_cases": len(v), "per_case": v} for (m, b), v in results.items()]


def speed_rows(model, profile, args, T, kv_real, methods, budgets, bar):
    """Tokens/s and bytes at ``T`` tokens by tiling real KV (values do not change speed)."""
    reps = -(-T // kv_real.shape[3])
    kv = kv_real.repeat(1, 1, 1, reps, 1)[..., : T - 1, :]
    vocab_ids = torch.randint(0, model.config.vocab_size - 1, (T,), generator=torch.Generator().manual_seed(T))
    rows = []
    for method, budget in [(m, b) for m in methods for b in (budgets if m.startswith("ours") else [args.main_budget])]:
        cache = make_cache(model, profile, method, budget, args, kv)
        _, s_per_tok = greedy(model, cache, vocab_ids, args.speed_tokens)
        restore(model, cache)
        rows.append({"context": T, "method": method, "budget": None if method == "dense" else budget,
                     "tokens_per_s": 1.0 / s_per_tok, "speed_only": True,
                     **memory_and_breakdown(cache, s_per_tok, args.speed_tokens)})
        bar.update(1)
    return rows


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    ax = axes[0]
    for key in dict.fromkeys((r["method"], r["budget"]) for r in rows if r.get("tokens_per_s")):
        pts = sorted((r["context"], r["tokens_per_s"]) for r in rows
                     if (r["method"], r["budget"]) == key and r.get("tokens_per_s"))
        label = key[0] if key[1] is None else f"{key[0]} {100 * key[1]:g}%"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode tokens/s (CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    pc = [r for r in rows if "passcode_accuracy" in r]
    main = {r["budget"] for r in pc if r["method"] != "dense"}
    main = 0.03 if 0.03 in main else (min(main) if main else None)
    colors = {}
    for method in dict.fromkeys(r["method"] for r in pc):
        pts = sorted((r["context"], r["passcode_accuracy"]) for r in pc
                     if r["method"] == method and r["budget"] in (None, main))
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        colors[method] = line.get_color()
    ax.set_xlabel(f"context tokens (budget {100 * (main or 0):g}% for sparse methods)")
    ax.set_ylabel("passcode accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[2]  # accuracy vs budget, mean over the quality contexts; dense as a line
    contexts = sorted({r["context"] for r in pc})
    for method in dict.fromkeys(r["method"] for r in pc):
        mine = [r for r in pc if r["method"] == method]
        if method == "dense":
            if mine:
                ax.axhline(statistics.mean(r["passcode_accuracy"] for r in mine), color=colors[method], ls="--",
                           label="dense")
            continue
        budgets = sorted({r["budget"] for r in mine})
        ax.plot([100 * b for b in budgets],
                [statistics.mean(r["passcode_accuracy"] for r in mine if r["budget"] == b) for b in budgets],
                marker="o", label=method, color=colors[method])
    ax.set_xscale("log")
    ticks = sorted({100 * r["budget"] for r in pc if r["budget"] is not None})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"budget % (mean over contexts {', '.join(str(c) for c in contexts)})")
    ax.set_ylabel("passcode accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------- GPU (--gpu)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
               vocab_size=49152, rms_norm_eps=1e-5, tie_word_embeddings=True)


def random_profile(layers: int, hq: int, hkv: int, d: int, bits: int, theta: float):
    from kvrecall.retriever import RetrieverProfile, RetrieverSettings

    gen = torch.Generator().manual_seed(0)
    s = RetrieverSettings(model_id="random", model_name="smollm2-config-random", num_layers=layers, num_heads=hq,
                          num_kv_heads=hkv, head_dim=d, kind="vq", m=1, bits=bits, rope_mode="positional")
    eye = torch.eye(d).expand(layers, hkv, d, d).contiguous()
    books = torch.randn(layers, hkv, 1, 1 << bits, d, generator=gen)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    return RetrieverProfile(s, eye.clone(), eye.clone(), books, inv_freq)


def timer(fn, device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def attention_rows(contexts, budget, device, reps, dtype=torch.float16):
    """Per-layer attention step, batch 1, SmolLM2's shapes: dense SDPA over every key vs the runtime's own decode
    step (``RetrievalLayer.attend`` of a one-layer RetrievalCache built by ``from_kv``: score codes, fetch the
    candidates' rows from the pinned offload store, rescore, select, attend) with the Triton backend; and, as the
    floor of the attention alone, the sparse kernel over rows already on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvrecall.kernels.sparse_attention import sparse_decode_attention
    from kvrecall.retrieval_cache import RetrievalCache
    from kvrecall.retriever.selection import resolve_budget

    c = dict(SMOLLM2, num_hidden_layers=1)
    hq, hkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**c)).to(device, dtype).eval()
    prof = random_profile(1, hq, hkv, d, 12, c["rope_theta"])
    rows = []
    for T in contexts:
        kv = torch.randn(1, 2, hkv, T, d, dtype=dtype)
        k, v = kv[0, 0][None].to(device), kv[0, 1][None].to(device)
        q = torch.randn(1, hq, 1, d, device=device, dtype=dtype)
        dense = timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                      device, reps)
        cache = RetrievalCache.from_kv(model, prof, kv, budget=budget, offload="int8", backend="triton")
        layer = cache.layers[0]
        before = dict(cache.stats()["timings_ms"])  # from_kv's own offload is not a step's
        fetched0 = layer.store.fetched_bytes
        k1 = torch.randn(1, hkv, 1, d, device=device, dtype=dtype)
        v1 = torch.randn(1, hkv, 1, d, device=device, dtype=dtype)
        ours = timer(lambda: layer.attend(q, k1, v1, None, d ** -0.5), device, reps)
        steps = max(1, cache.selected_steps)
        stages = {name: (ms - before[name]) / steps for name, ms in cache.stats()["timings_ms"].items()
                  if name != "prefill"}
        cache.restore_attention()
        kk = resolve_budget(budget, T)
        sel = torch.stack([torch.randperm(T, device=device)[: kk * (hq // hkv)] for _ in range(hkv)])[None]
        sel = sel.sort(-1).values
        ks, vs = k.gather(2, sel[..., None].expand(-1, -1, -1, d)).contiguous(), \
            v.gather(2, sel[..., None].expand(-1, -1, -1, d)).contiguous()
        rows_dev = torch.arange(sel.shape[2], device=device).expand_as(sel).contiguous()
        counts = torch.full((1, hkv), sel.shape[2], device=device)
        kernel = timer(lambda: sparse_decode_attention(q[:, :, 0], ks, vs, rows_dev, counts, rope=None,
                                                       gathered=True, validate=False), device, reps)
        rows.append({"context": T, "budget": budget, "selected_per_head": kk, "dense_sdpa_ms": dense,
                     "ours_ms": ours, "ratio": ours / dense, "kernel_only_ms": kernel, "kernel_ratio": kernel / dense,
                     "stages_ms_per_step": stages,
                     "fetched_bytes_per_step": (layer.store.fetched_bytes - fetched0) / steps,
                     "device": str(torch.cuda.get_device_name(device)) if device.type == "cuda"
                     else "cpu smoke (not a figure)"})
        print(f"  attention T={T:7d}: dense {dense:.3f} ms, runtime step {ours:.3f} ms (ratio {ours / dense:.2f}), "
              f"sparse kernel alone {kernel:.3f} ms (ratio {kernel / dense:.2f})", flush=True)
        del cache, layer
    return rows


def model_rows(contexts, budget, device, new_tokens):
    """Decode tokens/s of SmolLM2's configuration with random weights: DynamicCache vs RetrievalCache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvrecall.models import cache_kwargs, kv_to_cache
    from kvrecall.retrieval_cache import RetrievalCache

    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM2)
    model = LlamaForCausalLM(cfg).to(device, torch.float16).eval()
    model.set_attn_implementation("sdpa")
    c = SMOLLM2
    prof = random_profile(c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
                          c["head_dim"], 12, c["rope_theta"])
    rows = []
    for T in contexts:
        kv = torch.randn(c["num_hidden_layers"], 2, c["num_key_value_heads"], T - 1, c["head_dim"],
                         dtype=torch.float16)
        ids = torch.randint(0, c["vocab_size"], (1, T), device=device)
        for name in ("dense", "ours"):
            if name == "dense":
                cache = kv_to_cache(model, kv.to(device))
            else:
                cache = RetrievalCache.from_kv(model, prof, kv, budget=budget, offload="float16",
                                               backend="triton" if device.type == "cuda" else "torch")
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               **cache_kwargs(model, cache))
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / new_tokens
            if hasattr(cache, "restore_attention"):
                cache.restore_attention()
            rows.append({"context": T, "method": name, "budget": None if name == "dense" else budget,
                         "tokens_per_s": 1 / dt})
            print(f"  model T={T:7d} {name:5s}: {1 / dt:.2f} tokens/s", flush=True)
            del cache
    return rows


def gpu_main(argv=None) -> int:
    """``--gpu``: the GPU measurements (see :func:`attention_rows`, :func:`model_rows`)."""
    ap = argparse.ArgumentParser(description="GPU decode bench (bench/decode.py --gpu)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the code path; no figures)")
    ap.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--model-contexts", type=int, nargs="*", default=[32768])
    ap.add_argument("--budget", type=float, default=0.03)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    if args.smoke:  # the Triton kernels run under the interpreter on CPU
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    if torch.cuda.is_available() and not args.smoke:
        device = torch.device("cuda")
    elif args.smoke:
        device = torch.device("cpu")
        args.contexts, args.model_contexts, args.reps, args.new_tokens = [2048], [512], 2, 2
    else:
        print("decode_gpu: no CUDA device; run with --smoke for a CPU check of the code path (no figures)",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    out = {"meta": {"argv": sys.argv[1:], "torch": torch.__version__, "device": str(device),
                    "smoke": args.smoke},
           "attention": attention_rows(args.contexts, args.budget, device, args.reps),
           "model": model_rows(args.model_contexts, args.budget, device, args.new_tokens)}
    out["meta"]["elapsed_s"] = time.perf_counter() - started
    for r in out["attention"]:
        print(f"attention/layer/step T={r['context']}: runtime/dense = {r['ratio']:.3f}, "
              f"kernel alone/dense = {r['kernel_ratio']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0



def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--gpu" in argv:
        return gpu_main(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="stories260K, short contexts, few tokens (< 60 s)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--profile", type=Path, default=None, help="retriever profile (default: calibrate a small one)")
    ap.add_argument("--contexts", type=int, nargs="*", default=None, help="quality + speed contexts")
    ap.add_argument("--speed-contexts", type=int, nargs="*", default=None, help="speed and memory only")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.01, 0.03, 0.10])
    ap.add_argument("--main-budget", type=float, default=0.03)
    ap.add_argument("--methods", nargs="*", default=["dense", "ours", "oracle", "streamingllm", "quest"])
    ap.add_argument("--scorer", default="banded")
    ap.add_argument("--offload", default="int8")
    ap.add_argument("--rerank", type=float, default=None,
                    help="candidates per head as a multiple of the budget, rescored exactly (default: kvrecall.defaults)")
    ap.add_argument("--rerank-floor", type=int, default=None,
                    help="at least this many candidates per head when --rerank > 1 (default: kvrecall.defaults)")
    ap.add_argument("--kl-positions", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--speed-tokens", type=int, default=None)
    ap.add_argument("--speed-only", action="store_true",
                    help="skip the quality and passcode runs (--contexts only sets the real KV tiled for speed)")
    ap.add_argument("--passcode-cases", type=int, default=None)
    ap.add_argument("--passcode-budgets", type=float, nargs="*", default=None,
                    help="budgets of the sparse methods' passcode runs (default: --main-budget)")
    ap.add_argument("--passcode-only", action="store_true",
                    help="only the passcode runs at the quality contexts (no KL, greedy, speed or scoring table)")
    ap.add_argument("--sinks", type=int, default=8)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scorer-recall", action="store_true",
                    help="also the scorers' candidate recall of the oracle's top-k mass at each quality context")
    ap.add_argument("--scoring-only", action="store_true",
                    help="only the scorer timing table (SmolLM2 shape, 12-bit VQ, random codes, 1 thread)")
    args = ap.parse_args(argv)
    q = args.quick
    from kvrecall import defaults

    args.rerank = defaults.RETRIEVAL_RERANK if args.rerank is None else args.rerank
    args.rerank_floor = defaults.RETRIEVAL_RERANK_FLOOR if args.rerank_floor is None else args.rerank_floor
    if args.scoring_only:
        prof = random_profile(1, 9, 3, 64, 12, 1e5)
        ctxs = args.speed_contexts or [8192, 32768]
        rows = scoring_rows(prof, ctxs, args.main_budget, 3 if q else 9, 1, args.rerank, args.rerank_floor)
        print_scoring(rows)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"meta": {"argv": sys.argv[1:]}, "scoring": rows}, indent=1))
        return 0
    torch.set_num_threads(args.threads)
    from kvrecall.models import load_model, long_token_ids, read_texts
    from kvrecall.retriever import RetrieverProfile, calibrate

    args.model = args.model or ("stories260K" if q else "smollm2-135m")
    contexts = args.contexts if args.contexts is not None else ([384] if q else [2048, 4096, 8192])
    speed_contexts = args.speed_contexts if args.speed_contexts is not None else ([1024] if q else [16384, 32768])
    args.kl_positions = args.kl_positions or (8 if q else 64)
    args.new_tokens = args.new_tokens or (8 if q else 64)
    args.speed_tokens = args.speed_tokens or (4 if q else 16)
    args.passcode_cases = args.passcode_cases if args.passcode_cases is not None else (1 if q else 10)
    args.passcode_budgets = args.passcode_budgets or ([args.main_budget, 0.1] if q else [args.main_budget])
    if args.passcode_only:
        speed_contexts = []
    model, tok = load_model(model_spec(args.model))
    started = time.perf_counter()
    if args.profile:
        profile = RetrieverProfile.load(args.profile, model=model)
    else:
        cal = long_token_ids(tok, read_texts(SHARED / "data" / "texts" / "gutenberg"), 2048 if q else 16384)
        profile = calibrate(model, cal, model_id=args.model, bits=8 if q else 10, niter=4, progress=not q,
                            chunk=min(512 if q else 1024, int(model.config.max_position_embeddings)))
    eval_ids = long_token_ids(tok, read_texts(SHARED / "data" / "texts" / "state_union"), max(contexts))
    book_texts = read_texts(SHARED / "data" / "texts" / "gutenberg")[::-1]  # passcode excerpts
    methods = args.methods
    n_budgets = len(args.budgets)
    per_ctx = sum(n_budgets if m.startswith("ours") else 1 for m in methods)
    n_passcode = args.passcode_cases * len(passcode_runs(methods, args.passcode_budgets))
    total = (0 if args.speed_only else len(contexts) * ((0 if args.passcode_only else per_ctx) + n_passcode)) \
        + len(speed_contexts) * per_ctx
    rows = []
    with tqdm(total=total, desc="decode bench", unit="run", disable=None) as bar:
        for T in contexts if not args.speed_only else []:
            if not args.passcode_only:
                rows += quality_for_context(model, tok, profile, args, T, None, eval_ids, methods, args.budgets,
                                            bar)
            if args.passcode_cases:
                rows += passcode_rows(model, tok, profile, args, T, book_texts, methods, bar)
        if speed_contexts:
            from kvrecall.models import prefill_kv

            kv_real = prefill_kv(model, eval_ids[: max(contexts)])
            for T in speed_contexts:
                rows += speed_rows(model, profile, args, T, kv_real, [m for m in methods if m in ("dense", "ours")],
                                   args.budgets, bar)
    recall = [r for T in (contexts if args.scorer_recall else []) for r in recall_rows(model, profile, args, T,
                                                                                        eval_ids)]
    score_rows = [] if args.passcode_only else scoring_rows(profile, sorted(set(speed_contexts + [max(contexts)])),
                                                            args.main_budget, 3 if q else 7, 1, args.rerank,
                                                            args.rerank_floor)
    elapsed = time.perf_counter() - started

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"\n{args.model}: {elapsed:.1f} s, profile {profile.settings.kind} {profile.settings.bits} bits "
          f"{profile.settings.rope_mode}, scorer {args.scorer}, rerank {args.rerank}, offload {args.offload}, "
          f"{args.threads} threads")
    print(f"{'ctx':>6s} {'method':13s} {'budget':>6s} {'tok/s':>7s} {'x dense':>7s} {'KL':>8s} {'mass':>6s} "
          f"{'ratio':>6s} {'greedy':>6s} {'resid%':>7s} {'score':>6s} {'select':>6s} {'gather':>6s} {'attend':>6s} "
          f"{'rest':>6s}  (ms per step, all layers)")
    dense_tps = {r["context"]: r["tokens_per_s"] for r in rows if r["method"] == "dense" and "tokens_per_s" in r}
    for r in rows:
        if "tokens_per_s" not in r:
            continue
        r["speedup_vs_dense"] = r["tokens_per_s"] / dense_tps[r["context"]] if r["context"] in dense_tps else None
        resid = r.get("resident_fraction")
        print(f"{r['context']:6d} {r['method']:13s} {f(r['budget'], '.2f'):>6s} {r['tokens_per_s']:7.2f} "
              f"{f(r['speedup_vs_dense'], '.2f'):>7s} {f(r.get('kl'), '.4f'):>8s} {f(r.get('mass'), '.3f'):>6s} "
              f"{f(r.get('mass_ratio'), '.3f'):>6s} {f(r.get('greedy_agreement'), '.2f'):>6s} "
              f"{f(None if resid is None else 100 * resid, '.2f'):>7s} {f(r.get('score_ms'), '.1f'):>6s} "
              f"{f(r.get('select_ms'), '.1f'):>6s} {f(r.get('gather_ms'), '.1f'):>6s} {f(r.get('attend_ms'), '.1f'):>6s} "
              f"{f(r.get('rest_ms'), '.1f'):>6s}")
    print(f"\n{'ctx':>6s} {'method':13s} {'budget':>6s} passcode accuracy")
    for r in rows:
        if "passcode_accuracy" in r:
            print(f"{r['context']:6d} {r['method']:13s} {f(r['budget'], '.2f'):>6s} {r['passcode_accuracy']:.2f} "
                  f"({r['passcode_cases']} cases)")
    print()
    if score_rows:
        print_scoring(score_rows)
    if recall:
        print(f"\n{'ctx':>6s} {'scorer':10s} {'cands':>6s} {'k':>5s} {'recall':>7s}  share of the oracle's top-k mass "
              "inside the scorer's candidates (sinks, window excluded)")
        for r in recall:
            print(f"{r['context']:6d} {r['scorer']:10s} {r['candidates']:6d} {r['k']:5d} "
                  f"{r['recall_of_oracle_mass']:7.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"argv": sys.argv[1:], "model": args.model, "contexts": contexts, "speed_contexts": speed_contexts,
                "budgets": args.budgets, "main_budget": args.main_budget, "scorer": args.scorer, "rerank": args.rerank,
                "rerank_floor": args.rerank_floor,
                "offload": args.offload, "threads": args.threads, "profile": str(args.profile),
                "profile_settings": {"kind": profile.settings.kind, "bits": profile.settings.bits,
                                     "rope_mode": profile.settings.rope_mode},
                "kl_positions": args.kl_positions, "new_tokens": args.new_tokens,
                "passcode_cases": args.passcode_cases, "passcode_budgets": args.passcode_budgets,
                "elapsed_s": elapsed,
                "note": "speed_only rows tile real KV past the longest quality context"}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "scoring": score_rows, "recall": recall},
                                        indent=1))
        plot(rows, args.json.with_suffix(".png"))
        print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
