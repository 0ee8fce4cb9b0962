"""Kernel measurement: bitstream decode, code scoring + top-k, sparse vs dense decode attention, selected-row fetch.

Run from the repository root::

    python bench/kernels.py --quick --json bench/results/kernels-cpu-quick.json   # < 60 s
    python bench/kernels.py --json bench/results/kernels-gpu.json                 # on a CUDA machine

Each row is ``{"kernel", "shape", "device", "ms", "GBps", "floor_ms"}``: median time, achieved bytes per second
(bytes the operation must move / time) and the bandwidth floor (those bytes / the measured copy bandwidth of the
same memory). On a GPU the Triton kernels are timed (``triton.testing.do_bench``, median) against torch SDPA
(flash) at 32K/128K tokens and batch 1/8/32. Without a GPU the *reference paths* (torch on CPU) are timed and
labelled ``device="cpu (reference, torch)"``; Triton under the interpreter is never timed as if it were a GPU
figure (``--smoke`` runs the GPU code path on tiny shapes under the interpreter to check it, and prints no
timings). A bar plot of ms vs floor_ms goes beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CPU_LABEL = "cpu (reference, torch)"
CPU_PATH_LABEL = "cpu"
SMOKE_LABEL = "cpu (Triton interpreter smoke run: not a timing)"
GB = 1e9


@dataclass
class Row:
    kernel: str
    shape: str
    device: str
    ms: float
    GBps: float | None
    floor_ms: float | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer and smaller shapes (< 60 s)")
    p.add_argument("--json", type=Path, help="write rows here; a PNG plot goes beside it")
    p.add_argument("--cpu", action="store_true", help="time the CPU reference paths even when CUDA is present")
    p.add_argument("--smoke", action="store_true",
                   help="run the GPU code path on tiny shapes under TRITON_INTERPRET=1 (checks it; no figures)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row on CPU (median)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--budget", type=float, default=0.03, help="top-k budget as a fraction of the context")
    args = p.parse_args(argv)
    if args.smoke and args.json:
        p.error("--smoke produces no figures; drop --json")
    return args


# ---------------------------------------------------------------------------------------------------- timing
def cpu_median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_median_ms(fn) -> float:
    """Median CUDA time of ``fn()`` in ms (``triton.testing.do_bench``)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(device: torch.device, timer, nbytes: int) -> float:
    """Achieved bytes/s of a plain ``copy_`` of ``nbytes`` on ``device`` (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms / 1e3)


def host_to_device_bandwidth(device: torch.device, timer, nbytes: int) -> float:
    """Achieved bytes/s of a pinned host -> ``device`` copy of ``nbytes`` (plain memory on CPU)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ms = timer(lambda: dst.copy_(src, non_blocking=True))
    return nbytes / (ms / 1e3)


def row(kernel, shape, device, ms, nbytes, bandwidth) -> Row:
    floor = None if (nbytes is None or bandwidth is None) else nbytes / bandwidth * 1e3
    gbps = None if nbytes is None else nbytes / (ms / 1e3) / GB
    return Row(kernel, shape, device, round(ms, 4), None if gbps is None else round(gbps, 3),
               None if floor is None else round(floor, 4))


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass
class LayerInputs:
    q: torch.Tensor  # [B, Hq, D]
    k: torch.Tensor  # [B, Hkv, T, D] pre-RoPE
    v: torch.Tensor
    codebooks: torch.Tensor  # [Hkv, M, K, D/M]
    codes: torch.Tensor  # [Hkv, T, M]
    rope: object
    group: int


def make_inputs(batch, q_heads, kv_heads, tokens, dim, dtype, device, centroids=4096, m=1) -> LayerInputs:
    """Random inputs of one layer, generated on ``device`` (no host round trip for 17 GB of 128K x 32 KV)."""
    from kvrecall.kernels.rope import RopeSpec
    from kvrecall.models import rope_tables

    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    q = rand(batch, q_heads, dim)
    k = rand(batch, kv_heads, tokens, dim)
    v = rand(batch, kv_heads, tokens, dim)
    codebooks = rand(kv_heads, m, centroids, dim // m)
    code_dtype = torch.int16 if centroids <= 32768 else torch.int32
    codes = torch.randint(0, centroids, (kv_heads, tokens, m), generator=g, device=device, dtype=code_dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rope = RopeSpec.from_tables(*rope_tables(inv_freq, torch.arange(tokens))).to(device)
    return LayerInputs(q, k, v, codebooks, codes, rope, q_heads // kv_heads)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------------------ CPU suite
def cpu_suite(args) -> list[Row]:
    """Reference paths (torch on CPU): what the kernels replace, timed on this machine."""
    from kvrecall.kernels.fetch import SelectedRowFetcher
    from kvrecall.kernels.sparse_attention import sparse_decode_attention_reference
    from kvrecall.retriever.scoring import lut_scores
    from kvrecall.retriever.selection import resolve_budget, select_from_scores

    dev = torch.device("cpu")
    repeats = args.repeats or (3 if args.quick else 5)
    timer = lambda fn: cpu_median_ms(fn, repeats)  # noqa: E731
    bw = copy_bandwidth(dev, timer, 1 << 28)
    rows = [Row("copy (memory bandwidth)", "256 MiB", CPU_PATH_LABEL, round(2 * (1 << 28) / bw * 1e3, 4),
                round(bw / GB, 3), None)]
    configs = [(1, 8192), (1, 32768)] if args.quick else [(1, 32768), (8, 32768), (1, 131072)]
    hq, hkv, d = 32, 8, 128
    for batch, tokens in configs:
        x = make_inputs(batch, hq, hkv, tokens, d, torch.float32, dev)
        shape = f"B{batch} T{tokens} Hq{hq} Hkv{hkv} D{d} fp32"
        k_top = resolve_budget(args.budget, tokens)
        # scoring + top-k (retriever torch path; the Triton kernel's twin)
        scores_ms = timer(lambda: lut_scores(x.q, x.codebooks, x.codes, x.group))
        scores = lut_scores(x.q, x.codebooks, x.codes, x.group)
        select_ms = timer(lambda: select_from_scores(scores, x.group, k_top))
        sel = select_from_scores(scores, x.group, k_top)
        score_bytes = nbytes(x.codes, x.codebooks, x.q)
        rows.append(row("score+topk (lut_scores + select_from_scores)", f"{shape} k={k_top} VQ K=4096",
                        CPU_LABEL, scores_ms + select_ms, score_bytes, bw))
        # sparse attention over the selection vs dense SDPA over everything
        width = sel.indices.shape[2]
        sparse_bytes = 2 * batch * hkv * width * d * 4 + nbytes(sel.indices)
        rows.append(row("sparse attention (gather+RoPE+softmax)", f"{shape} S={width}", CPU_LABEL,
                        timer(lambda: sparse_decode_attention_reference(x.q, x.k, x.v, sel.indices, sel.counts,
                                                                        rope=x.rope)),
                        sparse_bytes, bw))
        dense_ms = timer(lambda: dense_sdpa(x))
        rows.append(row("dense attention (torch SDPA)", shape, CPU_LABEL, dense_ms, nbytes(x.k, x.v), bw))
        # selected-row fetch (the real CPU path of kernels/fetch.py: gather into a reusable buffer)
        k16, v16 = x.k.to(torch.float16), x.v.to(torch.float16)
        fetcher = SelectedRowFetcher(k16, v16, max_selected=width, device="cpu")
        fetched = fetcher.fetch(sel.indices, sel.counts)
        rows.append(row("fetch selected rows (gather, fp16)", f"B{batch} T{tokens} Hkv{hkv} D{d} fp16 S={width}", CPU_PATH_LABEL,
                        timer(lambda: fetcher.fetch(sel.indices, sel.counts)), 2 * fetched.nbytes, bw))
        del x, k16, v16, fetcher
    rows.extend(rans_rows(dev, timer, bw, args, CPU_LABEL, kernel=False))
    return rows


def dense_sdpa(x: LayerInputs) -> torch.Tensor:
    """Dense decode attention over all ``T`` tokens with GQA (what a full cache costs per layer).

    The ``group`` query heads of a KV head are passed as ``group`` queries of that head, so SDPA reads each K/V
    head once (flash backend on GPU) instead of expanding K/V per query head.
    """
    b, hq, d = x.q.shape
    hkv = x.k.shape[1]
    q = x.q.reshape(b, hkv, hq // hkv, d)
    return torch.nn.functional.scaled_dot_product_attention(q, x.k, x.v).reshape(b, hq, d)


def rans_rows(dev, timer, bw, args, label, kernel: bool, tiny: bool = False) -> list[Row]:
    """Bitstream decode rows (see kernels/rans_decode.py)."""
    from kvrecall.kernels import rans_decode

    return rans_decode.bench_rows(dev, timer, bw, args.quick, label, row, kernel=kernel, tiny=tiny)


# ------------------------------------------------------------------------------------------------ GPU suite
def gpu_suite(args, device: torch.device, timer, label: str, smoke: bool = False) -> list[Row]:
    """Triton kernels on ``device``; with ``smoke`` tiny shapes under the interpreter (no figures)."""
    from kvrecall.kernels.fetch import SelectedRowFetcher
    from kvrecall.kernels.score_topk import score_topk
    from kvrecall.kernels.sparse_attention import sparse_decode_attention
    from kvrecall.retriever.selection import resolve_budget

    bw = copy_bandwidth(device, timer, (1 << 16) if smoke else (1 << 30))
    rows = [Row("copy (memory bandwidth)", "1 GiB" if not smoke else "64 KiB", label,
                round(2 * ((1 << 16) if smoke else (1 << 30)) / bw * 1e3, 4), round(bw / GB, 3), None)]
    if smoke:
        token_list, batch_list, hq, hkv, d, centroids = [150], [2], 4, 2, 16, 16
    else:
        token_list = [32768] if args.quick else [32768, 131072]
        batch_list = [1, 8] if args.quick else [1, 8, 32]
        hq, hkv, d, centroids = 32, 8, 128, 4096
    for tokens in token_list:
        for batch in batch_list:
            x = make_inputs(batch, hq, hkv, tokens, d, torch.float16, device, centroids=centroids)
            shape = f"B{batch} T{tokens} Hq{hq} Hkv{hkv} D{d} fp16"
            k_top = resolve_budget(args.budget, tokens)
            score_ms = timer(lambda: score_topk(x.q, x.codebooks, x.codes, x.group, k_top, validate=False))
            sel = score_topk(x.q, x.codebooks, x.codes, x.group, k_top)
            rows.append(row("score+topk (Triton)", f"{shape} k={k_top} VQ K={centroids}", label, score_ms,
                            nbytes(x.codes, x.codebooks, x.q), bw))
            width = sel.indices.shape[2]
            sparse_ms = timer(lambda: sparse_decode_attention(x.q, x.k, x.v, sel.indices, sel.counts, rope=x.rope,
                                                              validate=False))
            sparse_bytes = 2 * batch * hkv * width * d * 2 + nbytes(sel.indices)
            rows.append(row("sparse attention (Triton, RoPE fused)", f"{shape} S={width}", label, sparse_ms,
                            sparse_bytes, bw))
            dense_ms = timer(lambda: dense_sdpa(x))
            rows.append(row("dense attention (torch SDPA)", shape, label, dense_ms, nbytes(x.k, x.v), bw))
            rows.append(row("score+topk+sparse per layer", f"{shape} budget={args.budget:g}", label,
                            score_ms + sparse_ms, None, None))
            if not smoke:
                print(f"  {shape}: retrieval layer / dense = {(score_ms + sparse_ms) / dense_ms:.3f}")
            del x
    # fetch: selected rows of a host-resident context to the device
    tokens = 150 if smoke else 131072
    host = make_inputs(1, hq, hkv, tokens, d, torch.float16, torch.device("cpu"), centroids=centroids)
    k_top = resolve_budget(args.budget, tokens)
    from kvrecall.kernels.testing import random_selection

    idx, cnt = random_selection(1, hkv, tokens, min(tokens, 8 + 64 + 4 * k_top))
    fetcher = SelectedRowFetcher(host.k, host.v, max_selected=idx.shape[2], device=device)
    fetched = fetcher.fetch(idx, cnt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wall = lambda fn: cpu_median_ms(lambda: (fn(), sync()), 1 if smoke else 20, 0 if smoke else 3)  # noqa: E731
    h2d = host_to_device_bandwidth(device, wall, (1 << 16) if smoke else (1 << 28))
    fetch_ms = wall(lambda: fetcher.fetch(idx, cnt).wait().release())
    rows.append(Row("copy host->device (pinned)", "64 KiB" if smoke else "256 MiB", label,
                    round(((1 << 16) if smoke else (1 << 28)) / h2d * 1e3, 4), round(h2d / GB, 3), None))
    rows.append(row("fetch selected rows host->device (fp16, wall)", f"T{tokens} Hkv{hkv} D{d} S={idx.shape[2]}",
                    label, fetch_ms, fetched.nbytes, h2d))
    rows.extend(rans_rows(device, timer, bw, args, label, kernel=True, tiny=smoke))
    return rows


# ------------------------------------------------------------------------------------------------- output
def print_table(rows: list[Row]) -> None:
    head = f"{'kernel':44s} {'shape':44s} {'device':26s} {'ms':>10s} {'GB/s':>9s} {'floor ms':>9s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        gbps = "-" if r.GBps is None else f"{r.GBps:9.2f}"
        floor = "-" if r.floor_ms is None else f"{r.floor_ms:9.3f}"
        print(f"{r.kernel[:44]:44s} {r.shape[:44]:44s} {r.device[:26]:26s} {r.ms:10.3f} {gbps:>9s} {floor:>9s}")


def plot(rows: list[Row], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    timed = [r for r in rows if r.floor_ms is not None]
    if not timed:
        return
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(timed) + 1.5))
    labels = [f"{r.kernel} | {r.shape}" for r in timed]
    ypos = range(len(timed))
    ax.barh([y + 0.2 for y in ypos], [r.ms for r in timed], height=0.4, label="measured")
    ax.barh([y - 0.2 for y in ypos], [r.floor_ms for r in timed], height=0.4, label="bandwidth floor")
    ax.set_yticks(list(ypos), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("ms (log)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu and not args.smoke
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        rows = gpu_suite(args, torch.device("cpu"), lambda fn: cpu_median_ms(fn, 1, 0), SMOKE_LABEL, smoke=True)
        print(f"smoke run of the GPU code path passed ({len(rows)} rows; interpreter timings are not figures)")
        return 0
    t0 = time.perf_counter()
    if cuda:
        device = torch.device("cuda")
        label = torch.cuda.get_device_name(device)
        rows = gpu_suite(args, device, gpu_median_ms, label)
        note = "Triton kernels timed on the GPU (median of triton.testing.do_bench)"
    else:
        rows = cpu_suite(args)
        note = ("No GPU: these are the torch reference paths on CPU (and the CPU fetch path). "
                "GPU figures (decode GB/s, score+top-k at 32K/128K, sparse vs dense attention) are still to be "
                "measured: run this script on a CUDA machine.")
    print_table(rows)
    print(note)
    if args.json:
        import triton

        meta = {
            "command": "python bench/kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "note": note,
            "gpu": cuda,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 1),
            "caveat": "shared machine: CPU timings are noisy medians" if not cuda else "",
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=2))
        title = (f"kvrecall kernels on {label} (median ms vs bandwidth floor)" if cuda else
                 "kvrecall kernels: CPU reference paths, no GPU figures (median ms vs bandwidth floor)")
        plot(rows, args.json.with_suffix(".png"), title)
        print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
