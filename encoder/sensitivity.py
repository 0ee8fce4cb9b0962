"""Bit allocation per (layer, K/V) from the model's measured sensitivity to quantization error.

:func:`measure_sensitivity` quantizes one (layer, K/V) at a time (everything else exact) and measures the
next-token KL of a teacher-forced continuation; :func:`group_scales_from_sensitivity` turns those KLs into
per-(layer, K/V) step multipliers for :func:`~kvrecall.encoder.calibrate.calibrate_profile` (``group_scales=``).

High-rate model: the KL caused by group ``i`` is ``KL_i ~ c_i * step_i**2`` and its bits ``~ -log2(step_i)``, so
at a fixed total number of bits the summed KL is smallest when every group contributes the same KL:
``step_i ~ c_i ** -1/2``. On SmolLM2 the measured ``KL_i`` span 2.6e-6 .. 1.6e-3 (values of layers 3-10 are
30-100x more sensitive than anything else), which is why this allocation beats fixed layer-group factors there
(``docs/codec.md``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from kvrecall.encoder.errors import CodecError

__all__ = ["measure_sensitivity", "group_scales_from_sensitivity", "SENSITIVITY_LEVEL"]

#: Level at which sensitivity is measured (coarse enough that the KL of one group is well above noise).
SENSITIVITY_LEVEL = "low"


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    ref = torch.log_softmax(ref_logits.double(), -1)
    got = torch.log_softmax(logits.double(), -1)
    return float((ref.exp() * (ref - got)).sum(-1).clamp(min=0).mean())


def measure_sensitivity(
    model,
    kv: torch.Tensor,
    cont_ids: torch.Tensor,
    profile,
    level: str = SENSITIVITY_LEVEL,
    progress: Callable | None = None,
) -> np.ndarray:
    """Next-token KL when only one (layer, K/V) of ``kv`` is replaced by its quantized form.

    Parameters
    ----------
    model
        The model the KV came from (``kvrecall.models.load_model``).
    kv : Tensor[L, 2, H, T, D]
        Context KV, keys pre-RoPE.
    cont_ids : Tensor[N]
        Continuation token ids (N >= 2) scored teacher-forced after the context.
    profile : CodecProfile
        Its steps at ``level`` (with sinks and per-token value scales as the codec applies them) are measured.
    level : str
    progress : callable, optional
        Called as ``progress(done, total)``.

    Returns
    -------
    ndarray[L, 2], float64
        KL (nats per token) of each (layer, K/V) quantized alone.
    """
    from kvrecall.encoder.codec import quantize
    from kvrecall.encoder.quantize import dequantize
    from kvrecall.models import logits_with_context_kv

    if cont_ids.numel() < 2:
        raise CodecError("sensitivity needs at least 2 continuation tokens")
    kv = kv.detach().to("cpu", torch.float32)
    quantized = dequantize(quantize(kv, profile, level), dtype=torch.float32)
    ref = logits_with_context_kv(model, kv, cont_ids)
    layers = kv.shape[0]
    out = np.zeros((layers, 2))
    for layer in range(layers):
        for k in range(2):
            mixed = kv.clone()
            mixed[layer, k] = quantized[layer, k]
            out[layer, k] = _kl(ref, logits_with_context_kv(model, mixed, cont_ids))
            if progress is not None:
                progress(layer * 2 + k + 1, layers * 2)
    return out


def group_scales_from_sensitivity(
    sensitivity: np.ndarray, measured_scales: np.ndarray | None = None, clip: float = 4.0
) -> np.ndarray:
    """Per-(layer, K/V) step multipliers that equalize every group's KL contribution.

    Parameters
    ----------
    sensitivity : ndarray[L, 2]
        :func:`measure_sensitivity` output.
    measured_scales : ndarray[L, 2], optional
        The group scales of the profile the sensitivity was measured with (default: the layer-group factors of
        :func:`~kvrecall.encoder.quantize.layer_step_factors`); the KL of a group scales with its step squared.
    clip : float
        Multipliers are clipped to ``[1 / clip, clip]`` around their geometric mean.

    Returns
    -------
    ndarray[L, 2], float64
        Geometric mean 1; pass as ``group_scales=`` to ``calibrate_profile``.
    """
    from kvrecall.encoder.quantize import layer_step_factors

    w = np.asarray(sensitivity, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != 2 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise CodecError(f"sensitivity must be a finite non-negative [L, 2] array, got shape {w.shape}")
    if measured_scales is None:
        measured_scales = np.repeat(layer_step_factors(w.shape[0])[:, None], 2, axis=1)
    w = np.maximum(w, 1e-6 * max(float(w.max()), 1e-30))
    log_g = np.log(np.asarray(measured_scales, dtype=np.float64) * w**-0.5)
    # Clip in log space around a centre chosen so that the clipped values have geometric mean exactly 1: clipping
    # first and renormalizing after would push values past the clip again. The clipped mean falls monotonically
    # as the centre rises, so bisection finds it.
    limit = float(np.log(clip))
    lo, hi = float(log_g.min()) - limit, float(log_g.max()) + limit
    for _ in range(200):
        centre = 0.5 * (lo + hi)
        if np.clip(log_g - centre, -limit, limit).mean() > 0:
            lo = centre
        else:
            hi = centre
    return np.exp(np.clip(log_g - 0.5 * (lo + hi), -limit, limit))
