"""rANS decode speed: the numpy lockstep decoder against the native (C) one, on real codec streams.

Run from the repository root::

    python bench/rans_native.py --quick --json bench/results/rans-native-quick.json   # < 60 s
    python bench/rans_native.py --json bench/results/rans-native.json

For each model: a codec profile is calibrated (``CodecProfile.calibrate``) on the prefill KV of ``--calib-texts``,
the prefill KV of ``--n-texts`` evaluation texts is split into ``--chunk``-token chunks and encoded at each level
(``kvrecall.encoder.encode``), and the chunks of one level are parsed into one set of lockstep-decoder arguments
exactly as ``decode_many`` builds them. Then ``decode_lockstep`` (numpy) and ``decode_lockstep_native`` (C) decode
the same arguments, alternating, ``--repeats`` times each; the outputs must be identical. Speeds are medians, in
MB/s of fp16-equivalent output (2 bytes per decoded symbol) and in million symbols per second, single thread.
Encode speed of ``encode_lockstep`` vs ``encode_lockstep_native`` on the same symbols is reported as well, and the
native decoder's CPU time (this process only), its speed on uint16 words (no widening copy) and the stream-major
``decode_streams_native``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL_LABELS = {"fixture-hd64": "fixture-hd64 (ours)"}
TARGET_MBPS = 200.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer texts, levels and repeats (< 60 s)")
    p.add_argument("--json", type=Path, help="write results here; a bar plot goes beside it (.png)")
    p.add_argument("--models", nargs="+", default=None,
                   help="model names or folders (kvrecall.models.load_model); the first is the primary model "
                        "(default: smollm2-135m, fixture-hd64, stories260K; quick: fixture-hd64, stories260K)")
    p.add_argument("--texts", type=Path, default=SHARED / "data" / "texts" / "state_union", help="evaluation texts")
    p.add_argument("--calib-texts", type=Path, default=SHARED / "data" / "texts" / "gutenberg")
    p.add_argument("--n-texts", type=int, help="evaluation texts per model (default 2 quick, 6 full)")
    p.add_argument("--n-calib", type=int, help="calibration texts per model (default 3 quick, 8 full)")
    p.add_argument("--context", type=int, default=512, help="tokens of each text (whole chunks)")
    p.add_argument("--chunk", type=int, default=256, help="tokens per encoded chunk")
    p.add_argument("--repeats", type=int, help="timing repeats per decoder (median; default 3 quick, 7 full)")
    p.add_argument("--threads", type=int, default=1, help="threads per native decode call (KVRECALL_NATIVE_THREADS)")
    args = p.parse_args(argv)
    args.n_texts = args.n_texts or (2 if args.quick else 6)
    args.n_calib = args.n_calib or (3 if args.quick else 8)
    args.repeats = args.repeats or (3 if args.quick else 7)
    if args.models is None:
        small = [str(SHARED / "models" / "fixture-hd64"), str(SHARED / "models" / "stories260K")]
        args.models = small if args.quick else ["smollm2-135m"] + small
    for name in ("n_texts", "n_calib", "context", "chunk", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def kv_samples(model, tok, texts_dir: Path, n: int, tokens: int) -> list:
    """Prefill KV ``[L, 2, H, T, D]`` (keys pre-RoPE) of the first ``n`` texts holding ``tokens`` tokens."""
    from kvrecall.models import prefill_kv, read_texts, tokenize

    out = []
    for _, text in read_texts(texts_dir):
        ids = tokenize(tok, text, tokens)
        if len(ids) >= tokens:
            out.append(prefill_kv(model, ids))
        if len(out) == n:
            break
    if not out:
        raise SystemExit(f"no text under {texts_dir} holds {tokens} tokens")
    return out


def lockstep_args(blobs: list[bytes], profile) -> dict:
    """The ``decode_lockstep`` arguments ``decode_many`` builds for ``blobs`` (one level: one table set, one G)."""
    from kvrecall.encoder import parse_chunk

    parts = [parse_chunk(b, profile) for b in blobs]
    if len({(p.table_key, p.header.channels_per_stream) for p in parts}) != 1:
        raise SystemExit("chunks of one level must share tables and G")
    ts, group = parts[0].tables, parts[0].header.channels_per_stream
    words = np.concatenate(
[p.payload_words() for p in parts]).astype(np.uint32)
    base = np.cumsum([0] + [p.header.payload_words for p in parts])[:-1]
    starts = np.concatenate([p.header.stream_word_offsets + b for p, b in zip(parts, base)]).astype(np.int64)
    ends = starts + np.concatenate([p.header.stream_word_counts for p in parts]).astype(np.int64)
    lengths = np.concatenate([np.full(p.header.n_streams, p.header.symbols_per_stream) for p in parts]).astype(np.int64)
    tabs = np.concatenate([p.stream_tables() for p in parts])
    return {"words": words, "starts": starts, "lengths": lengths, "table_cols": np.ascontiguousarray(tabs.T),
            "tables": ts.rans, "ends": ends, "value_lut": ts.value_lut}


def time_pair(fn_a, fn_b, repeats: int) -> tuple[dict, dict, object, object]:
    """Median wall and CPU seconds of ``fn_a`` and ``fn_b``, run alternately (both see the same machine load).

    Returns ``({"wall": s, "cpu": s}, {"wall": s, "cpu": s}, last result of a, last result of b)``; CPU time is this
    process's (the decoders are single-threaded), so ``cpu`` shows the speed without time lost to other processes.
    """
    times: list[dict[str, list[float]]] = [{"wall": [], "cpu": []}, {"wall": [], "cpu": []}]
    results: list[object] = [None, None]
    for _ in range(repeats):
        for j, fn in enumerate((fn_a, fn_b)):
            w0, c0 = time.perf_counter(), time.process_time()
            results[j] = fn()
            times[j]["cpu"].append(time.process_time() - c0)
            times[j]["wall"].append(time.perf_counter() - w0)
    med = [{k: statistics.median(v) for k, v in t.items()} for t in times]
    return med[0], med[1], results[0], results[1]


def run_model(path: str, args: argparse.Namespace, native) -> list[dict]:
    import kvrecall.encoder as enc
    from kvrecall.encoder.rans import decode_lockstep, encode_lockstep
    from kvrecall.models import load_model, model_fingerprint

    model, tok = load_model(path)
    label = MODEL_LABELS.get(Path(path).name, Path(path).name)
    calib = kv_samples(model, tok, args.calib_texts, args.n_calib, args.context)
    profile = enc.CodecProfile.calibrate(calib, model_fingerprint(path))
    # the format-1 decode path: no per-token value scales, no exact tokens (same coder, same tables layout)
    plain = enc.CodecProfile.calibrate(calib, model_fingerprint(path), value_token_scales=False)
    no_exact = torch.zeros(0, dtype=torch.int64)
    kvs = kv_samples(model, tok, args.texts, args.n_texts, args.context)
    chunks = [kv[:, :, :, s : s + args.chunk].contiguous() for kv in kvs for s in range(0, kv.shape[3], args.chunk)]
    levels = ["medium"] if args.quick else list(enc.LEVELS)
    rows = []
    for level in levels:
        blobs = [enc.encode(c, profile, level) for c in chunks]
        a = lockstep_args(blobs, profile)
        symbols = int(a["lengths"].sum())
        t_np, t_c, ref, got = time_pair(lambda: decode_lockstep(**a), lambda: native.decode_lockstep_native(**a),
                                        args.repeats)
        if ref.shape != got.shape or ref.dtype != got.dtype or not np.array_equal(ref, got):
            raise SystemExit(f"{label} {level}: native decode differs from decode_lockstep")
        words16 = a["words"].astype(np.uint16)  # what a caller that skips the uint32 widening passes
        a16 = dict(a, words=words16)
        t_rows, t_sm, got_rows, got_sm = time_pair(lambda: native.decode_lockstep_native(**a16),
                                                   lambda: native.decode_streams_native(**a16), args.repeats)
        if not (np.array_equal(got_rows, ref) and np.array_equal(got_sm, ref.T)):
            raise SystemExit(f"{label} {level}: native decode (uint16 words / stream-major) differs")
        # encode: the symbols those streams hold (alphabet indices), as encode_many passes them
        sym = decode_lockstep(a["words"], a["starts"], a["lengths"], a["table_cols"], a["tables"], a["ends"])
        sym = np.ascontiguousarray(sym.T).astype(np.int64)
        cols = np.ascontiguousarray(a["table_cols"].T)
        e_np, e_c, (w_ref, c_ref), (w_got, c_got) = time_pair(
            lambda: encode_lockstep(sym, cols, a["tables"]), lambda: native.encode_lockstep_native(sym, cols, a["tables"]),
            max(1, args.repeats // 2))
        if not (np.array_equal(w_ref, w_got) and np.array_equal(c_ref, c_got)):
            raise SystemExit(f"{label} {level}: native encode differs from encode_lockstep")
        fp16 = symbols * 2 / 1e6
        # whole-codec decode (rANS + escapes + dequantize): format-1 path vs format 2 (value scales, sinks)
        blobs_v1 = [enc.encode(c, plain, level, exact_tokens=no_exact) for c in chunks]
        t_v1, t_v2, _, _ = time_pair(lambda: enc.decode_many(blobs_v1, plain), lambda: enc.decode_many(blobs, profile),
                                     args.repeats)
        rows.append({
            "codec_decode_v1path_cpu_MBps": fp16 / t_v1["cpu"], "codec_decode_v2_cpu_MBps": fp16 / t_v2["cpu"],
            "codec_decode_v2_over_v1": t_v1["cpu"] / t_v2["cpu"],
            "model": label, "level": level, "chunks": len(blobs), "streams": int(a["starts"].size),
            "symbols": symbols, "bits_per_symbol": float(a["ends"][-1] - a["starts"][0]) * 16 / symbols,
            "decode_numpy_MBps": fp16 / t_np["wall"], "decode_native_MBps": fp16 / t_c["wall"],
            "decode_native_cpu_MBps": fp16 / t_c["cpu"], "decode_native_u16_MBps": fp16 / t_rows["wall"],
            "decode_native_stream_major_MBps": fp16 / t_sm["wall"],
            "decode_native_Msym_s": symbols / t_c["wall"] / 1e6, "decode_speedup": t_np["wall"] / t_c["wall"],
            "encode_numpy_MBps": fp16 / e_np["wall"], "encode_native_MBps": fp16 / e_c["wall"],
            "encode_speedup": e_np["wall"] / e_c["wall"],
        })  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':20} {'level':7} {'symbols':>8} {'b/sym':>5} | {'numpy':>6} {'C':>6} {'C cpu':>6} {'C u16':>6} "
            f"{'C s-maj':>7} {'Msym/s':>6} {'x':>4} | {'enc np':>6} {'enc C':>6} {'x':>4} | {'dec v1':>6} {'dec v2':>6} "
            f"{'v2/v1':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:20} {r['level']:7} {r['symbols']:8d} {r['bits_per_symbol']:5.2f} | "
              f"{r['decode_numpy_MBps']:6.1f} {r['decode_native_MBps']:6.1f} {r['decode_native_cpu_MBps']:6.1f} "
              f"{r['decode_native_u16_MBps']:6.1f} {r['decode_native_stream_major_MBps']:7.1f} "
              f"{r['decode_native_Msym_s']:6.1f} {r['decode_speedup']:4.0f} | "
              f"{r['encode_numpy_MBps']:6.1f} {r['encode_native_MBps']:6.1f} {r['encode_speedup']:4.0f} | "
              f"{r['codec_decode_v1path_cpu_MBps']:6.1f} {r['codec_decode_v2_cpu_MBps']:6.1f} "
              f"{r['codec_decode_v2_over_v1']:5.2f}")
    print("MB/s of fp16-equivalent output (2 bytes per symbol), medians. numpy = decode_lockstep; "
          "C = decode_lockstep_native on the same arguments (uint32 words), wall time; C cpu = the same runs timed by "
          "this process's CPU time (excludes time the CPU spent on other processes); "
          "C u16 = uint16 words; C s-maj = decode_streams_native ([S, n] output). dec v1 / dec v2 = the whole codec's "
          "decode_many in CPU time, format-1 path (no value scales, no exact tokens) vs format 2; v2/v1 = speed ratio. "
          f"Decode target >= {TARGET_MBPS:.0f} MB/s. Timings are noisy when other processes share the CPU.")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['model']}\n{r['level']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    ax.bar(x - 0.2, [r["decode_numpy_MBps"] for r in rows], 0.4, label="numpy decode_lockstep")
    ax.bar(x + 0.2, [r["decode_native_MBps"] for r in rows], 0.4, label="native (C)")
    ax.axhline(TARGET_MBPS, color="k", ls="--", lw=1, label=f"target {TARGET_MBPS:.0f} MB/s")
    ax.set_yscale("log")
    ax.set_xticks(x, names, fontsize=7)
    ax.set_ylabel("decode MB/s (fp16-equivalent)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from kvrecall.encoder import native

    if not native.available():
        raise SystemExit(f"native rANS path unavailable: {native.unavailable_reason()}")
    torch.set_num_threads(1)
    os.environ["KVRECALL_NATIVE_THREADS"] = str(args.threads)
    native.decode_threads()  # validates the value
    rows = []
    for path in tqdm(args.models, desc="models", unit="model"):
        rows.extend(run_model(path, args, native))
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"quick": args.quick, "context": args.context, "chunk": args.chunk, "repeats": args.repeats,
                "native_threads": args.threads,
                "n_texts": args.n_texts, "n_calib": args.n_calib, "machine": platform.platform(),
                "processor": platform.processor(), "note": "single thread, medians; shared CPU, timings are noisy"}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        plot(rows, args.json.with_suffix(".png"))
        print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
