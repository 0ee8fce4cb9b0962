"""``kvrecall calibrate-codec``: calibrate a model's codec profile from real text."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-codec",
        help="calibrate a model's KV codec profile (quantizer steps + rANS tables) from real text",
        description=(
            "Prefill texts through the model, collect its pre-RoPE KV (and queries, to weight key channels by how "
            "much their errors move attention scores), and write a codec profile: per-channel quantization steps "
            "for every level, delta-coding decisions and rANS probability tables per layer/channel group. Chunks "
            "encoded with the profile reference it by id. Output: one safetensors file (no pickle)."
        ),
    )
    p.add_argument("--model", required=True, help="folder of a Hugging Face Llama-family model")
    p.add_argument("--texts", required=True, help="folder of .txt files (searched recursively)")
    p.add_argument("--out", required=True, help="profile file to write (.safetensors)")
    p.add_argument("--max-tokens", type=int, default=32768, help="calibration tokens to collect (default 32768)")
    p.add_argument("--max-context", type=int, default=None, help="tokens per prefill (default: model context, <=1024)")
    p.add_argument("--groups", type=int, default=4, help="tables per layer and K/V (default 4)")
    p.add_argument(
        "--importance-power",
        type=float,
        default=0.5,
        help="key channel steps ~ (query energy)**-power (default 0.5); 0 disables the weighting",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from kvrecall.encoder import CodecError
    from kvrecall.encoder.calibrate import (
        calibrate_profile,
        collect_calibration_kv,
        key_importance_from_queries,
    )
    from kvrecall.models import ModelError, load_model, model_fingerprint, model_info, read_texts

    try:
        model, tokenizer = load_model(args.model)
        texts = read_texts(args.texts)
        with tqdm(total=args.max_tokens, desc="prefill", unit="tok", file=sys.stderr) as bar:
            kvs, qs = collect_calibration_kv(
                model, tokenizer, texts, args.max_tokens, args.max_context, progress=bar.update
            )
        info = model_info(model)
        key_w = key_importance_from_queries(qs, info.num_kv_heads) if args.importance_power else None
        with tqdm(total=1, desc="tables", unit="level", file=sys.stderr) as bar:

            def step(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            profile = calibrate_profile(
                kvs,
                model_fingerprint(args.model),
                key_importance=key_w,
                importance_power=args.importance_power,
                n_groups=args.groups,
                info={"model_path_name": str(args.model).rstrip("/").split("/")[-1], "texts": len(kvs)},
                progress=step,
            )
        path = profile.save(args.out)
    except (CodecError, ModelError) as exc:
        print(f"calibrate-codec: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {path}: profile {profile.profile_id} for model {profile.model_id} "
        f"({profile.info['calibration_tokens']} tokens from {len(kvs)} texts, {path.stat().st_size} bytes)"
    )
    return 0
