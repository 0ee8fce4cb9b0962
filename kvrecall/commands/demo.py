"""``kvrecall demo``: the main job: store a long context once, answer from it three ways."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvrecall import defaults


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="main job: plant a passcode in a long text, prefill+store, load in a new client, load into retrieval",
        description=(
            "Start a kvstore server on loopback with a temporary directory, plant a five-digit passcode in a long "
            "text and ask the model for it: request 1 prefills, stores the KV chunks compressed and answers; "
            "request 2 (a new client, as another process would) loads the chunks and answers; request 3 loads the "
            "same chunks into a RetrievalCache (top-k per decode step) and answers. Prints one table."
        ),
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="model folder or name (default smollm2-135m, converted once on first use)")
    p.add_argument("--fast", action="store_true",
                   help="a fast run on stories260K (found at TEXTS/../../models/stories260K unless --model is a "
                        "folder): 400-token context; the tiny model will not find the passcode")
    p.add_argument("--texts", type=Path, required=True, help="folder of .txt files (searched recursively)")
    p.add_argument("--tokens", type=int, default=None,
                   help="context tokens before the question (default 2048; 400 with --fast)")
    p.add_argument("--level", default=defaults.CODEC_LEVEL,
                   help=f"stored level: codec level, fp16, exact or auto (default {defaults.CODEC_LEVEL})")
    p.add_argument("--chunk-tokens", type=int, default=defaults.CHUNK_TOKENS)
    p.add_argument("--budget", type=float, default=defaults.RETRIEVAL_BUDGET,
                   help="retrieval budget of request 3 (default 0.03)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvrecall.demo import DemoConfig, run_demo

    model, tokens, calib = args.model, args.tokens or 2048, 1024
    if args.fast:
        if not Path(str(model)).is_dir():
            model = args.texts.resolve().parent.parent / "models" / "stories260K"
        tokens, calib = args.tokens or 400, 512
    cfg = DemoConfig(model=model, texts=args.texts, context_tokens=tokens, level=args.level,
                     chunk_tokens=args.chunk_tokens, budget=args.budget, calib_tokens=calib,
                     retriever_bits=6 if args.fast else 8, progress=not args.no_progress)
    result = run_demo(cfg)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
