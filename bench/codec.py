"""Codec measurement: kvrecall's KV codec against fp16, zstd, int8, KIVI and CacheGen-as-released, side by side.

Run from the repository root::

    python bench/codec.py --quick --json bench/results/codec-quick.json   # one model, few texts, < 60 s
    python bench/codec.py --json bench/results/codec-full.json            # both models, many texts

For each model, evaluation text, codec and level: the context (first ``--context`` tokens) is prefilled, its KV
split into ``--chunk``-token chunks, each chunk encoded and decoded, and the decoded context KV compared with the
exact one (KV error, attention-output error of the continuation's real queries, next-token KL and perplexity of
the teacher-forced continuation of ``--cont`` tokens). Codecs see keys in their own form: ours and the simple
baselines pre-RoPE, CacheGen post-RoPE (as vLLM / HF caches hold them). Our codec's profile is calibrated on
texts disjoint from the evaluation texts (``--calib-texts``). Methodology: ``docs/codec-bench.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_baselines import BaselineCodec, baseline_codecs  # noqa: E402
from codec_metrics import RowAccumulator, attention_output, median_seconds, next_token_stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GIB = 1 << 30

# Context / continuation per model: whole 256-token chunks of context, all inside the training length.
MODEL_LENGTHS = {"stories260K": (256, 256), "fixture-hd64": (768, 256), "smollm2-135m": (2048, 256)}
CALIB_TOKENS_MAX = 2048  # calibration prefills are capped here (the profile serves every context length)
MODEL_LABELS = {"fixture-hd64": "fixture-hd64 (ours)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="stories260K only, 3 texts, 1 timing repeat, CacheGen at its middle level only (< 60 s)")
    p.add_argument("--json", type=Path, help="write results here; the rate-distortion plot goes beside it (.png)")
    p.add_argument("--models", nargs="+",
                   help="model names or folders, resolved by kvrecall.models.load_model; the first is the primary "
                        "model (default: smollm2-135m, then every model in ../shared/models; quick: stories260K)")
    p.add_argument("--texts", type=Path, default=SHARED / "data" / "texts" / "state_union", help="evaluation texts")
    p.add_argument("--calib-texts", type=Path, default=SHARED / "data" / "texts" / "gutenberg",
                   help="texts to calibrate our codec profile on (must be disjoint from --texts)")
    p.add_argument("--n-texts", type=int, help="evaluation texts per model (default 3 quick, 12 full)")
    p.add_argument("--context", type=int, nargs="+",
                   help="context tokens; several give one row set per length (default per model: 256 stories260K, "
                        "768 hd64, 2048 smollm2-135m)")
    p.add_argument("--primary-contexts", type=int, nargs="+",
                   help="context lengths for the primary (first) model only, e.g. 2048 8192 (default: --context)")
    p.add_argument("--primary-texts", type=int, nargs="+",
                   help="evaluation texts per primary-model context length (default --n-texts for each)")
    p.add_argument("--allocation", choices=("sensitivity", "layer-groups"), default="layer-groups",
                   help="our bit allocation per (layer, K/V): fixed early-layers-finer factors (default) or from the "
                        "measured KL sensitivity on one calibration text (lost on SmolLM2: docs/codec.md)")
    p.add_argument("--no-ablations", action="store_true",
                   help="skip the slow ablation rows (fp16+zstd-19, CacheGen fed pre-RoPE keys)")
    p.add_argument("--n-calib", type=int, help="calibration texts (default: every text in --calib-texts)")
    p.add_argument("--passcode", type=int, help="planted-passcode cases on the primary model (default 10, quick 0)")
    p.add_argument("--passcode-only", action="store_true", help="only the passcode test (primary model)")
    p.add_argument("--passcode-codecs", nargs="+", default=["default", "kvrecall/low", "kivi-4bit/g32", "cachegen/2"],
                   help="codecs of the passcode test as NAME/LEVEL ('default' = ours at kvrecall.defaults.CODEC_LEVEL);"
                        " exact KV always runs first")
    p.add_argument("--passcode-tokens", type=int, default=4096, help="prompt tokens of each passcode case")
    p.add_argument("--cont", type=int, help="continuation tokens (default per model: 256 / 256)")
    p.add_argument("--chunk", type=int, default=256, help="tokens per encoded chunk")
    p.add_argument("--repeats", type=int, help="timing repeats per text (median; default 1 quick, 3 full)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings are single-process)")
    args = p.parse_args(argv)
    if args.models is None:
        root = SHARED / "models"
        found = sorted(d.name for d in root.iterdir() if (d / "config.json").is_file())
        args.models = [str(root / "stories260K")] if args.quick else ["smollm2-135m"] + [str(root / n) for n in found]
    args.n_texts = args.n_texts or (3 if args.quick else 12)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.passcode = (0 if args.quick else 10) if args.passcode is None else args.passcode
    for name in ("n_texts", "cont", "chunk", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "cont" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'cont' else 1}, got {value}")
    if args.texts.resolve() == args.calib_texts.resolve():
        p.error("--texts and --calib-texts must be different folders (calibration must not see evaluation texts)")
    return args


def first_tokens(tok, text: str, n: int) -> torch.Tensor:
    """The first ``n`` token ids of ``text`` (fewer if it is short), tokenizing only a prefix of long texts."""
    from kvrecall.models import tokenize

    ids = tokenize(tok, text[: 32 * n], n)  # 32 characters per token is far more than any tokenizer needs
    return ids if len(ids) >= n or len(text) <= 32 * n else tokenize(tok, text, n)


class OurCodec:
    """kvrecall's codec (``kvrecall.encoder``) at one level, with a calibrated profile or none (fallback)."""

    name = "kvrecall"
    keys_post_rope = False

    def __init__(self, encoder, profile, level: str):
        self.encoder, self.profile, self.level = encoder, profile, level
        if profile is None:
            self.name = "kvrecall-noprofile"

    def encode(self, kv: torch.Tensor) -> bytes:
        """One chunk ``[L, 2, H, T, D]`` (keys pre-RoPE) to bytes."""
        return self.encoder.encode(kv, profile=self.profile, level=self.level)

    def encode_all(self, chunks: list[torch.Tensor]) -> list[bytes]:
        """A context's chunks, with ``encode_many`` (the batched API) when the encoder has it."""
        if hasattr(self.encoder, "encode_many"):
            return list(self.encoder.encode_many(chunks, profile=self.profile, level=self.level))
        return [self.encode(c) for c in chunks]

    def decode_all(self, blobs: list[bytes]) -> list[torch.Tensor]:
        """A context's chunks back, with ``decode_many`` when the encoder has it."""
        if hasattr(self.encoder, "decode_many"):
            return list(self.encoder.decode_many(blobs, self.profile))
        return [self.encoder.decode(b, profile=self.profile) for b in blobs]


def load_ours(model, tok, model_path: str, calib_dir: Path, context: int, chunk: int,
              allocation: str = "layer-groups", n_calib: int | None = None) -> tuple[list[OurCodec], dict]:
    """Our codec at every level, its profile calibrated on ``calib_dir`` texts; ``([], info)`` if not built yet.

    Calibration samples: the prefill KV and queries of the first ``min(context, CALIB_TOKENS_MAX)`` tokens of each
    calibration text (texts shorter than one chunk are skipped); key channels are weighted by the queries'
    energy, as ``kvrecall calibrate-codec`` does.
    """
    try:
        import kvrecall.encoder as enc
    except ImportError as exc:  # pragma: no cover - depends on the tree's state
        return [], {"ours": f"kvrecall.encoder not importable: {exc}"}
    if not all(hasattr(enc, n) for n in ("encode", "decode", "CodecProfile", "LEVELS")):
        return [], {"ours": "kvrecall.encoder has no encode/decode/CodecProfile/LEVELS yet: baselines only"}
    from kvrecall.models import capture_qkv, model_fingerprint, read_texts

    context = min(context, CALIB_TOKENS_MAX)
    samples, queries, all_ids = [], [], []
    for _, text in read_texts(calib_dir):
        if n_calib is not None and len(samples) >= n_calib:
            break
        ids = first_tokens(tok, text, context)
        if len(ids) >= min(context, chunk):
            qkv = capture_qkv(model, ids)
            samples.append(qkv.kv())
            queries.append(qkv.q)
            all_ids.append(ids)
    if not samples:
        raise SystemExit(f"no calibration text under {calib_dir} holds {min(context, chunk)} tokens")
    start = time.perf_counter()
    profile = enc.CodecProfile.calibrate(samples, model_fingerprint(model_path), query_samples=queries)
    group_scales = None
    if allocation == "sensitivity":
        from kvrecall.encoder.sensitivity import group_scales_from_sensitivity, measure_sensitivity

        ids = all_ids[0]
        split = max(1, min(len(ids) - 64, 1024))  # context for the measurement, the rest (<= 128) is scored
        sens = measure_sensitivity(model, samples[0][:, :, :, :split].contiguous(), ids[split : split + 128], profile)
        group_scales = group_scales_from_sensitivity(sens)
        profile = enc.CodecProfile.calibrate(samples, model_fingerprint(model_path), query_samples=queries,
                                             group_scales=group_scales)
    calib_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        profile.save(Path(tmp) / "profile")
        profile_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    levels = [str(x) for x in enc.LEVELS]
    codecs = [OurCodec(enc, profile, lvl) for lvl in levels]
    codecs.append(OurCodec(enc, None, "medium" if "medium" in levels else levels[(len(levels) - 1) // 2]))
    info = {"profile_id": str(getattr(profile, "profile_id", "")), "profile_bytes": profile_bytes,
            "profile_bits_per_element_over_1GiB": profile_bytes * 8 / (GIB / 2),
            "calibration_texts": len(samples), "calibration_seconds": round(calib_s, 2), "levels": levels,
            "allocation": allocation,
            "group_scales": None if group_scales is None else [[round(float(v), 4) for v in r] for r in group_scales]}
    try:  # which rANS path the timings measured (the C extension is optional)
        from kvrecall.encoder import native

        info["rans_path"] = "native C" if native.available() else f"numpy ({native.unavailable_reason()})"
    except ImportError:
        info["rans_path"] = "numpy"
    return codecs, info


def coder_overhead(our_blobs: dict[str, tuple[OurCodec, list[bytes]]]) -> dict | None:
    """Our rANS payload against the empirical entropy of the alphabet symbols it codes (escape index included).

    Re-derives each chunk's coded symbols (``decode_symbols`` + the header's delta flags + its tables, via the
    encoder's chunk parser) and compares the payload bits (16-bit words, final states included) with

    * ``pooled``: per table, the entropy of the histogram of all symbols that table coded over all evaluation
      chunks of that level (a profile's tables are shared by every chunk; a fallback chunk's are its own);
    * ``per_chunk``: per chunk and table, the entropy of that chunk's own histogram (stricter);
    * ``table_ideal``: the ideal code length under the tables actually used (pure coder efficiency).

    Returns None when the encoder does not expose what this needs.
    """
    try:
        import numpy as np

        from kvrecall.encoder import decode_symbols, parse_chunk
        from kvrecall.encoder.tables import apply_delta
    except ImportError:
        return None
    from codec_metrics import empirical_entropy_bits

    totals = {"payload": 0.0, "pooled": 0.0, "per_chunk": 0.0, "table_ideal": 0.0}
    per_level = {}
    for key, (codec, blobs) in our_blobs.items():
        pooled_counts: dict[int, np.ndarray] = {}
        payload = chunk_h = ideal = 0.0
        for i, data in enumerate(blobs):
            parsed = parse_chunk(data, codec.profile)
            h, ts = parsed.header, parsed.tables
            coded = apply_delta(decode_symbols(data, codec.profile).symbols.numpy(), h.delta)
            tids = np.broadcast_to(ts.tmap[:, :, :, None, :], coded.shape).reshape(-1)
            idx = coded.reshape(-1).astype(np.int64) - ts.lo[tids]
            sizes = ts.sizes[tids]
            esc = (idx < 0) | (idx >= sizes - 1)
            idx[esc] = sizes[esc] - 1
            offs = np.concatenate([[0], np.cumsum([len(f) for f in ts.freqs])])
            flat = np.concatenate([np.asarray(f, dtype=np.float64) for f in ts.freqs])
            ideal += float(np.log2((1 << ts.scale_bits) / flat[offs[tids] + idx]).sum())
            payload += h.payload_words * 16
            for t in np.unique(tids):
                sym = idx[tids == t]
                chunk_h += empirical_entropy_bits(sym)
                table_key = int(t) if codec.profile is not None else (i << 20) + int(t)
                counts = np.bincount(sym, minlength=int(ts.sizes[t]))
                prev = pooled_counts.get(table_key)
                pooled_counts[table_key] = counts if prev is None else prev + counts
        pooled = 0.0
        for counts in pooled_counts.values():
            p = counts[counts > 0] / counts.sum()
            pooled += float(-(p * np.log2(p)).sum() * counts.sum())
        per_level[key] = {
            "payload_bits": payload,
            "pooled_pct": 100 * (payload / pooled - 1),
            "per_chunk_pct": 100 * (payload / chunk_h - 1),
            "table_ideal_pct": 100 * (payload / ideal - 1),
        }
        for k, v in (("payload", payload), ("pooled", pooled), ("per_chunk", chunk_h), ("table_ideal", ideal)):
            totals[k] += v
    if not totals["pooled"]:
        return None
    return {
        "pooled_pct": 100 * (totals["payload"] / totals["pooled"] - 1),
        "per_chunk_pct": 100 * (totals["payload"] / totals["per_chunk"] - 1),
        "table_ideal_pct": 100 * (totals["payload"] / totals["table_ideal"] - 1),
        "per_level": per_level,
    }


@dataclass
class TextCase:
    """One evaluation text: exact context KV in both key forms, the continuation and its references."""

    name: str
    kv_pre: torch.Tensor  # [L, 2, H, T, D], keys pre-RoPE
    kv_post: torch.Tensor  # keys post-RoPE
    q_cont: torch.Tensor  # [L, Hq, N, D] continuation queries, post-RoPE
    cont: torch.Tensor  # [N]
    ref_logits: torch.Tensor  # [N, vocab]
    attn_ref: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def build_cases(model, tok, texts_dir: Path, n: int, context: int, cont: int) -> list[TextCase]:
    """Prefill the first ``n`` texts holding ``context + cont`` tokens."""
    from kvrecall.models import apply_rope, capture_qkv, logits_with_context_kv, read_texts, rope_cos_sin

    cases = []
    for name, text in read_texts(texts_dir):
        ids = first_tokens(tok, text, context + cont)
        if len(ids) < context + cont:
            continue
        qkv = capture_qkv(model, ids)
        cos, sin = rope_cos_sin(model, torch.arange(context + cont))
        kv_pre = qkv.kv()[:, :, :, :context].contiguous()
        kv_post = kv_pre.clone()
        kv_post[:, 0] = apply_rope(kv_pre[:, 0], cos[:context], sin[:context])
        q_cont = apply_rope(qkv.q[:, :, context:], cos[context:], sin[context:])
        cont_ids = ids[context:]
        ref = logits_with_context_kv(model, kv_pre, cont_ids)
        cases.append(TextCase(name, kv_pre, kv_post, q_cont, cont_ids, ref,
                              attention_output(q_cont, kv_post[:, 0], kv_post[:, 1]), cos[:context], sin[:context]))
        if len(cases) == n:
            break
    if not cases:
        raise SystemExit(f"no text under {texts_dir} holds {context + cont} tokens")
    return cases


def measure(model, codec: BaselineCodec | OurCodec, case: TextCase, chunk: int, repeats: int, acc: RowAccumulator):
    """Encode/decode one case's context chunk by chunk and add every metric to ``acc``."""
    from kvrecall.models import apply_rope, logits_with_context_kv

    x = case.kv_post if codec.keys_post_rope else case.kv_pre
    chunks = [x[:, :, :, s : s + chunk].contiguous() for s in range(0, x.shape[3], chunk)]
    enc_s, blobs = median_seconds(lambda: codec.encode_all(chunks), repeats)
    dec_s, decs = median_seconds(lambda: codec.decode_all(blobs), repeats)
    y = torch.cat([d.float() for d in decs], dim=3)
    if y.shape != x.shape:
        raise RuntimeError(f"{codec.name} {codec.level}: decoded shape {tuple(y.shape)} != {tuple(x.shape)}")
    acc.bytes += sum(len(b) for b in blobs)
    acc.elements += x.numel()
    acc.kv.add(x, y)
    k_post = y[:, 0] if codec.keys_post_rope else apply_rope(y[:, 0], case.cos, case.sin)
    acc.attn.add(case.attn_ref, attention_output(case.q_cont, k_post, y[:, 1]))
    logits = logits_with_context_kv(model, y, case.cont, keys_pre_rope=not codec.keys_post_rope)
    kl, n, nll = next_token_stats(case.ref_logits, logits, case.cont)
    _, _, nll_ref = next_token_stats(case.ref_logits, case.ref_logits, case.cont)
    acc.kl_sum, acc.kl_n, acc.nll, acc.nll_ref = acc.kl_sum + kl, acc.kl_n + n, acc.nll + nll, acc.nll_ref + nll_ref
    acc.encode_s.append(enc_s)
    acc.decode_s.append(dec_s)
    acc.fp16_bytes.append(x.numel() * 2)
    return blobs


def run_model(path: str, args: argparse.Namespace, context: int | None = None, n_texts: int | None = None,
              loaded: dict | None = None) -> tuple[list[dict], dict]:
    """All rows of one model at one context length, plus facts about our codec on it (profile size, coder
    overhead). ``loaded`` caches the model and our calibrated codecs between context lengths."""
    from tqdm import tqdm

    from kvrecall.models import load_model

    loaded = {} if loaded is None else loaded
    if "model" not in loaded:
        loaded["model"] = load_model(path)
    model, tok = loaded["model"]
    name = Path(path).name
    context0, cont = MODEL_LENGTHS.get(name, (256, 256))
    context, cont = context or context0, args.cont or cont
    label = MODEL_LABELS.get(name, name)
    if context != context0 or args.primary_contexts:
        label = f"{label} @{context // 1024}K" if context % 1024 == 0 else f"{label} @{context}"
    cases = build_cases(model, tok, args.texts, n_texts or args.n_texts, context, cont)
    if "ours" not in loaded:
        loaded["ours"] = load_ours(model, tok, path, args.calib_texts, context + cont, args.chunk, args.allocation,
                                   args.n_calib)
    ours, info = loaded["ours"]
    info = dict(info)
    codecs = [c for c in baseline_codecs(args.quick, not args.no_ablations)] + ours
    accs = {(c.name, c.level): RowAccumulator() for c in codecs}
    our_blobs: dict[str, tuple[OurCodec, list[bytes]]] = {}
    with tqdm(total=len(cases) * len(codecs), desc=label, unit="run", leave=False) as bar:
        for case in cases:
            for c in codecs:
                blobs = measure(model, c, case, args.chunk, args.repeats, accs[(c.name, c.level)])
                if isinstance(c, OurCodec):
                    our_blobs.setdefault(f"{c.name}/{c.level}", (c, []))[1].extend(blobs)
                bar.update()
    rows = []
    profile_bits_per_element = info.get("profile_bytes", 0) * 8 / (GIB / 2)  # 1 GiB of fp16 KV
    for c in codecs:
        a = accs[(c.name, c.level)]
        bits = a.bytes * 8 / a.elements
        row = {
            "model": label, "codec": c.name, "level": c.level,
            "bits_per_element": bits, "kv_rel_err": a.kv.value, "attn_rel_err": a.attn.value,
            "kl": a.kl_sum / a.kl_n,
            "ppl_delta_pct": (math.exp((a.nll - a.nll_ref) / max(1, a.kl_n - len(cases))) - 1) * 100,
            "encode_MBps": a.mbps("encode"), "decode_MBps": a.mbps("decode"),
            "keys": "post-RoPE" if c.keys_post_rope else "pre-RoPE",
        }
        if hasattr(c, "side_info_bytes"):
            L, _, H, T, D = cases[0].kv_pre.shape
            side = sum(c.side_info_bytes(L, H, min(args.chunk, T - s), D) for s in range(0, T, args.chunk))
            row["side_info_bits_per_element"] = side * 8 / cases[0].kv_pre.numel()
        if isinstance(c, OurCodec) and c.profile is not None:
            row["bits_per_element_chunks_only"] = bits
            row["bits_per_element"] = bits + profile_bits_per_element
        rows.append(row)
    overhead = coder_overhead(our_blobs)
    info["coder_overhead"] = overhead
    info["coder_overhead_pct"] = None if overhead is None else overhead["pooled_pct"]
    info.update(context_tokens=context, cont_tokens=cont, texts=[c.name for c in cases])
    return rows, info


def _bits_at_kl(rows: list[dict], kl: float) -> float | None:
    """Bits per element our level curve would need at ``kl``: linear in log(KL) between the two levels around it.

    Informational only (the targets use measured levels); None when ``kl`` lies outside the measured range.
    """
    pts = sorted((r["bits_per_element"], r["kl"]) for r in rows if r["kl"] > 0)
    for (b0, k0), (b1, k1) in zip(pts, pts[1:]):
        if k1 <= kl <= k0 and k0 > k1:
            frac = (math.log(k0) - math.log(kl)) / (math.log(k0) - math.log(k1))
            return b0 + frac * (b1 - b0)
    return None


def evaluate_targets(rows: list[dict], infos: dict[str, dict]) -> dict:
    """The issue's targets, per model: bits vs CacheGen level 2 at <= its KL, coder overhead, CPU decode speed."""
    out = {}
    for model, info in infos.items():
        mine = [r for r in rows if r["model"] == model and r["codec"] == "kvrecall"]
        cg = next((r for r in rows if r["model"] == model and r["codec"] == "cachegen" and r["level"] == "2"), None)
        t: dict = {}
        if cg and mine:
            ok = [r for r in mine if r["kl"] <= cg["kl"]]
            best = min(ok, key=lambda r: r["bits_per_element"]) if ok else None
            t["cachegen_mid"] = {"bits_per_element": cg["bits_per_element"], "kl": cg["kl"]}
            t["ours_at_or_below_cachegen_kl"] = None if best is None else {
                "level": best["level"], "bits_per_element": best["bits_per_element"], "kl": best["kl"]}
            ratio = None if best is None else best["bits_per_element"] / cg["bits_per_element"]
            t["bits_ratio_vs_cachegen"] = ratio
            t["bits_ratio_le_0.7"] = ratio is not None and ratio <= 0.7
            t["stretch_bits_le_2"] = best is not None and best["bits_per_element"] <= 2.0
            t["ours_bits_at_cachegen_kl_interpolated"] = _bits_at_kl(mine, cg["kl"])
        kivi4 = next((r for r in rows if r["model"] == model and r["codec"] == "kivi-4bit"), None)
        if kivi4 and mine:
            ok = [r for r in mine if r["kl"] <= kivi4["kl"]]
            best = min(ok, key=lambda r: r["bits_per_element"]) if ok else None
            t["kivi4"] = {"bits_per_element": kivi4["bits_per_element"], "kl": kivi4["kl"]}
            t["ours_at_or_below_kivi4_kl"] = None if best is None else {
                "level": best["level"], "bits_per_element": best["bits_per_element"], "kl": best["kl"]}
            ratio = None if best is None else best["bits_per_element"] / kivi4["bits_per_element"]
            t["bits_ratio_vs_kivi4"] = ratio
            t["bits_ratio_vs_kivi4_le_0.75"] = ratio is not None and ratio <= 0.75
        cgs = [r for r in rows if r["model"] == model and r["codec"] == "cachegen"]
        if cgs and mine:
            dominated = [r["level"] for r in mine if any(
                c["bits_per_element"] <= r["bits_per_element"] and c["kl"] <= r["kl"] for c in cgs)]
            t["our_levels_dominated_by_cachegen"] = dominated
            t["no_cachegen_level_dominates_ours"] = not dominated
        ov = info.get("coder_overhead_pct")
        t["coder_overhead_pct"] = ov
        t["coder_overhead_le_2pct"] = ov is not None and ov <= 2.0
        if mine:
            dec = [r["decode_MBps"] for r in mine]
            t["ours_min_decode_MBps"] = min(dec)
            t["decode_ge_200MBps"] = min(dec) >= 200.0
        out[model] = t
    return out


def print_table(rows: list[dict], targets: dict, infos: dict | None = None) -> None:
    head = f"{'model':<20} {'codec':<16} {'level':<8} {'bits/el':>8} {'kv_err':>8} {'attn_err':>8} {'KL':>9} " \
           f"{'ppl%':>7} {'enc MB/s':>9} {'dec MB/s':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<20} {r['codec']:<16} {r['level']:<8} {r['bits_per_element']:>8.3f} {r['kv_rel_err']:>8.4f}"
              f" {r['attn_rel_err']:>8.4f} {r['kl']:>9.2e} {r['ppl_delta_pct']:>7.2f} {r['encode_MBps']:>9.2f}"
              f" {r['decode_MBps']:>9.2f}")
    for model, info in (infos or {}).items():
        if "profile_bytes" in info:
            ov = info.get("coder_overhead") or {}
            print(f"\n{model}: profile {info['profile_bytes']} bytes "
                  f"({info['profile_bits_per_element_over_1GiB']:.2e} bits/element over 1 GiB of KV); coder overhead "
                  + ", ".join(f"{k} {ov[k]:.2f}%" for k in ("pooled_pct", "per_chunk_pct", "table_ideal_pct")
                              if k in ov))
        elif "ours" in info:
            print(f"\n{model}: {info['ours']}")
    print("\ntargets:")
    for model, t in targets.items():
        print(f"  {model}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in t.items()))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def plot(rows: list[dict], path: Path) -> None:
    """Rate-distortion plot: bits per element (x) against next-token KL (y, log scale), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    floor = 1e-10
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model]
        for codec in dict.fromkeys(r["codec"] for r in mrows):
            pts = sorted((r["bits_per_element"], max(r["kl"], floor), r["level"]) for r in mrows if r["codec"] == codec)
            style = "o-" if codec in ("kvrecall", "cachegen") else ("^" if codec == "cachegen-preRoPE" else "s--")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=codec, lw=2 if codec == "kvrecall" else 1)
            for x, y, lvl in pts:
                if lvl not in ("-", ""):
                    if codec.startswith("cachegen"):
                        lvl = f"L{lvl}"
                    elif codec == "fp16+zstd":
                        lvl = f"zstd-{lvl}"
                    ax.annotate(lvl, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bits per KV element (every byte counted)")
        ax.set_ylabel(f"next-token KL (nats, floor {floor:g})")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_passcode(path: str, args: argparse.Namespace, loaded: dict) -> dict:
    """Planted-passcode accuracy with the context KV replaced by its decoded form (exact KV first)."""
    from codec_metrics import greedy_answer, passcode_cases
    from tqdm import tqdm

    from kvrecall import defaults
    from kvrecall.models import apply_rope, prefill_kv, read_texts, rope_cos_sin
    from kvrecall.passcode import score

    model, tok = loaded["model"]
    ours, _ = loaded["ours"]
    cases = passcode_cases(tok, read_texts(args.calib_texts), args.passcode, args.passcode_tokens)
    names = [f"kvrecall/{defaults.CODEC_LEVEL}" if n == "default" else n for n in args.passcode_codecs]
    wanted = {tuple(n.split("/", 1)) for n in names}
    codecs = [c for c in baseline_codecs(False) + ours if (c.name, str(c.level)) in wanted]
    results = {"exact": []} | {f"{c.name}/{c.level}": [] for c in codecs}
    bits = {f"{c.name}/{c.level}": [0, 0] for c in codecs}
    with tqdm(total=len(cases) * (1 + len(codecs)), desc="passcode", unit="run", leave=False) as bar:
        for case in cases:
            kv = prefill_kv(model, case.context_ids)
            results["exact"].append(score(greedy_answer(model, tok, kv, case.last_id), case.passcode))
            bar.update()
            cos, sin = rope_cos_sin(model, torch.arange(kv.shape[3]))
            for c in codecs:
                x = kv.clone()
                if c.keys_post_rope:
                    x[:, 0] = apply_rope(kv[:, 0], cos, sin)
                chunks = [x[:, :, :, s : s + args.chunk].contiguous() for s in range(0, x.shape[3], args.chunk)]
                blobs = c.encode_all(chunks)
                y = torch.cat([d.float() for d in c.decode_all(blobs)], dim=3)
                key = f"{c.name}/{c.level}"
                bits[key][0] += sum(len(b) for b in blobs) * 8
                bits[key][1] += x.numel()
                answer = greedy_answer(model, tok, y, case.last_id) if not c.keys_post_rope else None
                if c.keys_post_rope:  # CacheGen decodes post-RoPE keys: undo before handing the KV over
                    from kvrecall.models import undo_rope

                    y[:, 0] = undo_rope(y[:, 0], cos, sin)
                    answer = greedy_answer(model, tok, y, case.last_id)
                results[key].append(score(answer, case.passcode))
                bar.update()
    return {
        "tokens": args.passcode_tokens, "cases": len(cases), "depths": [round(c.depth, 3) for c in cases],
        "accuracy": {k: sum(v) / len(v) for k, v in results.items()},
        "bits_per_element": {k: b / max(1, n) for k, (b, n) in bits.items()},
        "per_case": results, "default_level": defaults.CODEC_LEVEL,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    rows, infos = [], {}
    passcode = None
    for i, path in enumerate(args.models):
        loaded: dict = {}
        contexts = (args.primary_contexts if i == 0 and args.primary_contexts else args.context) or [None]
        n_texts = (args.primary_texts if i == 0 and args.primary_texts else None) or [args.n_texts] * len(contexts)
        if args.passcode_only:
            if i > 0:
                break
            from kvrecall.models import load_model

            loaded["model"] = load_model(path)
            ctx0 = MODEL_LENGTHS.get(Path(path).name, (256, 256))
            loaded["ours"] = load_ours(*loaded["model"], path, args.calib_texts, sum(ctx0), args.chunk,
                                       args.allocation, args.n_calib)
            contexts = []
        for context, n in zip(contexts, n_texts + [args.n_texts] * len(contexts)):
            model_rows, info = run_model(path, args, context, n, loaded)
            rows += model_rows
            infos[model_rows[0]["model"]] = info
        if i == 0 and args.passcode and not getattr(loaded["model"][1], "chat_template", None):
            print(f"passcode test skipped: {path} has no chat template")
        elif i == 0 and args.passcode:
            passcode = run_passcode(path, args, loaded)
            print("passcode accuracy:", json.dumps(passcode["accuracy"]))
    targets = evaluate_targets(rows, infos)
    if passcode:
        acc = passcode["accuracy"]
        targets["passcode"] = {"exact": acc["exact"], "ours_default": acc.get(f"kvrecall/{passcode['default_level']}"),
                               "ours_default_equals_exact": acc.get(f"kvrecall/{passcode['default_level']}") == acc["exact"]}
    overheads = [i["coder_overhead_pct"] for i in infos.values() if i.get("coder_overhead_pct") is not None]
    result = {
        "rows": rows,
        "coder_overhead_pct": max(overheads) if overheads else None,
        "targets": targets,
        "passcode": passcode,
        "models": infos,
        "settings": {"quick": args.quick, "chunk_tokens": args.chunk, "repeats": args.repeats,
                     "threads": args.threads, "texts": str(args.texts), "calib_texts": str(args.calib_texts),
                     "seconds": round(time.time() - start, 1),
                     "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    if rows:
        print_table(rows, targets, infos)
    print(f"\n{len(rows)} rows in {result['settings']['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float))
        if rows:
            plot(rows, args.json.with_suffix(".png"))
        print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
