"""``kvrecall calibrate-codec``: calibrate a model's codec profile from real text."""

from __future__ import annotations

import argparse

from kvrecall import defaults


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-codec",
        help="calibrate a model's KV codec profile (quantizer steps + rANS tables) from real text",
        description=(
            "Prefill texts through the model, collect its pre-RoPE KV (and queries, to weight key channels by how "
            "much their errors move attention scores), and write a codec profile: quantization steps for every "
            "level, delta-coding decisions and rANS probability tables per layer/channel group. Chunks encoded "
            "with the profile reference it by id. Output: one safetensors file (no pickle)."
        ),
    )
    p.add_argument("--model", required=True, help="model folder or name (e.g. smollm2-135m)")
    p.add_argument("--texts", required=True, help="folder of .txt files (searched recursively)")
    p.add_argument("--out", required=True, help="profile file to write (.safetensors)")
    p.add_argument("--max-tokens", type=int, default=defaults.CODEC_CALIBRATION_TOKENS,
                   help=f"calibration tokens to collect (default {defaults.CODEC_CALIBRATION_TOKENS})")
    p.add_argument("--max-context", type=int, default=None,
                   help=f"tokens per prefill (default: model context, <= {defaults.CODEC_CALIBRATION_CONTEXT})")
    p.add_argument("--groups", type=int, default=defaults.CODEC_TABLE_GROUPS,
                   help=f"tables per layer and K/V (default {defaults.CODEC_TABLE_GROUPS})")
    p.add_argument("--level", default=defaults.CODEC_LEVEL,
                   help=f"level whose bits per element on the calibration KV are reported (default {defaults.CODEC_LEVEL})")
    p.add_argument("--allocation", choices=("sensitivity", "layer-groups"), default="layer-groups",
                   help="bits per (layer, K/V): fixed early-layers-finer factors (default) or from the model's measured "
                        "KL sensitivity on the first calibration text (2L extra forward passes; lost on SmolLM2)")
    p.add_argument("--importance-power", type=float, default=0.5,
                   help="key channel steps ~ (query energy)**-power (default 0.5); 0 disables the weighting")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, as a one-line message, or None (checked before any work)."""
    from kvrecall.encoder import LEVELS

    if args.level not in LEVELS:
        return f"unknown --level {args.level!r}; choose one of {', '.join(LEVELS)}"
    if args.max_tokens < 2:
        return f"--max-tokens must be >= 2, got {args.max_tokens}"
    if args.max_context is not None and args.max_context < 2:
        return f"--max-context must be >= 2, got {args.max_context}"
    if args.groups < 1:
        return f"--groups must be >= 1, got {args.groups}"
    if not args.importance_power >= 0:
        return f"--importance-power must be >= 0, got {args.importance_power}"
    return None


def run(args: argparse.Namespace) -> int:
    import sys

    problem = check_args(args)
    if problem:
        print(f"calibrate-codec: {problem}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from kvrecall.encoder import CodecError, encode
    from kvrecall.encoder.calibrate import calibrate_profile, collect_calibration_kv, key_importance_from_queries
    from kvrecall.models import ModelError, load_model, model_fingerprint, model_info, read_texts

    try:
        model, tokenizer = load_model(args.model)
        texts = read_texts(args.texts)
        with tqdm(total=args.max_tokens, desc="prefill", unit="tok", file=sys.stderr) as bar:
            kvs, qs, ids = collect_calibration_kv(
                model, tokenizer, texts, args.max_tokens, args.max_context, progress=bar.update, return_ids=True
            )
        got = sum(k.shape[3] for k in kvs)
        if got < args.max_tokens:
            print(
                f"calibrate-codec: note: the {len(texts)} texts under {args.texts} supply only {got} of the "
                f"{args.max_tokens} requested tokens (one prefill of <= {args.max_context or 'the model context'} "
                f"tokens per text); calibrating on {got}. Add texts or lower --max-tokens to silence this.",
                file=sys.stderr,
            )
        info = model_info(model)
        key_w = key_importance_from_queries(qs, info.num_kv_heads) if args.importance_power else None
        with tqdm(total=1, desc="tables", unit="level", file=sys.stderr) as bar:

            def step(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            def calibrate(group_scales=None):
                return calibrate_profile(
                    kvs,
                    model_fingerprint(args.model),
                    key_importance=key_w,
                    importance_power=args.importance_power,
                    group_scales=group_scales,
                    n_groups=args.groups,
                    info={"model_path_name": str(args.model).rstrip("/").split("/")[-1], "texts": len(kvs),
                          "requested_tokens": args.max_tokens, "allocation": args.allocation},
                    progress=step,
                )

            profile = calibrate()
        if args.allocation == "sensitivity":
            from kvrecall.encoder.sensitivity import group_scales_from_sensitivity, measure_sensitivity

            first = ids[0]
            split = min(first.numel() - 2, max(first.numel() * 7 // 8, first.numel() - 128))
            if split < 8:
                raise CodecError(f"--allocation sensitivity needs a first calibration text of >= 10 tokens, got {first.numel()}")
            with tqdm(total=2 * info.num_layers, desc="sensitivity", unit="group", file=sys.stderr) as bar:

                def moved(done: int, total: int) -> None:
                    bar.n = done
                    bar.refresh()

                sens = measure_sensitivity(model, kvs[0][:, :, :, :split].contiguous(), first[split:], profile,
                                           progress=moved)
            with tqdm(total=1, desc="tables", unit="level", file=sys.stderr) as bar:
                profile = calibrate(group_scales_from_sensitivity(sens))
        path = profile.save(args.out)
        sample = kvs[0][:, :, :, : defaults.CHUNK_TOKENS].contiguous()
        bits = len(encode(sample, profile, args.level)) * 8 / sample.numel()
    except (CodecError, ModelError, OSError) as exc:
        print(f"calibrate-codec: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {path}: profile {profile.profile_id} for model {profile.model_id} "
        f"({profile.info['calibration_tokens']} tokens from {len(kvs)} texts, {path.stat().st_size} bytes); "
        f"level {args.level}: {bits:.2f} bits per element on the first calibration chunk"
    )
    return 0
