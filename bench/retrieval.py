"""Retrieval quality and search latency: the A²ATS-style retriever against the oracle and baselines.

    python bench/retrieval.py --quick --json bench/results/retrieval-quick.json
    python bench/retrieval.py --json bench/results/retrieval-full.json       # SmolLM2-135M first, then the fixtures
    python bench/retrieval.py --models smollm2-135m --contexts 2048 4096 8192 --json bench/results/retrieval-smollm2.json

Per model and context length: attention-mass recall of each method's selection (and the exact oracle's at the
same budget), top-k recall, attention-output relative error, next-token KL and perplexity change when every
layer attends only to its selection (teacher-forced over the last positions), and CPU search latency per decode
step per layer (torch LUT path and FAISS path). Calibration uses the gutenberg texts, evaluation the
state_union texts. A PNG of mass recall vs budget per method is written beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def model_spec(name: str):
    """A model name known to :func:`kvrecall.models.load_model` (e.g. ``smollm2-135m``), else a shared folder."""
    from kvrecall.models import MODEL_NAMES

    return name if name in MODEL_NAMES else SHARED / "models" / name


def build_methods(model, path, cal_ids, specs, niter, progress):
    """Calibrate the index-based methods and create the baselines. Returns a list of method objects."""
    from kvrecall.models import model_fingerprint, model_info
    from kvrecall.retriever.methods import IndexMethod, OracleMethod, QuestMethod, RandomMethod, StreamingMethod
    from kvrecall.retriever.calibration import calibrate, collect_qk
    from kvrecall.models import rope_parameters

    info = model_info(model)
    inv, sc = rope_parameters(model)
    fp = model_fingerprint(path)
    methods = []
    chunk = min(int(model.config.max_position_embeddings), 1024)
    qk = collect_qk(model, cal_ids, chunk, progress)
    for name, kw in specs:
        t = time.perf_counter()
        prof = calibrate(model, cal_ids, model_id=fp, model_name=Path(path).name, niter=niter, progress=progress,
                         chunk=chunk, qk=qk, **kw)
        print(f"  calibrated {name}: {prof.bits_per_key} bits/key in {time.perf_counter() - t:.1f}s", flush=True)
        methods.append(IndexMethod(prof, name=name))
    methods += [
        QuestMethod(inv, sc, info.group_size, info.head_dim),
        StreamingMethod(info.group_size),
        RandomMethod(info.group_size),
    ]
    return methods, OracleMethod(inv, sc, info.group_size, info.head_dim)


def quality_rows(model, qkv, methods, oracle, budgets, n_queries, sinks, window):
    """Mass recall etc. for decode queries at the last ``n_queries`` positions (each over its own prefix)."""
    from kvrecall.retriever.metrics import selection_metrics
    from kvrecall.retriever.selection import resolve_budget

    L, hq, T, D = qkv.q.shape
    group = hq // qkv.k.shape[1]
    keys = qkv.k.float()
    oracle.reset(keys)
    acc: dict[tuple[str, float], dict[str, list[float]]] = {}
    sel_ms: dict[str, list[float]] = {}
    for method in methods:
        method.reset(keys)
    for p in range(T - n_queries, T):
        for layer in range(L):
            q = qkv.q[layer, :, p][None].float()
            true = oracle.scores(layer, q, length=p + 1)[0]
            for budget in budgets:
                k = resolve_budget(budget, p + 1)
                orc = oracle.select(layer, q, k, sinks, window, length=p + 1)
                for method in methods:
                    t0 = time.perf_counter()
                    sel = method.select(layer, q, k, sinks, window, length=p + 1)
                    sel_ms.setdefault(method.name, []).append((time.perf_counter() - t0) * 1e3)
                    m = selection_metrics(true, qkv.v[layer, :, : p + 1].float(), sel, orc, k, group, D ** -0.5, sinks, window)
                    row = acc.setdefault((method.name, budget), {})
                    row.setdefault("mass", []).append(float(m["mass"].mean()))
                    row.setdefault("oracle_mass", []).append(float(m["oracle_mass"].mean()))
                    row.setdefault("ratio", []).append(float((m["mass"] / m["oracle_mass"]).mean()))
                    row.setdefault("topk", []).append(float(m["topk_recall"].mean()))
                    row.setdefault("err", []).append(float(m["attn_rel_err"].mean()))
                    row.setdefault("count", []).append(float(sel.counts.float().mean()))
    return acc


def kl_rows(model, qkv, ids, methods, oracle, budgets, n_positions, sinks, window):
    """Teacher-forced sparse decoding of the last ``n_positions`` tokens: KL and perplexity change."""
    from kvrecall.retriever.attention import sparse_decode_logits
    from kvrecall.retriever.metrics import kl_and_ppl

    T = ids.numel()
    t0 = T - n_positions
    kv = qkv.kv()[..., :t0, :]
    dense = qkv.logits[t0:T]
    targets = torch.cat([ids[t0 + 1 : T], torch.tensor([-1])])
    out = {}
    for method in [oracle] + methods:
        for budget in budgets:
            logits = sparse_decode_logits(model, kv, ids[t0:T], method, budget, sinks, window)
            kl, ppl_d, ppl_s = kl_and_ppl(dense, logits, targets)
            out[(method.name, budget)] = (kl, 100.0 * (ppl_s - ppl_d) / ppl_d)
    return out


def latency_rows(methods, contexts, budget, reps):
    """Search time per decode step per layer over a synthetic index of ``T`` random codes."""
    from kvrecall.retriever.index import KeyIndex

    rows = []
    gen = torch.Generator().manual_seed(0)
    for method in methods:
        prof = getattr(method, "profile", None)
        if prof is None:
            continue
        s = prof.settings
        backends = ["torch"] + (["faiss"] if s.rope_mode != "positional" else [])
        for T in contexts:
            index = KeyIndex(prof)
            index.append_codes(0, torch.randint(0, 1 << s.bits, (s.num_kv_heads, T, s.m), generator=gen))
            q = torch.randn(1, s.num_heads, s.head_dim, generator=gen)
            for backend in backends:
                times = []
                for _ in range(reps + 1):
                    t = time.perf_counter()
                    index.select(0, q, budget, positions=torch.tensor([T - 1]), backend=backend)
                    times.append((time.perf_counter() - t) * 1e3)
                rows.append({"method": method.name, "backend": backend, "bits_per_key": float(s.bits_per_key),
                             "context": T, "budget": budget, "search_ms": statistics.median(times[1:])})
                print(f"  latency {method.name:28s} {backend:5s} T={T:7d}: {rows[-1]['search_ms']:.2f} ms", flush=True)
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["model"], r["context"]) for r in rows if r.get("mass_recall") is not None})
    if not keys:
        return
    models = list(dict.fromkeys(m for m, _ in keys))
    contexts = sorted({c for _, c in keys})
    fig, axes = plt.subplots(len(models), len(contexts), figsize=(4.2 * len(contexts), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, ctx in enumerate(contexts):
            ax = axes[i][j]
            sub = [r for r in rows if r["model"] == model and r["context"] == ctx and r.get("mass_recall") is not None]
            if not sub:
                ax.axis("off")
                continue
            for name in dict.fromkeys(r["method"] for r in sub if r["method"] != "oracle"):
                pts = sorted((r["budget"], r["mass_recall"]) for r in sub if r["method"] == name)
                ax.plot([100 * b for b, _ in pts], [v for _, v in pts], marker="o", label=name)
            pts = sorted({(r["budget"], r["oracle_mass"]) for r in sub})
            ax.plot([100 * b for b, _ in pts], [v for _, v in pts], "k--", label="oracle")
            label = f"{model} (ours)" if "hd64" in model else model
            ax.set_title(f"{label}, {ctx} tokens", fontsize=9)
            ax.set_xlabel("budget (% of context, + sinks + window)")
            ax.set_ylabel("attention-mass recall")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="stories260K at 2K tokens, small calibration (< 60 s)")
    ap.add_argument("--json", type=Path, help="write rows here (and a PNG beside it)")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--contexts", type=int, nargs="*", default=None)
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.01, 0.03, 0.10])
    ap.add_argument("--kl-budgets", type=float, nargs="*", default=None, help="budgets for KL (default: all)")
    ap.add_argument("--kl-max-context", type=int, default=None, help="skip KL above this context")
    ap.add_argument("--kl-all-budgets-max-context", type=int, default=8192,
                    help="above this context, KL only at the 3%% budget (CPU time)")
    ap.add_argument("--queries", type=int, default=None, help="decode queries per context for mass metrics")
    ap.add_argument("--kl-positions", type=int, default=None)
    ap.add_argument("--cal-tokens", type=int, default=None)
    ap.add_argument("--niter", type=int, default=None)
    ap.add_argument("--latency-contexts", type=int, nargs="*", default=None)
    ap.add_argument("--sinks", type=int, default=8)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(1 if args.quick else args.threads)
    from kvrecall.models import capture_qkv, load_model, long_token_ids, read_texts

    q = args.quick
    models = args.models or (["stories260K"] if q else ["smollm2-135m", "stories260K", "fixture-hd64"])
    contexts = args.contexts or ([2048] if q else [1024, 2048, 8192, 32768])
    n_queries = args.queries or (1 if q else 8)
    kl_positions = args.kl_positions or (4 if q else 16)
    cal_tokens = args.cal_tokens or (8192 if q else 32768)
    niter = args.niter or (4 if q else 8)
    lat_contexts = args.latency_contexts or ([32768] if q else [32768, 131072])
    kl_budgets = args.kl_budgets or ([0.03] if q else args.budgets)
    vq_bits = 10 if q else 12  # quick mode: 1,024 centroids so that calibration fits in the time limit
    specs = [
        (f"a2ats-vq{vq_bits} (windowed)", dict(kind="vq", bits=vq_bits, rope_mode="windowed")),
        (f"qa-vq{vq_bits}-positional", dict(kind="vq", bits=vq_bits, rope_mode="positional")),
        ("plain-pq2x8 (abs RoPE)", dict(kind="pq", m=2, bits=8, rope_mode="absolute", query_aware=False)),
    ]
    if not q:
        specs.insert(1, ("a2ats-pq2x8 (windowed)", dict(kind="pq", m=2, bits=8, rope_mode="windowed")))
        specs.insert(3, ("qa-pq2x8-positional", dict(kind="pq", m=2, bits=8, rope_mode="positional")))
    cal_texts = read_texts(SHARED / "data" / "texts" / "gutenberg")
    eval_texts = read_texts(SHARED / "data" / "texts" / "state_union")
    rows = []
    started = time.perf_counter()
    for model_name in models:
        path = model_spec(model_name)
        model, tok = load_model(path)
        print(f"== {model_name}", flush=True)
        cal_ids = long_token_ids(tok, cal_texts, cal_tokens)
        methods, oracle = build_methods(model, path, cal_ids, specs, niter, progress=not q)
        for T in contexts:
            t = time.perf_counter()
            ids = long_token_ids(tok, eval_texts, T)
            qkv = capture_qkv(model, ids)
            acc = quality_rows(model, qkv, methods, oracle, args.budgets, n_queries, args.sinks, args.window)
            kls = {}
            if args.kl_max_context is None or T <= args.kl_max_context:
                budgets_here = kl_budgets if T <= args.kl_all_budgets_max_context else [b for b in kl_budgets if b == 0.03]
                kls = kl_rows(model, qkv, ids, methods, oracle, budgets_here, kl_positions, args.sinks, args.window)
            for method in [oracle] + methods:
                for budget in args.budgets:
                    a = acc.get((method.name, budget)) or acc[(methods[0].name, budget)]
                    mean = lambda key: statistics.fmean(a[key])  # noqa: E731
                    is_oracle = method is oracle
                    kl, dppl = kls.get((method.name, budget), (None, None))
                    rows.append({
                        "model": model_name, "method": method.name, "bits_per_key": method.bits_per_key,
                        "context": T, "budget": budget,
                        "mass_recall": mean("oracle_mass") if is_oracle else mean("mass"),
                        "oracle_mass": mean("oracle_mass"),
                        "mass_ratio": 1.0 if is_oracle else mean("ratio"),
                        "topk_recall": 1.0 if is_oracle else mean("topk"),
                        "attn_rel_err": None if is_oracle else mean("err"),
                        "tokens_selected": None if is_oracle else mean("count"),
                        "kl": kl, "ppl_delta_pct": dppl, "search_ms": None,
                    })
            print(f"  context {T}: {time.perf_counter() - t:.1f}s", flush=True)
        for r in latency_rows(methods, lat_contexts, 0.03, 2 if q else 5):
            rows.append({"model": model_name, **r, "mass_recall": None, "oracle_mass": None, "topk_recall": None,
                         "attn_rel_err": None, "kl": None, "ppl_delta_pct": None})
    print(f"\ntotal {time.perf_counter() - started:.1f}s")
    hdr = f"{'model':13s} {'method':28s} {'bits':>5s} {'ctx':>6s} {'budget':>6s} {'mass':>6s} {'oracle':>6s} {'ratio':>6s} {'topk':>6s} {'err':>6s} {'KL':>8s} {'dppl%':>7s}"
    print(hdr)
    fmt = lambda v, f: ("-" if v is None else format(v, f))  # noqa: E731
    for r in rows:
        if r["mass_recall"] is None:
            continue
        print(f"{r['model']:13s} {r['method']:28s} {r['bits_per_key']:5.0f} {r['context']:6d} {r['budget']:6.2f} "
              f"{fmt(r['mass_recall'], '.3f'):>6s} {fmt(r['oracle_mass'], '.3f'):>6s} {fmt(r['mass_ratio'], '.3f'):>6s} "
              f"{fmt(r['topk_recall'], '.3f'):>6s} {fmt(r['attn_rel_err'], '.3f'):>6s} {fmt(r['kl'], '.4f'):>8s} {fmt(r['ppl_delta_pct'], '.2f'):>7s}")
    print(f"\n{'model':13s} {'method':28s} {'backend':7s} {'ctx':>7s} {'search_ms':>9s}  (median, 3% budget, 1 layer, 2 shared CPU threads)")
    for r in rows:
        if r.get("search_ms") is not None:
            print(f"{r['model']:13s} {r['method']:28s} {r['backend']:7s} {r['context']:7d} {r['search_ms']:9.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"argv": sys.argv[1:], "quick": q, "models": models, "contexts": contexts, "budgets": args.budgets,
                "queries_per_context": n_queries, "kl_positions": kl_positions, "cal_tokens": cal_tokens,
                "sinks": args.sinks, "window": args.window, "threads": args.threads,
                "calibration_texts": "shared/data/texts/gutenberg", "eval_texts": "shared/data/texts/state_union"}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        plot(rows, args.json.with_suffix(".png"))
        print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
