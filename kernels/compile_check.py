"""Ahead-of-time compile every kernel for a CUDA target, without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but not that they compile for a real
GPU (types of loop-carried values, constexpr use, shapes Triton cannot lower). Triton ships ``ptxas``, so the
full pipeline ``ttir -> ttgir -> llir -> ptx -> cubin`` runs on any machine. Run it in a process where
``TRITON_INTERPRET`` is unset::

    python -m kvrecall.kernels.compile_check            # sm_90 (H100/H200)
    python -m kvrecall.kernels.compile_check --arch 80  # A100

It prints one line per variant with its shared memory and spill-free PTX size, and exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["variants", "compile_variant", "main"]


def _sig(names: str, types: dict[str, str], default: str = "i32") -> dict[str, str]:
    return {n: types.get(n, default) for n in names.split()}


def variants() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """``(label, kernel, signature, constexprs)`` for each kernel variant worth compiling."""
    from kvrecall.kernels import rans_decode, score_topk, sparse_attention

    out = []
    sa_args = (
        "Q K V KS KZ VS VZ IDX CNT COS SIN INV_FREQ ACC M L "
        "num_kv_heads num_q_heads selection_width tokens_per_split num_splits stride_qb stride_qh "
        "stride_kb stride_kh stride_kt stride_vb stride_vh stride_vt stride_ksb stride_ksh stride_ksg "
        "stride_vsb stride_vsh stride_ib stride_ih position_offset attention_scaling qk_scale_log2 "
        "GROUP GROUP_PAD HALF HALF_PAD DIM_PAD BLOCK_S BITS KEY_GROUP ROPE GATHERED USE_DOT"
    )
    for label, qt, kt, bits, rope, gathered in (
        ("fp16 kv, rope tables", "fp16", "fp16", 0, 1, False),
        ("bf16 q, int4 kv, inv_freq, gathered", "bf16", "u8", 4, 2, True),
        ("fp32, int8 kv, no rope", "fp32", "u8", 8, 0, False),
    ):
        types = {
            "Q": f"*{qt}", "K": f"*{kt}", "V": f"*{kt}", "KS": "*fp16", "KZ": "*fp16", "VS": "*fp16",
            "VZ": "*fp16", "IDX": "*i64", "CNT": "*i64", "COS": "*fp32", "SIN": "*fp32", "INV_FREQ": "*fp32",
            "ACC": "*fp32", "M": "*fp32", "L": "*fp32", "attention_scaling": "fp32", "qk_scale_log2": "fp32",
        }
        const = dict(GROUP=4, GROUP_PAD=16, HALF=64, HALF_PAD=64, DIM_PAD=128, BLOCK_S=sparse_attention.GPU_BLOCK_S,
                     BITS=bits, KEY_GROUP=32, ROPE=rope, GATHERED=gathered, USE_DOT=True)
        sig = _sig(sa_args, types)
        sig.update({c: "constexpr" for c in const})
        const["num_warps"] = sparse_attention.GPU_NUM_WARPS
        out.append((f"sparse_attention: {label}", sparse_attention._sparse_decode_kernel, sig, const))
    comb = "ACC M L OUT num_splits stride_ob stride_oh num_q_heads HEAD_DIM DIM_PAD SPLITS_PAD"
    const = dict(HEAD_DIM=128, DIM_PAD=128, SPLITS_PAD=16)
    sig = _sig(comb, {"ACC": "*fp32", "M": "*fp32", "L": "*fp32", "OUT": "*bf16"})
    sig.update({c: "constexpr" for c in const})
    out.append(("sparse_attention: combine splits", sparse_attention._combine_splits_kernel, sig, const))

    lut = ("Q CB LUT num_q_heads num_codes stride_qb stride_qh stride_cbh stride_cbm stride_cbk "
           "GROUP M M_PAD DSUB DSUB_PAD BLOCK_K")
    const = dict(GROUP=4, M=32, M_PAD=32, DSUB=4, DSUB_PAD=4, BLOCK_K=32)
    sig = _sig(lut, {"Q": "*fp16", "CB": "*fp16", "LUT": "*fp32"})
    sig.update({c: "constexpr" for c in const})
    out.append(("score_topk: LUT", score_topk._lut_kernel, sig, const))
    gat = "LUT CODES SCORES num_q_heads num_tokens num_codes stride_ch stride_ct GROUP M BLOCK_T"
    const = dict(GROUP=4, M=32, BLOCK_T=1024)
    sig = _sig(gat, {"LUT": "*fp32", "CODES": "*u8", "SCORES": "*fp32"})
    sig.update({c: "constexpr" for c in const})
    out.append(("score_topk: gather scores", score_topk._gather_scores_kernel, sig, const))
    sel = ("SCORES KTH NEED OUT_IDX OUT_CNT num_kv_heads num_tokens out_width sinks window_start "
           "GROUP GROUP_PAD BLOCK_T")
    const = dict(GROUP=4, GROUP_PAD=4, BLOCK_T=1024)
    sig = _sig(sel, {"SCORES": "*fp32", "KTH": "*fp32", "NEED": "*i32", "OUT_IDX": "*i64", "OUT_CNT": "*i64"})
    sig.update({c: "constexpr" for c in const})
    out.append(("score_topk: select", score_topk._select_kernel, sig, const))
    out.extend(rans_decode.compile_variants())
    return out


def compile_variant(kernel, signature: dict[str, str], constexprs: dict[str, object], arch: int):
    """Compile one kernel variant to a cubin for ``sm_<arch>``; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    options = {"num_warps": constexprs.pop("num_warps", 4)}
    if "enable_fp_fusion" in constexprs:
        options["enable_fp_fusion"] = constexprs.pop("enable_fp_fusion")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def register_report(compiled, arch: int) -> str:
    """Registers and spills of a compiled kernel from ``ptxas -v`` (Triton's bundled ptxas), or ``""``."""
    import glob
    import subprocess
    import tempfile

    import triton

    bins = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas*")))
    suffix = "a" if arch >= 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        for ptxas in reversed(bins):  # newest first (ptxas-blackwell reads newer PTX versions)
            run = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                lines = [ln.split(":", 1)[-1].strip() for ln in run.stderr.splitlines()
                         if "registers" in ln or "spill" in ln]
                return "; ".join(lines)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile every kvrecall Triton kernel for a CUDA target.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    failures = 0
    for label, kernel, sig, const in variants():
        try:
            compiled = compile_variant(kernel, sig, const, args.arch)
            shared = compiled.metadata.shared
            print(f"ok    sm_{args.arch}  {label}  (shared memory {shared} B; {register_report(compiled, args.arch)})")
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAIL  sm_{args.arch}  {label}: {type(exc).__name__}: {exc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
