"""``kvrecall encode-demo``: prefill a real text, encode its KV, decode it, report size, error, KL and speed."""

from __future__ import annotations

import argparse

from kvrecall import defaults


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "encode-demo",
        help="encode a real text's KV with the codec and report size, error, KL and speed",
        description=(
            "Prefill the first --tokens tokens of the first text in --texts through the model, encode the KV "
            "(keys pre-RoPE) in 256-token chunks at each level, decode it back, and print bytes, bits per element, "
            "relative KV error, next-token KL divergence of a continuation (decoded vs exact KV) and encode/decode "
            "speed. Without --profile, a codec profile is calibrated on the other texts first."
        ),
    )
    p.add_argument("--model", required=True, help="model folder or name (e.g. smollm2-135m)")
    p.add_argument("--texts", required=True, help="folder of .txt files; the first is encoded, the rest calibrate")
    p.add_argument("--tokens", type=int, default=256, help="context tokens to encode (default 256)")
    p.add_argument("--cont", type=int, default=64, help="continuation tokens for the KL measurement (default 64)")
    p.add_argument("--level", default=None, help="one codec level (default: every level)")
    p.add_argument("--profile", default=None, help="codec profile file (default: calibrate one on the other texts)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens when no --profile (8192)")
    p.add_argument("--chunk", type=int, default=defaults.CHUNK_TOKENS,
                   help=f"tokens per encoded chunk (default {defaults.CHUNK_TOKENS})")
    p.set_defaults(func=run)


def _time(fn, repeats: int = 3):
    import statistics
    import time

    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, as a one-line message, or None (checked before any work)."""
    from kvrecall.encoder import LEVELS

    if args.level is not None and args.level not in LEVELS:
        return f"unknown --level {args.level!r}; choose one of {', '.join(LEVELS)}"
    if args.tokens < 1 or args.chunk < 1:
        return "--tokens and --chunk must be >= 1"
    if args.cont < 2:
        return f"--cont must be >= 2, got {args.cont}"
    if args.calib_tokens < 2:
        return f"--calib-tokens must be >= 2, got {args.calib_tokens}"
    return None


def run(args: argparse.Namespace) -> int:
    import sys

    problem = check_args(args)
    if problem:
        print(f"encode-demo: {problem}", file=sys.stderr)
        return 2

    import torch
    from tqdm import tqdm

    from kvrecall import encoder as enc
    from kvrecall.encoder.calibrate import (
        calibrate_profile,
        collect_calibration_kv,
        key_importance_from_queries,
    )
    from kvrecall.models import (
        ModelError,
        load_model,
        logits_with_context_kv,
        model_fingerprint,
        model_info,
        prefill_kv,
        read_texts,
        tokenize,
    )

    try:
        levels = list(enc.LEVELS) if args.level is None else [args.level]
        model, tok = load_model(args.model)
        texts = read_texts(args.texts)
        name, text = texts[0]
        ids = tokenize(tok, text, args.tokens + args.cont)
        if len(ids) < args.tokens + 2:
            raise ModelError(f"{name} holds only {len(ids)} tokens; --tokens {args.tokens} needs at least {args.tokens + 2}")
        ctx, cont = ids[: args.tokens], ids[args.tokens :]
        if args.profile:
            profile = enc.CodecProfile.load(args.profile)
            source = f"profile {profile.profile_id} from {args.profile}"
        else:
            if len(texts) < 2:
                raise ModelError("need at least two texts (one to encode, others to calibrate) or --profile")
            with tqdm(total=args.calib_tokens, desc="calibrate", unit="tok", file=sys.stderr, leave=False) as bar:
                kvs, qs = collect_calibration_kv(model, tok, texts[1:], args.calib_tokens, progress=bar.update)
            got = sum(k.shape[3] for k in kvs)
            if got < args.calib_tokens:
                print(f"encode-demo: note: the other texts supply only {got} of --calib-tokens {args.calib_tokens}; "
                      f"calibrating on {got}", file=sys.stderr)
            info = model_info(model)
            profile = calibrate_profile(
                kvs,
                model_fingerprint(args.model),
                key_importance=key_importance_from_queries(qs, info.num_kv_heads),
            )
            source = f"profile {profile.profile_id} calibrated on {sum(k.shape[3] for k in kvs)} tokens of other texts"
        kv = prefill_kv(model, ctx)
        ref_logits = logits_with_context_kv(model, kv, cont)
        chunks = [kv[:, :, :, s : s + args.chunk].contiguous() for s in range(0, kv.shape[3], args.chunk)]
        fp16_bytes = kv.numel() * 2
        rows = []
        for level, prof in [(lvl, profile) for lvl in levels] + [((defaults.CODEC_LEVEL if defaults.CODEC_LEVEL in levels else levels[len(levels) // 2]), None)]:
            enc_s, blobs = _time(lambda: [enc.encode(c, prof, level) for c in chunks])
            dec_s, decs = _time(lambda: enc.decode_many(blobs, prof))
            y = torch.cat(decs, dim=3)
            nbytes = sum(len(b) for b in blobs)
            logits = logits_with_context_kv(model, y, cont)
            ref = torch.log_softmax(ref_logits.double(), -1)
            got = torch.log_softmax(logits.double(), -1)
            kl = float((ref.exp() * (ref - got)).sum(-1).clamp(min=0).mean())
            rows.append(
                (level if prof is not None else f"{level} (no profile)", nbytes, nbytes * 8 / kv.numel(),
                 float((y - kv).norm() / kv.norm()), kl, fp16_bytes / enc_s / 1e6, fp16_bytes / dec_s / 1e6)
            )  # fmt: skip
    except (enc.CodecError, ModelError, OSError) as exc:
        print(f"encode-demo: {exc}", file=sys.stderr)
        return 2
    print(f"model {args.model}  text {name}: {kv.shape[3]} tokens, KV {tuple(kv.shape)} = {fp16_bytes} bytes fp16")
    print(f"{source}; KL over {len(cont)} continuation tokens; speeds are fp16-equivalent, one process")
    print(f"{'level':<22}{'bytes':>9}{'bits/el':>9}{'x fp16':>8}{'rel err':>9}{'KL':>11}{'enc MB/s':>10}{'dec MB/s':>10}")
    for level, nbytes, bits, err, kl, e_mbps, d_mbps in rows:
        print(f"{level:<22}{nbytes:>9}{bits:>9.3f}{16 / bits:>8.1f}{err:>9.4f}{kl:>11.2e}{e_mbps:>10.1f}{d_mbps:>10.1f}")
    return 0
