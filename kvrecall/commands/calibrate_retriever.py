"""``kvrecall calibrate-retriever``: fit a retriever profile (query-aware key codebooks) for one model.

Every default comes from :mod:`kvrecall.defaults` (``RETRIEVER_*``), the same values the library's
:func:`kvrecall.retriever.calibrate` uses.
"""

from __future__ import annotations

import argparse

from kvrecall import defaults


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-retriever",
        help="calibrate the retriever's key codebooks for a model",
        description=(
            "Fit a retriever profile for one model: per (layer, KV head) the Cholesky factor of the query second "
            "moment and key codebooks trained with FAISS, saved as one safetensors file with JSON settings."
        ),
    )
    p.add_argument("--model", required=True, help="model folder (Hugging Face format, local) or a known name "
                                                  "(e.g. smollm2-135m)")
    p.add_argument("--texts", required=True, help="folder of .txt calibration texts (searched recursively)")
    p.add_argument("--out", required=True, help="profile file to write (.safetensors)")
    p.add_argument("--kind", choices=["vq", "pq"], default=defaults.RETRIEVER_KIND,
                   help="one codebook over the head dim (vq) or product quantization (pq)")
    p.add_argument("--m", type=int, default=defaults.RETRIEVER_PQ_M, help="pq sub-vectors (ignored for vq)")
    p.add_argument("--bits", type=int, default=defaults.RETRIEVER_BITS,
                   help="bits per sub-vector (vq: 12 = 4,096 centroids)")
    p.add_argument("--tokens", type=int, default=defaults.RETRIEVER_CALIBRATION_TOKENS, help="calibration tokens")
    p.add_argument("--chunk", type=int, default=None,
                   help=f"prefill chunk length (default: min(max positions, {defaults.RETRIEVER_CALIBRATION_CHUNK}))")
    p.add_argument("--rope-mode", choices=["windowed", "positional", "absolute"], default=defaults.RETRIEVER_ROPE_MODE,
                   help="positional = decoded keys scored at true positions (default; measured better on every model "
                        "here); windowed = A²ATS fixed-distance query rotation; absolute = plain post-RoPE codes")
    p.add_argument("--window-distance", type=int, default=defaults.RETRIEVER_WINDOW_DISTANCE,
                   help="windowed: the fixed relative position w; positional: the largest distance sampled for H")
    p.add_argument("--no-query-aware", action="store_true", help="identity transform instead of the Cholesky of H")
    p.add_argument("--niter", type=int, default=defaults.RETRIEVER_KMEANS_ITERATIONS, help="k-means iterations")
    p.add_argument("--seed", type=int, default=defaults.RETRIEVER_SEED)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    from kvrecall.retriever import RetrieverError

    for name in ("tokens", "bits", "m", "niter"):
        if getattr(args, name) < 1:
            raise RetrieverError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.chunk is not None and args.chunk < 1:
        raise RetrieverError(f"--chunk must be >= 1, got {args.chunk}")
    if args.window_distance < 0:
        raise RetrieverError(f"--window-distance must be >= 0, got {args.window_distance}")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from kvrecall.models import ModelError, load_model, long_token_ids, model_fingerprint, read_texts
    from kvrecall.retriever import RetrieverError, calibrate

    try:
        _check_args(args)
        model, tok = load_model(args.model)
        ids = long_token_ids(tok, read_texts(args.texts), args.tokens)
        profile = calibrate(
            model,
            ids,
            model_id=model_fingerprint(args.model),
            model_name=Path(str(args.model)).name,
            kind=args.kind,
            m=1 if args.kind == "vq" else args.m,
            bits=args.bits,
            chunk=args.chunk,
            window_distance=args.window_distance,
            rope_mode=args.rope_mode,
            query_aware=not args.no_query_aware,
            niter=args.niter,
            seed=args.seed,
            progress=not args.no_progress,
        )
        profile.save(args.out)
    except (ModelError, RetrieverError, OSError) as exc:
        print(f"calibrate-retriever: error: {exc}", file=sys.stderr)
        return 2
    s = profile.settings
    print(f"wrote {args.out}: {s.kind} {s.m}x{s.bits} bits = {s.bits_per_key} bits/key, rope {s.rope_mode}, "
          f"query-aware {s.query_aware}, {s.calibration['tokens']} tokens, model {s.model_id}")
    return 0
