"""RAG on SmolLM2-135M-Instruct: embedder recall@k, answer accuracy and time to first token per reuse mode.

    python bench/rag.py --quick --json bench/results/rag-quick.json
    python bench/rag.py --json bench/results/rag-full.json          # 200 passages of ~1K tokens, 10 questions

A corpus of passages cut from ``../shared/data/texts`` (each ``--passage-tokens`` long); in ``--cases`` of them a
keyed fact is planted ("The <word> passcode is <code>. ..."), and each question asks for one key. Per question:
recall@k of all-MiniLM-L6-v2 + FAISS, then the answer from the same top-k documents (fixed order) by

* ``full``          prefill of the whole prompt (the exact answer on this model),
* ``exact-prefix``  cold (only the first document's ``head + doc`` stored) and warm (the prefix stored whole
                    by the previous answer),
* ``independent``   every document's own KV re-positioned, with and without partial recompute (``--recompute``).

Reports accuracy (code in the answer), agreement with full prefill's greedy tokens, and median TTFT (retrieval +
load + prompt forward to the first token) with its ratio to full prefill. Runs in one process with an in-process
kvstore server on loopback.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WORDS = ["amber", "falcon", "granite", "harbor", "juniper", "lantern", "meadow", "nickel", "orchid", "pepper",
         "quartz", "raven", "saffron", "tundra", "velvet", "willow"]


def build_corpus(tok, texts_dir: Path, n: int, tokens: int, rng: random.Random) -> list[str]:
    """``n`` passages of about ``tokens`` tokens each, cut round-robin from the books under ``texts_dir``."""
    from kvrecall.models import read_texts

    books = [tok(text, add_special_tokens=False).input_ids for _, text in read_texts(texts_dir)]
    out, offsets = [], [2000] * len(books)
    while len(out) < n:
        progressed = False
        for b, ids in enumerate(books):
            if offsets[b] + tokens <= len(ids) and len(out) < n:
                out.append(tok.decode(ids[offsets[b] : offsets[b] + tokens]))
                offsets[b] += tokens + rng.randint(0, tokens)
                progressed = True
        if not progressed:
            raise SystemExit(f"texts under {texts_dir} hold fewer than {n} passages of {tokens} tokens")
    return out


def plant(passage: str, word: str, code: str, rng: random.Random) -> str:
    fact = f"\nThe {word} passcode is {code}. Remember it. {code} is the {word} passcode.\n"
    at = passage.rfind("\n", 0, int(len(passage) * rng.uniform(0.2, 0.8)))
    at = at if at > 0 else len(passage) // 2
    return passage[:at] + fact + passage[at:]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [r["mode"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(modes, [r["ttft_median_s"] for r in rows], color="tab:blue")
    a.set_ylabel("median TTFT (s)")
    a.set_title("time to first token")
    a.tick_params(axis="x", rotation=30)
    b.bar(modes, [r["accuracy"] for r in rows], color="tab:green", label="answer accuracy")
    b.plot(modes, [r["same_as_full"] for r in rows], "ko-", label="same tokens as full prefill")
    b.set_ylim(0, 1.05)
    b.set_title("quality")
    b.legend(loc="lower left")
    b.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="24 passages of 160 tokens, 2 questions (< 60 s idle)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--texts", type=Path, default=SHARED / "data" / "texts")
    ap.add_argument("--passages", type=int, default=200)
    ap.add_argument("--passage-tokens", type=int, default=1000)
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--recompute", type=float, default=0.15)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--level", default="exact")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine more threads oversubscribe, measured 13x slower)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.passages, args.passage_tokens, args.cases = 24, 160, 2
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from kvrecall.embedder import Embedder
    from kvrecall.kvstore import BackgroundServer, KVStoreClient, ServerConfig
    from kvrecall.models import load_model
    from kvrecall.rag import RagPipeline

    rng = random.Random(args.seed)
    model, tok = load_model(args.model)
    corpus = build_corpus(tok, args.texts, args.passages, args.passage_tokens, rng)
    planted = rng.sample(range(len(corpus)), args.cases)
    cases = []
    for i, p in enumerate(planted):
        word, code = WORDS[i % len(WORDS)] + ("" if i < len(WORDS) else str(i)), str(rng.randint(10000, 99999))
        corpus[p] = plant(corpus[p], word, code, rng)
        cases.append({"passage": p, "word": word, "code": code, "question": f"What is the {word} passcode?"})
    t0 = time.perf_counter()
    embedder = Embedder("all-MiniLM-L6-v2")
    config = ServerConfig(host="127.0.0.1", port=0, ram_bytes=4 << 30)
    modes = ["full", "exact-prefix cold", "exact-prefix warm", "independent", f"independent+recompute{args.recompute}"]
    results = {m: [] for m in modes}
    recall = {k: 0 for k in (1, 3, 5, 10)}
    with BackgroundServer(config) as srv:
        client = KVStoreClient(srv.target)
        rag = RagPipeline(model, store=client, embedder=embedder, tokenizer=tok, level=args.level,
                          model_id=f"bench-rag-{args.seed}-{time.time_ns()}")
        rag.add_documents(corpus, precompute=False)
        print(f"corpus: {len(corpus)} passages x {args.passage_tokens} tokens embedded in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        for case in tqdm(cases, desc="questions", file=sys.stdout):
            found, _ = rag.retrieve(case["question"], 10)
            for k in recall:
                recall[k] += case["passage"] in found[:k]
            sources = found[: args.k]
            first = min(sources)
            rag.ensure_stored([first])  # head + first document: what add_documents stores for exact-prefix
            run = {}
            for mode in tqdm(modes, desc="  modes", leave=False, file=sys.stdout):
                if mode.startswith("independent"):
                    rag.ensure_stored(sources)  # each document's KV, stored once
                    rag.recompute = args.recompute if "recompute" in mode else 0.0
                name = mode.split(" ")[0].split("+")[0]
                # time the retrieval too: answer() retrieves the same top-k again
                text = rag.answer(case["question"], k=args.k, max_new_tokens=args.max_new_tokens, mode=name)
                last = rag.last
                assert last.sources == sorted(sources)
                run[mode] = last
                results[mode].append({"ttft_s": last.timings["ttft_s"], "correct": case["code"] in text,
                                      "reused": last.reused_tokens, "prompt": int(last.prompt_ids.numel()),
                                      "recomputed": last.recomputed_tokens, "ids": last.ids, "text": text})
            rag.recompute = 0.0
            for mode in modes:
                results[mode][-1]["same_as_full"] = results[mode][-1]["ids"] == results["full"][-1]["ids"]
        client.close()
    full_ttft = statistics.median(r["ttft_s"] for r in results["full"])
    rows = []
    for mode in modes:
        rs = results[mode]
        ttft = statistics.median(r["ttft_s"] for r in rs)
        rows.append({"mode": mode, "cases": len(rs), "accuracy": sum(r["correct"] for r in rs) / len(rs),
                     "same_as_full": sum(r["same_as_full"] for r in rs) / len(rs), "ttft_median_s": ttft,
                     "ttft_speedup_vs_full": full_ttft / ttft, "prompt_tokens_median": statistics.median(
                         r["prompt"] for r in rs), "reused_tokens_median": statistics.median(r["reused"] for r in rs),
                     "recomputed_tokens_median": statistics.median(r["recomputed"] for r in rs),
                     "answers": [r["text"] for r in rs]})
    print(f"\nrecall@k of all-MiniLM-L6-v2 over {len(corpus)} passages ({len(cases)} questions): "
          + ", ".join(f"@{k} {v / len(cases):.2f}" for k, v in recall.items()))
    head = f"{'mode':<28}{'acc':>6}{'=full':>7}{'TTFT s':>9}{'x full':>8}{'prompt':>8}{'reused':>8}{'recomp':>8}"
    print(head)
    for r in rows:
        print(f"{r['mode']:<28}{r['accuracy']:>6.2f}{r['same_as_full']:>7.2f}{r['ttft_median_s']:>9.3f}"
              f"{r['ttft_speedup_vs_full']:>8.2f}{r['prompt_tokens_median']:>8.0f}{r['reused_tokens_median']:>8.0f}"
              f"{r['recomputed_tokens_median']:>8.0f}")
    out = {"bench": "rag", "args": {k: str(v) for k, v in vars(args).items()}, "model": args.model,
           "passages": len(corpus), "recall_at_k": {str(k): v / len(cases) for k, v in recall.items()}, "rows": rows,
           "wall_s": time.perf_counter() - t0}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        plot(rows, args.json.with_suffix(".png"))
        print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
