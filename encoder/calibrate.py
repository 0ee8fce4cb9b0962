"""Calibrating a :class:`~kvrecall.encoder.profile.CodecProfile` from real KV.

Steps per channel::

    step[level, l, kv, h, d] = LEVEL_STEP[level] * group_scale[l, kv] * rms[l, kv] * adj[l, kv, h, d]

``group_scale`` is a per-(layer, K/V) multiplier (``group_scales``: fixed early-layers-finer factors, or derived
from the model's measured sensitivity, see :mod:`kvrecall.encoder.sensitivity`); ``rms`` is the RMS of the
(offset-removed) calibration KV of the layer's keys or values; ``adj`` is 1 unless an
importance weight per channel is given (then ``adj ~ importance ** -power``, geometric mean 1, clipped to
[1/4, 4]): channels whose errors matter more get finer steps. Then, per level, each (layer, K/V) is delta coded
along tokens only if that lowers the mean per-channel empirical entropy on the calibration data, and the
channels of each (layer, K/V) are split into ``n_groups`` groups of similar spread, one table per group.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from kvrecall.encoder.errors import CodecError
from kvrecall.encoder.profile import CodecProfile
from kvrecall.encoder.quantize import (
    LEVEL_STEP,
    LEVELS,
    SYMBOL_LIMIT,
    layer_step_factors,
    VALUE_SCALE_MIN_HEAD_DIM,
    quantize_with,
    value_token_exponents,
)
from kvrecall.encoder.tables import table_from_histogram

__all__ = ["calibrate_profile", "collect_calibration_kv", "channel_entropies", "key_importance_from_queries", "value_importance_from_model"]


def channel_entropies(x: np.ndarray) -> np.ndarray:
    """Empirical entropy (bits) of each channel of an integer array ``[H, N, D]``; returns ``[H, D]``."""
    heads, n, dims = x.shape
    flat = x.transpose(0, 2, 1).reshape(heads * dims, n).astype(np.int64)
    flat = flat - flat.min(axis=1, keepdims=True)
    width = int(flat.max()) + 1
    ids = flat + (np.arange(heads * dims)[:, None] * width)
    counts = np.bincount(ids.ravel(), minlength=heads * dims * width).reshape(heads * dims, width)
    p = counts / n
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
    return ent.reshape(heads, dims)


def key_importance_from_queries(q_samples: list[torch.Tensor], num_kv_heads: int) -> np.ndarray:
    """Importance of each key channel: mean squared (pre-RoPE) query over RoPE pairs, summed over the GQA group.

    An error ``e`` in a key changes a score by ``q . R e``; RoPE rotates pairs ``(d, d + D/2)`` together, so the
    expected squared score error of channel ``d`` scales with ``E[q_d^2 + q_{d+D/2}^2]``.

    Parameters
    ----------
    q_samples : list of Tensor[L, Hq, T_i, D]

    Returns
    -------
    ndarray[L, H_kv, D], float64
    """
    q2 = sum(q.double().pow(2).sum(dim=2) for q in q_samples) / sum(q.shape[2] for q in q_samples)  # [L, Hq, D]
    half = q2.shape[-1] // 2
    paired = q2[..., :half] + q2[..., half:]
    q2 = torch.cat([paired, paired], dim=-1)
    layers, hq, d = q2.shape
    return q2.reshape(layers, num_kv_heads, hq // num_kv_heads, d).sum(dim=2).numpy()


def value_importance_from_model(model) -> np.ndarray:
    """Importance of each value channel: squared norm of its o_proj column, summed over the GQA group.

    Returns
    -------
    ndarray[L, H_kv, D], float64
    """
    from kvrecall.models import model_info

    info = model_info(model)
    out = []
    for layer in model.model.layers:
        w = layer.self_attn.o_proj.weight.detach().double()  # [hidden, Hq * D]
        col = w.pow(2).sum(dim=0).reshape(info.num_kv_heads, info.group_size, info.head_dim).sum(dim=1)
        out.append(col)
    return torch.stack(out).numpy()


def _adjustment(weights: np.ndarray | None, shape: tuple, power: float) -> np.ndarray:
    """Per-channel step multipliers ``[L, H, D]`` from importance weights (geometric mean 1 per layer)."""
    if weights is None or power == 0:
        return np.ones(shape)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != shape or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise CodecError(f"importance weights must be finite, non-negative, shape {shape}; got {w.shape}")
    w = np.maximum(w, 1e-12 * max(w.max(), 1e-30))
    adj = w ** (-power)
    adj /= np.exp(np.log(adj).mean(axis=(1, 2), keepdims=True))
    return np.clip(adj, 0.25, 4.0)


def calibrate_profile(
    kv_samples: list[torch.Tensor],
    model_id: str,
    *,
    key_importance: np.ndarray | None = None,
    value_importance: np.ndarray | None = None,
    importance_power: float = 0.5,
    group_scales: np.ndarray | None = None,
    n_groups: int = 4,
    scale_bits: int = 12,
    keys_pre_rope: bool = True,
    chunk_tokens: int = 256,
    value_token_scales: bool | None = None,
    info: dict | None = None,
    progress: Callable | None = None,
) -> CodecProfile:
    """Calibrate a codec profile.

    Parameters
    ----------
    kv_samples : list of Tensor[L, 2, H, T_i, D]
        Real KV (same L, H, D; keys pre-RoPE unless ``keys_pre_rope=False``).
    model_id : str
    key_importance, value_importance : ndarray[L, H, D], optional
        Per-channel error weights (see :func:`key_importance_from_queries`, :func:`value_importance_from_model`).
    importance_power : float
        ``adj = importance ** -power`` (0.5 equalizes weighted error; 0 ignores importance).
    group_scales : ndarray[L, 2], optional
        Step multiplier of each (layer, K/V); default :func:`~kvrecall.encoder.quantize.layer_step_factors` for
        both K and V. :func:`kvrecall.encoder.sensitivity.group_scales_from_sensitivity` derives them from the
        model's measured KL sensitivity.
    n_groups : int
        Tables per (layer, K/V) per level.
    scale_bits : int
        rANS precision.
    chunk_tokens : int
        Samples are cut into chunks of this many tokens for the delta statistics (delta restarts per chunk).
    value_token_scales : bool, optional
        Chunks coded with the profile carry per-token value scales
        (:func:`~kvrecall.encoder.quantize.value_token_exponents`); the tables are built from symbols quantized
        that way. Default: when ``head_dim >= VALUE_SCALE_MIN_HEAD_DIM`` (their 4-bit exponents cost ``2 / D``
        bits per element: 0.03 at D=64, where they cut SmolLM2's KL by 40%; 0.25 at D=8, where they lose).
    info : dict, optional
        Extra calibration facts stored in the profile.
    progress : callable, optional
        Called as ``progress(done, total)`` after each level.

    Returns
    -------
    CodecProfile
    """
    if not kv_samples:
        raise CodecError("calibration needs at least one KV sample")
    shape0 = tuple(kv_samples[0].shape)
    for s in kv_samples:
        if s.ndim != 5 or s.shape[1] != 2 or (s.shape[0], s.shape[2], s.shape[4]) != (shape0[0], shape0[2], shape0[4]):
            raise CodecError(f"calibration samples must share [L, 2, H, *, D]; got {tuple(s.shape)} vs {shape0}")
        if not bool(torch.isfinite(s).all()):
            raise CodecError("calibration sample contains NaN or infinite values")
    layers, _, heads, _, head_dim = shape0
    if value_token_scales is None:
        value_token_scales = head_dim >= VALUE_SCALE_MIN_HEAD_DIM
    n_groups = max(1, min(n_groups, heads * head_dim))
    chunks = []
    for s in kv_samples:
        x = s.detach().to("cpu", torch.float32).numpy()
        for t0 in range(0, x.shape[3], chunk_tokens):
            chunks.append(x[:, :, :, t0 : t0 + chunk_tokens])
    cat = np.concatenate(chunks, axis=3)
    offset = cat.mean(axis=3).astype(np.float32)
    rms = np.sqrt(((cat - offset[:, :, :, None, :]) ** 2).mean(axis=(2, 3, 4)))
    rms = np.maximum(rms, 1e-8)
    adj = np.stack(
        [
            _adjustment(key_importance, (layers, heads, head_dim), importance_power),
            _adjustment(value_importance, (layers, heads, head_dim), importance_power),
        ],
        axis=1,
    )  # [L, 2, H, D]
    if group_scales is None:
        group_scales = np.repeat(layer_step_factors(layers)[:, None], 2, axis=1)
    group_scales = np.asarray(group_scales, dtype=np.float64)
    if group_scales.shape != (layers, 2) or not np.all(np.isfinite(group_scales)) or np.any(group_scales <= 0):
        raise CodecError(f"group_scales must be a positive finite [L={layers}, 2] array")
    n_levels = len(LEVELS)
    chunk_vexp = [value_token_exponents(torch.from_numpy(c[:, 1]), torch.from_numpy(offset[:, 1])) for c in chunks] \
        if value_token_scales else []
    step = np.empty((n_levels, layers, 2, heads, head_dim), dtype=np.float32)
    delta = np.zeros((n_levels, layers, 2), dtype=bool)
    tmap = np.zeros((n_levels, layers, 2, heads, head_dim), dtype=np.int64)
    table_lo, table_freqs = [], []
    for li, name in enumerate(LEVELS):
        step[li] = (LEVEL_STEP[name] * group_scales[:, :, None, None] * rms[:, :, None, None] * adj).astype(np.float32)
        st = step[li][:, :, :, None, :]
        off = offset[:, :, :, None, :]
        if value_token_scales:
            qs = [
                quantize_with(torch.from_numpy(c), torch.from_numpy(step[li]), torch.from_numpy(offset), name, None,
                              keys_pre_rope, vexp).symbols.numpy().astype(np.int32)
                for c, vexp in zip(chunks, chunk_vexp)
            ]
        else:
            qs = [np.clip(np.round((c - off) / st), -SYMBOL_LIMIT, SYMBOL_LIMIT).astype(np.int32) for c in chunks]
        los, freqs = [], []
        for l in range(layers):
            for kv in range(2):
                raw = np.concatenate([q[l, kv] for q in qs], axis=1)  # [H, N, D]
                diffs = np.concatenate([np.concatenate([q[l, kv][:, :1], np.diff(q[l, kv], axis=1)], axis=1) for q in qs], axis=1)
                use_delta = raw.shape[1] > len(qs) and channel_entropies(diffs).mean() < channel_entropies(raw).mean()
                delta[li, l, kv] = use_delta
                coded = diffs if use_delta else raw
                spread = coded.astype(np.float64).std(axis=1)  # [H, D]
                order = np.argsort(spread.ravel(), kind="stable")
                group_of = np.empty(order.size, dtype=np.int64)
                group_of[order] = np.arange(order.size) * n_groups // order.size
                base = len(los)
                tmap[li, l, kv] = (base + group_of).reshape(heads, head_dim)
                flat = coded.transpose(0, 2, 1).reshape(heads * head_dim, -1)
                for g in range(n_groups):
                    vals, counts = np.unique(flat[group_of == g], return_counts=True)
                    lo, f = table_from_histogram(vals, counts, scale_bits)
                    los.append(lo)
                    freqs.append(f)
        table_lo.append(np.array(los, dtype=np.int64))
        table_freqs.append(freqs)
        if progress is not None:
            progress(li + 1, n_levels)
    facts = {
        "calibration_tokens": int(cat.shape[3]),
        "samples": len(kv_samples),
        "n_groups": n_groups,
        "importance_power": importance_power if (key_importance is not None or value_importance is not None) else 0,
        "chunk_tokens": chunk_tokens,
        "value_token_scales": bool(value_token_scales),
        "group_scales": [[round(float(v), 6) for v in row] for row in group_scales],
    }
    facts.update(info or {})
    return CodecProfile(
        model_id=model_id,
        step=step,
        offset=offset,
        delta=delta,
        tmap=tmap,
        table_lo=table_lo,
        table_freqs=table_freqs,
        scale_bits=scale_bits,
        keys_pre_rope=keys_pre_rope,
        info=facts,
    )


def collect_calibration_kv(
    model,
    tokenizer,
    texts: list[tuple[str, str]],
    max_tokens: int,
    max_context: int | None = None,
    progress=None,
    return_ids: bool = False,
) -> tuple:
    """Prefill texts through ``model`` and collect pre-RoPE KV and queries for calibration.

    Each text contributes one prefill of at most ``max_context`` tokens (default: the model's trained context,
    capped at 1,024) until ``max_tokens`` tokens are collected.

    Returns
    -------
    kv_samples : list of Tensor[L, 2, H, T_i, D]
    q_samples : list of Tensor[L, Hq, T_i, D]
    ids : list of Tensor[T_i]
        Only with ``return_ids=True``: the token ids of each sample.
    """
    from kvrecall.models import capture_qkv, tokenize

    if max_tokens < 1:
        raise CodecError("max_tokens must be >= 1")
    ctx = max_context or min(int(getattr(model.config, "max_position_embeddings", 1024) or 1024), 1024)
    kvs, qs, all_ids, total = [], [], [], 0
    for _name, text in texts:
        if total >= max_tokens:
            break
        ids = tokenize(tokenizer, text, min(ctx, max_tokens - total))
        if ids.numel() < 2:
            continue
        qkv = capture_qkv(model, ids)
        kvs.append(qkv.kv())
        qs.append(qkv.q)
        all_ids.append(ids)
        total += ids.numel()
        if progress is not None:
            progress(ids.numel())
    if not kvs:
        raise CodecError("no usable calibration text (every text tokenized to fewer than 2 tokens)")
    return (kvs, qs, all_ids) if return_ids else (kvs, qs)
