"""``kvrecall demo``: the main job, end to end on a real model and real texts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="end-to-end demo: encode a real context's KV, store it in kvstore, load it back, retrieve top-k",
        description=(
            "Run the whole pipeline on a real model: calibrate a codec profile, prefill a held-out text, store its KV "
            "chunks compressed in a kvstore server on loopback, load the cached prefix back for a new request and "
            "continue from it (KL, top-1 agreement and perplexity against recompute), then decode a longer context "
            "with retrieval attention over vector-quantized key codes (KL against dense attention)."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model folder (Llama family)")
    p.add_argument("--texts", type=Path, required=True, help="folder of .txt files (searched recursively)")
    p.add_argument("--tokens", type=int, default=384,
                   help="context tokens to store and load (default 384; context + continuation should stay within "
                        "the model's trained length)")
    p.add_argument("--chunk-tokens", type=int, default=128, help="tokens per stored chunk (default 128)")
    p.add_argument("--continuation", type=int, default=64, help="tokens scored after the context (default 64)")
    p.add_argument("--level", default="medium", help="codec level (see kvrecall.encoder.LEVELS)")
    p.add_argument("--profile", type=Path, help="codec profile file (default: calibrate one on other texts)")
    p.add_argument("--retrieval-tokens", type=int, default=2048,
                   help="context length of the retrieval part; 0 skips it (default 2048)")
    p.add_argument("--retrieval-budget", type=float, default=0.03, help="fraction of tokens to select (default 0.03)")
    p.add_argument("--json", type=Path, help="also write the headline figures as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvrecall.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        model=args.model, texts=args.texts, tokens=args.tokens, chunk_tokens=args.chunk_tokens, continuation=args.continuation, level=args.level,
        profile=args.profile, retrieval_tokens=args.retrieval_tokens, retrieval_budget=args.retrieval_budget,
    )
    result = run_demo(cfg)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
