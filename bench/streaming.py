"""Streaming sessions: append latency and memory vs stream length, and passcode answers after the fact left the
window, for our block retrieval, ReKV-style mean-key retrieval, window only and full attention.

    python bench/streaming.py --quick --json bench/results/streaming-quick.json
    python bench/streaming.py --json bench/results/streaming-full.json

Part 1 (latency/memory): a text stream (``../shared/data/texts``) and a stream of synthetic frame embeddings
(``inputs_embeds``, random vectors at the embedding table's scale: latency and memory only, no quality claim) are
appended ``--segment`` tokens at a time up to the longest ``--lengths``; at each length the median latency of the
last ``--probe`` segments, the device-resident bytes (sinks + window KV), the host index bytes (FAISS mean keys
+ VQ codes), the offloaded block bytes and the process RSS are recorded; ratios are against the first length.

Part 2 (quality): per stream length in ``--qa-lengths``, ``--cases`` streams of text with a passcode planted at a
random depth (before the last window), the question asked after the stream. Methods on the same session:
``codes`` (ours: VQ-code attention mass per block, the ``--rerank`` x top blocks rescored from their decoded
keys, at least ``--rerank-fraction`` of all blocks, one vote of all layers), ``codes-r1`` (codes alone, no rerank), ``codes-layer`` (each layer its own blocks),
``mean-key`` (ReKV: FAISS over block mean keys, per layer, no rerank), ``mean-key-glob``, ``mean-key-rr`` (mean
keys as the first stage of the rerank), ``window`` (no retrieval), ``true-pos`` (codes, blocks at their true
positions), ``codes-pos`` (codes scored at true distances), and ``full`` (dense prefill of stream + question, up
to ``--full-max`` tokens). Reported: how often the block holding the fact is retrieved
(fraction of layers; "any" = at least one layer) and answer accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from kvrecall import defaults

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def model_spec(name: str):
    from kvrecall.models import MODEL_NAMES

    return name if name in MODEL_NAMES else SHARED / "models" / name


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def text_tokens(tok, texts_dir: Path, n: int, rng: random.Random) -> torch.Tensor:
    """``n`` token ids of books (shuffled order, so streams differ), without special tokens."""
    from kvrecall.models import read_texts

    books = [t for _, t in read_texts(texts_dir)]
    rng.shuffle(books)
    out, total = [], 0
    while total < n:
        for b in books:
            ids = tok(b, add_special_tokens=False).input_ids
            out.append(torch.tensor(ids))
            total += len(ids)
            if total >= n:
                break
    return torch.cat(out)[:n]


def sweep(model, tok, args, kind: str, rng) -> list[dict]:
    """Append up to max(lengths); record latency and memory at each length."""
    from tqdm import tqdm

    from kvrecall.stream_session import StreamSession

    top = max(args.lengths)
    s = StreamSession(model, retriever_profile=None, window=args.window, block=args.block, level=args.level,
                      ram_bytes=1 << 40)
    hidden = model.config.hidden_size
    scale = float(model.get_input_embeddings().weight.detach().std())
    ids = text_tokens(tok, args.texts, top, rng) if kind == "text" else None
    rows, marks = [], sorted(args.lengths)
    bar = tqdm(total=top, desc=f"append {kind}", unit="tok", file=sys.stdout)
    while s.n_tokens < top:
        n = min(args.segment, top - s.n_tokens)
        if kind == "text":
            s.append(input_ids=ids[s.n_tokens : s.n_tokens + n])
        else:
            s.append(inputs_embeds=torch.randn(1, n, hidden) * scale)
        bar.update(n)
        if marks and s.n_tokens >= marks[0]:
            st = s.stats()
            rows.append({"kind": kind, "length": s.n_tokens,
                         "append_ms_median": 1e3 * statistics.median(s.append_timings[-args.probe :]),
                         "append_cpu_ms_median": 1e3 * statistics.median(s.append_cpu_timings[-args.probe :]),
                         "resident_bytes": st["resident_bytes"], "index_bytes": st["index_bytes"],
                         "block_bytes": st["ram_block_bytes"] + st["disk_block_bytes"], "rss_bytes": rss_bytes(),
                         "blocks": st["blocks"]})
            marks.pop(0)
    bar.close()
    base = rows[0]
    for r in rows:
        r["append_ratio"] = r["append_ms_median"] / base["append_ms_median"]
        r["append_cpu_ratio"] = r["append_cpu_ms_median"] / base["append_cpu_ms_median"]
        r["resident_ratio"] = r["resident_bytes"] / base["resident_bytes"]
        r["resident_plus_index_ratio"] = (r["resident_bytes"] + r["index_bytes"]) / (
            base["resident_bytes"] + base["index_bytes"])
    return rows


QA_METHODS = ("full", "codes", "codes-r1", "codes-pos", "codes-layer", "mean-key", "mean-key-glob", "mean-key-rr",
              "true-pos", "window")
"""Table order of part 2's methods (``full`` first)."""


def qa(model, tok, args, profile, rng) -> list[dict]:
    from tqdm import tqdm

    from kvrecall.rag_decode import eos_ids, greedy_generate
    from kvrecall.rag_prompt import PromptLayout, passcode_sentence
    from kvrecall.stream_session import StreamSession

    layout = PromptLayout(tok)
    question = layout.encode("\n\nWhat is the passcode?" + layout._post)
    out = []
    for length in args.qa_lengths:
        for case in tqdm(range(args.cases), desc=f"passcode @{length}", file=sys.stdout):
            code = str(rng.randint(10000, 99999))
            body = text_tokens(tok, args.texts, length - layout.head_ids.numel(), rng)
            fact = layout.encode(passcode_sentence(code))
            room = length - layout.head_ids.numel() - args.window - fact.numel() - args.block
            at = rng.randint(args.block, max(args.block + 1, room))
            body = torch.cat([body[:at], fact, body[at : body.numel() - fact.numel()]])
            s = StreamSession(model, retriever_profile=profile, window=args.window, block=args.block,
                              top_blocks=args.top_blocks, level=args.level)
            s.append(input_ids=layout.head_ids)
            t0 = time.perf_counter()
            for i in range(0, body.numel(), args.segment):
                s.append(input_ids=body[i : i + args.segment])
            encode_s = time.perf_counter() - t0
            fact_blocks = {i for i, b in enumerate(s.block_token_ids) if code in tok.decode(b.tolist())}
            row = {"length": s.n_tokens, "case": case, "code": code, "depth": at / body.numel(),
                   "fact_blocks": sorted(fact_blocks), "encode_s": encode_s}
            base = dict(positions="contiguous", selection="global", rerank=args.rerank,
                        rerank_fraction=args.rerank_fraction)
            methods = [("codes", dict(base, scorer="codes")),
                       ("codes-r1", dict(base, scorer="codes", rerank=1)),
                       ("codes-layer", dict(base, scorer="codes", selection="per-layer")),
                       ("mean-key", dict(base, scorer="mean-key", selection="per-layer", rerank=1)),
                       ("mean-key-glob", dict(base, scorer="mean-key", rerank=1)),
                       ("mean-key-rr", dict(base, scorer="mean-key")),
                       ("window", dict(top_blocks=0)),
                       ("true-pos", dict(base, scorer="codes", positions="true")),
                       ("codes-pos", dict(base, scorer="codes-positional"))]
            for name, kw in methods:
                saved = {k: getattr(s, k) for k in kw}
                for k, v in kw.items():
                    setattr(s, k, v)
                ans = tok.decode(s.ask(question, max_new_tokens=args.max_new_tokens).tolist())
                for k, v in saved.items():
                    setattr(s, k, v)
                hit = [bool(fact_blocks & set(b)) for b in s.last.blocks]
                row[name] = {"correct": code in ans, "layers_hit": sum(hit) / len(hit), "any_hit": any(hit),
                             "ttft_s": s.last.timings["ttft_s"], "answer": ans}
            if s.n_tokens + question.numel() <= args.full_max:
                from transformers import DynamicCache

                prompt = torch.cat([layout.head_ids, body, question])
                res = greedy_generate(model, DynamicCache(config=model.config), prompt, 0, args.max_new_tokens,
                                      eos_ids(model))
                ans = tok.decode(res.tokens)
                row["full"] = {"correct": code in ans, "ttft_s": res.first_token_s, "answer": ans}
            out.append(row)
    return out


def summarize_qa(rows: list[dict]) -> list[dict]:
    table = []
    for length in sorted({r["length"] for r in rows}):
        rs = [r for r in rows if r["length"] == length]
        for name in QA_METHODS:
            got = [r[name] for r in rs if name in r]
            if not got:
                continue
            table.append({"length": length, "method": name, "cases": len(got),
                          "accuracy": sum(g["correct"] for g in got) / len(got),
                          "fact_layers_hit": (statistics.mean(g["layers_hit"] for g in got)
                                              if "layers_hit" in got[0] else None),
                          "fact_any_hit": (sum(g["any_hit"] for g in got) / len(got)
                                           if "any_hit" in got[0] else None),
                          "ttft_median_s": statistics.median(g["ttft_s"] for g in got)})
    return table


def plot(sweeps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in sorted({r["kind"] for r in sweeps}):
        rs = [r for r in sweeps if r["kind"] == kind]
        xs = [r["length"] for r in rs]
        a.plot(xs, [r["append_ms_median"] for r in rs], "o-", label=f"{kind}: wall")
        if "append_cpu_ms_median" in rs[0]:
            a.plot(xs, [r["append_cpu_ms_median"] for r in rs], "x--", label=f"{kind}: CPU (thread)")
        b.plot(xs, [r["resident_bytes"] / 2**20 for r in rs], "o-", label=f"{kind}: resident (sinks+window)")
        b.plot(xs, [(r["resident_bytes"] + r["index_bytes"]) / 2**20 for r in rs], "x--",
               label=f"{kind}: + host index")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stream length (tokens)")
        ax.legend(fontsize=7)
    a.set_ylabel("append latency per segment (ms, median)")
    b.set_ylabel("MiB")
    a.set_ylim(bottom=0)
    b.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sweep-model", default=None, help="model of part 1 (default: --model)")
    ap.add_argument("--texts", type=Path, default=SHARED / "data" / "texts")
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192, 32768, 65536])
    ap.add_argument("--qa-lengths", type=int, nargs="*", default=[2048, 8192, 32768])
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--top-blocks", type=int, default=8)
    ap.add_argument("--rerank", type=int, default=defaults.STREAM_RERANK,
                    help="candidates per retrieved block rescored from decoded keys (1: off)")
    ap.add_argument("--rerank-fraction", type=float, default=defaults.STREAM_RERANK_FRACTION,
                    help="the rerank shortlist holds at least this fraction of all blocks")
    ap.add_argument("--segment", type=int, default=256)
    ap.add_argument("--probe", type=int, default=16)
    ap.add_argument("--level", default="medium")
    ap.add_argument("--full-max", type=int, default=8192)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--cal-tokens", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine more threads oversubscribe, measured 13x slower)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-qa", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.sweep_model = args.sweep_model or "fixture-hd64"
        args.lengths, args.qa_lengths, args.cases = [1024, 2048, 4096], [1536], 2
        args.window, args.top_blocks, args.cal_tokens, args.bits = 256, 4, 1024, 6
    torch.set_num_threads(args.threads)
    from kvrecall.models import load_model, long_token_ids, read_texts
    from kvrecall.retriever import calibrate

    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    sweeps: list[dict] = []
    if not args.skip_sweep:
        sm, stok = load_model(model_spec(args.sweep_model or args.model))
        for kind in ("text", "frames"):
            sweeps += sweep(sm, stok, args, kind, rng)
        print(f"\npart 1 on {args.sweep_model or args.model}: window {args.window}, block {args.block}, "
              f"segments of {args.segment}")
        print(f"{'kind':<8}{'length':>8}{'append ms':>11}{'x first':>9}{'cpu ms':>9}{'x first':>9}"
              f"{'resident MiB':>14}{'x first':>9}"
              f"{'index MiB':>11}{'blocks MiB':>12}{'RSS MiB':>9}")
        for r in sweeps:
            print(f"{r['kind']:<8}{r['length']:>8}{r['append_ms_median']:>11.1f}{r['append_ratio']:>9.2f}"
                  f"{r['append_cpu_ms_median']:>9.1f}{r['append_cpu_ratio']:>9.2f}"
                  f"{r['resident_bytes'] / 2**20:>14.2f}{r['resident_ratio']:>9.2f}{r['index_bytes'] / 2**20:>11.2f}"
                  f"{r['block_bytes'] / 2**20:>12.2f}{r['rss_bytes'] / 2**20:>9.0f}")
    qa_rows, table = [], []
    if not args.skip_qa:
        model, tok = load_model(model_spec(args.model))
        cal = long_token_ids(tok, read_texts(args.texts / "state_union"), args.cal_tokens)
        profile = calibrate(model, cal, model_id=args.model, bits=args.bits, niter=5, chunk=1024, progress=False)
        qa_rows = qa(model, tok, args, profile, rng)
        table = summarize_qa(qa_rows)
        print(f"\npart 2 on {args.model}: window {args.window}, block {args.block}, top {args.top_blocks} blocks "
              f"per layer, {args.level} blocks")
        print(f"{'length':>7} {'method':<10}{'cases':>6}{'accuracy':>10}{'fact layers':>13}{'fact any':>10}"
              f"{'TTFT s':>8}")
        for r in table:
            fl = "-" if r["fact_layers_hit"] is None else f"{r['fact_layers_hit']:.2f}"
            fa = "-" if r["fact_any_hit"] is None else f"{r['fact_any_hit']:.2f}"
            print(f"{r['length']:>7} {r['method']:<10}{r['cases']:>6}{r['accuracy']:>10.2f}{fl:>13}{fa:>10}"
                  f"{r['ttft_median_s']:>8.2f}")
    out = {"bench": "streaming", "args": {k: str(v) for k, v in vars(args).items()}, "sweep": sweeps,
           "qa_table": table, "qa_cases": qa_rows, "wall_s": time.perf_counter() - t0}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        if sweeps:
            plot(sweeps, args.json.with_suffix(".png"))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
