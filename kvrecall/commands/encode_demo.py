"""``kvrecall encode-demo``: prefill a real text, encode its KV, decode it, report size, error, KL and speed."""

from __future__ import annotations

import argparse


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
    p.add_argument("--model", required=True, help="folder of a Hugging Face Llama-family model")
    p.add_argument("--texts", required=True, help="folder of .txt files; the first is encoded, the rest calibrate")
    p.add_argument("--tokens", type=int, default=256, help="context tokens to encode (default 256)")
    p.add_argument("--cont", type=int, default=64, help="continuation tokens for the KL measurement (default 64)")
    p.add_argument("--level", default=None, help="one codec level (default: every level)")
    p.add_argument("--profile", default=None, help="codec profile file (default: calibrate one on the other texts)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens when no --profile (8192)")
    p.add_argument("--chunk", type=int, default=256, help="tokens per encoded chunk (default 256)")
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


def run(args: argparse.Namespace) -> int:
    import sys

    import torch
    from tqdm import tqdm

    from kvrecall import encoder as enc
    from kvrecall.encoder.quantize import level_index
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
        if args.tokens < 1 or args.cont < 2 or args.chunk < 1:
            raise ModelError("--tokens and --chunk must be >= 1, --cont >= 2")
        levels = list(enc.LEVELS) if args.level is None else [enc.LEVELS[level_index(args.level)]]
        model, tok = load_model(args.model)
        texts = read_texts(args.texts)
        name, text = texts[0]
        ids = tokenize(tok, text, args.tokens + args.cont)
        if len(ids) < args.tokens + 2:
            raise ModelError(f"{name} holds only {len(ids)} tokens; need --tokens + 2")
        ctx, cont = ids[: args.tokens], ids[args.tokens :]
        if args.profile:
            profile = enc.CodecProfile.load(args.profile)
            source = f"profile {profile.profile_id} from {args.profile}"
        else:
            if len(texts) < 2:
                raise ModelError("need at least two texts (one to encode, others to calibrate) or --profile")
            with tqdm(total=args.calib_tokens, desc="calibrate", unit="tok", file=sys.stderr, leave=False) as bar:
                kvs, qs = collect_calibration_kv(model, tok, texts[1:], args.calib_tokens, progress=bar.update)
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
        for level, prof in [(lvl, profile) for lvl in levels] + [(levels[len(levels) // 2], None)]:
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
    except (enc.CodecError, ModelError) as exc:
        print(f"encode-demo: {exc}", file=sys.stderr)
        return 1
    print(f"model {args.model}  text {name}: {kv.shape[3]} tokens, KV {tuple(kv.shape)} = {fp16_bytes} bytes fp16")
    print(f"{source}; KL over {len(cont)} continuation tokens; speeds are fp16-equivalent, one process")
    print(f"{'level':<22}{'bytes':>9}{'bits/el':>9}{'x fp16':>8}{'rel err':>9}{'KL':>11}{'enc MB/s':>10}{'dec MB/s':>10}")
    for level, nbytes, bits, err, kl, e_mbps, d_mbps in rows:
        print(f"{level:<22}{nbytes:>9}{bits:>9.3f}{16 / bits:>8.1f}{err:>9.4f}{kl:>11.2e}{e_mbps:>10.1f}{d_mbps:>10.1f}")
    return 0
