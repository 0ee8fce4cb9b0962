"""Uniform scalar quantization of KV tensors with per-channel steps and per-layer-group bit allocation.

Every element ``x[l, kv, h, t, d]`` becomes an integer symbol::

    q = clamp(round((x - offset[l, kv, h, d]) / step[l, kv, h, d]), -32767, 32767)      (int16)
    x_hat = q * step[l, kv, h, d] + offset[l, kv, h, d]

The step is the same for every token (no per-token scales to ship): with an entropy coder behind it, a fixed
step per channel gives the lowest error for a given number of bits, and outliers just cost more bits (or an
escape). Steps come from a calibrated :class:`~kvrecall.encoder.profile.CodecProfile` or, without one, from
statistics of the chunk itself (stored in the chunk).

A *level* scales all steps; early layers get finer steps than late ones (CacheGen's observation that errors in
early layers hurt most). :data:`LEVELS` lists the names from finest to coarsest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvrecall.encoder.errors import CodecError

__all__ = [
    "LEVELS",
    "LEVEL_STEP",
    "QuantizedChunk",
    "level_index",
    "layer_step_factors",
    "check_kv",
    "quantize_with",
    "dequantize",
    "SYMBOL_LIMIT",
    "LOSSLESS",
    "SINK_SCORE_THRESHOLD",
    "find_sink_tokens",
    "exact_dtype_for",
    "with_exact_tokens",
    "VALUE_SCALE_TABLE",
    "value_token_exponents",
    "VALUE_SCALE_MIN_HEAD_DIM",
]

#: Per-token value scale factors: exponent ``e`` in ``[-8, 7]`` means ``2 ** (e / 4)`` (quarter octaves, +-2 octaves).
#: The decoder multiplies ``float32(q) * step`` by ``VALUE_SCALE_TABLE[e + 8]`` (float32, this exact table).
VALUE_SCALE_TABLE = np.exp2(np.arange(-8, 8, dtype=np.float64) / 4).astype(np.float32)
VALUE_EXP_MIN, VALUE_EXP_MAX = -8, 7
#: Per-token value scales are used (by default) only from this head_dim on: their exponents cost ``2 / D`` bits
#: per element (stories260K, D=8: +0.25 bits, a net loss; SmolLM2, D=64: +0.03 bits for 40% lower KL).
VALUE_SCALE_MIN_HEAD_DIM = 32

#: Level name of the lossless mode: every value stored in its own dtype (no quantization, no streams).
LOSSLESS = "lossless"

#: Quality levels, finest first.
LEVELS: tuple[str, ...] = ("high", "medium-high", "medium", "medium-low", "low", "lowest")

#: Base step of each level, in units of the layer's RMS (keys and values separately); about half a bit per element
#: between neighbours (bits ~ -log2(step)).
LEVEL_STEP: dict[str, float] = {
    "high": 0.25,
    "medium-high": 0.35,
    "medium": 0.5,
    "medium-low": 0.65,
    "low": 1.0,
    "lowest": 1.4,
}

SYMBOL_LIMIT = 32767  # quantized symbols are clamped to [-SYMBOL_LIMIT, SYMBOL_LIMIT] (int16)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def level_index(level: str | int) -> int:
    """Index of ``level`` (a name from :data:`LEVELS`, or an index) in :data:`LEVELS`."""
    if isinstance(level, (int, np.integer)) and not isinstance(level, bool):
        if 0 <= int(level) < len(LEVELS):
            return int(level)
    elif isinstance(level, str) and level in LEVELS:
        return LEVELS.index(level)
    raise CodecError(f"unknown codec level {level!r}; choose one of {', '.join(LEVELS)}")


def layer_step_factors(num_layers: int) -> np.ndarray:
    """Per-layer step multipliers: the first third of the layers 0.6x, the middle third 1x, the last third 1.25x.

    Returns
    -------
    ndarray[num_layers], float64
    """
    pos = (np.arange(num_layers) + 0.5) / max(num_layers, 1)
    return np.where(pos < 1 / 3, 0.6, np.where(pos < 2 / 3, 1.0, 1.25))


@dataclass
class QuantizedChunk:
    """The working form of a chunk: integer symbols plus the steps/offsets that turn them back into values.

    Attributes
    ----------
    symbols : Tensor[L, 2, H, T, D], int16
        Quantized values.
    step, offset : Tensor[L, 2, H, D], float32
        ``x_hat = symbols * step[..., None, :] + offset[..., None, :]``.
    dtype : torch.dtype
        dtype of the tensor that was quantized (and that :func:`dequantize` returns by default).
    level : str
        Name from :data:`LEVELS`.
    profile_id : str or None
        Id of the profile that supplied steps/offsets, None when they came from the chunk itself.
    keys_pre_rope : bool
        Whether the keys are stored before RoPE (the default form).
    exact_tokens : Tensor[n], int64, optional
        Tokens stored exactly (attention sinks; every token at level ``"lossless"``); their symbols are 0.
    exact_values : Tensor[L, 2, H, n, D], optional
        Their values, in fp16/bf16/fp32 (:func:`exact_dtype_for`); :func:`dequantize` writes them back.
    value_exp : Tensor[L, H, T], int8, optional
        Per-token value scale exponents (:func:`value_token_exponents`): value ``t`` of (layer, head) is
        ``float32(float32(q) * step) * VALUE_SCALE_TABLE[e + 8] + offset``. None: no per-token scales.
    """

    symbols: torch.Tensor
    step: torch.Tensor
    offset: torch.Tensor
    dtype: torch.dtype
    level: str
    profile_id: str | None = None
    keys_pre_rope: bool = True
    exact_tokens: torch.Tensor | None = None
    exact_values: torch.Tensor | None = None
    value_exp: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.symbols.shape)

    @property
    def n_exact(self) -> int:
        return 0 if self.exact_tokens is None else int(self.exact_tokens.numel())


def check_kv(kv: torch.Tensor) -> None:
    """Raise :class:`CodecError` unless ``kv`` is a finite ``[L, 2, H, T>=1, D]`` fp32/fp16/bf16 tensor."""
    if not isinstance(kv, torch.Tensor):
        raise CodecError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.ndim != 5 or kv.shape[1] != 2:
        raise CodecError(f"kv must have shape [layers, 2, kv_heads, tokens, head_dim], got {tuple(kv.shape)}")
    if min(kv.shape) < 1:
        raise CodecError(f"kv has an empty dimension: {tuple(kv.shape)}")
    if kv.dtype not in _DTYPES:
        raise CodecError(f"kv dtype must be float32, float16 or bfloat16, got {kv.dtype}")
    if max(kv.shape[0], kv.shape[2], kv.shape[4]) > 65535 or kv.shape[3] > 2**31 - 1:
        raise CodecError(f"kv shape {tuple(kv.shape)} exceeds the format's limits")
    if not bool(torch.isfinite(kv).all()):
        raise CodecError("kv contains NaN or infinite values")


def value_token_exponents(values: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per-token scale exponents of values ``[L, H, T, D]`` (offsets ``[L, H, D]``): KIVI-style per-token steps.

    ``e = clip(round(4 * log2(rms_t / median_t rms_t)), -8, 7)`` per (layer, head), ``rms_t`` the RMS of token
    ``t``'s offset-removed values: a token's step follows its own magnitude (quarter-octave resolution), relative
    to the chunk's median token, so the profile's step stays the step of a typical token.

    Returns
    -------
    Tensor[L, H, T], int8
    """
    x = values.detach().to("cpu", torch.float32) - offset.to(torch.float32)[:, :, None, :]
    rms = x.pow(2).mean(dim=-1).sqrt()
    ref = rms.median(dim=-1, keepdim=True).values.clamp_min(1e-30)
    e = torch.round(4 * torch.log2(rms.clamp_min(1e-30) / ref))
    return e.clamp_(VALUE_EXP_MIN, VALUE_EXP_MAX).to(torch.int8)


def value_scales(value_exp: torch.Tensor) -> torch.Tensor:
    """``VALUE_SCALE_TABLE[e + 8]``: Tensor[L, H, T], float32."""
    return torch.from_numpy(VALUE_SCALE_TABLE)[value_exp.to(torch.int64) + 8]


def quantize_with(
    kv: torch.Tensor,
    step: torch.Tensor,
    offset: torch.Tensor,
    level: str,
    profile_id: str | None,
    keys_pre_rope: bool,
    value_exp: torch.Tensor | None = None,
) -> QuantizedChunk:
    """Quantize ``kv`` ``[L, 2, H, T, D]`` with the given ``step``/``offset`` ``[L, 2, H, D]`` (float32) and, for
    values, the per-token scale exponents ``value_exp`` ``[L, H, T]`` (int8, optional)."""
    x = kv.detach().to("cpu", torch.float32)
    st = step.to(torch.float32)[:, :, :, None, :]
    off = offset.to(torch.float32)[:, :, :, None, :]
    if value_exp is not None:
        st = st.expand(x.shape).clone()
        st[:, 1] = st[:, 1] * value_scales(value_exp)[..., None]
    q = torch.round((x - off) / st).clamp_(-SYMBOL_LIMIT, SYMBOL_LIMIT).to(torch.int16)
    return QuantizedChunk(
        q, step.to(torch.float32), offset.to(torch.float32), kv.dtype, level, profile_id, keys_pre_rope,
        value_exp=value_exp,
    )


def dequantize(q: QuantizedChunk, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Values of a :class:`QuantizedChunk`: ``Tensor[L, 2, H, T, D]`` in ``dtype`` (default: the original dtype)."""
    step = q.step.to(torch.float32).numpy()[:, :, :, None, :]
    offset = q.offset.to(torch.float32).numpy()[:, :, :, None, :]
    x = np.multiply(q.symbols.numpy(), step, dtype=np.float32)  # numpy: single-threaded, no torch thread contention
    if q.value_exp is not None:
        x[:, 1] *= value_scales(q.value_exp).numpy()[..., None]
    x += offset
    out = torch.from_numpy(x)
    if q.n_exact:
        if q.exact_values.dtype == torch.float32 and (dtype or q.dtype) == torch.float32:
            out[:, :, :, q.exact_tokens] = q.exact_values
        else:
            out[:, :, :, q.exact_tokens] = q.exact_values.to(torch.float32)
    return out.to(device=device, dtype=dtype or q.dtype)


#: A token is an attention sink when the mean over layers and heads of ``log(value RMS / median value RMS of the
#: chunk)`` is below this (SmolLM2's position-0 token: -1.32 on every evaluation text; no other token of
#: 3 x 2,048 below -0.63; see ``docs/codec.md``).
SINK_SCORE_THRESHOLD = -1.0


def find_sink_tokens(kv: torch.Tensor, threshold: float = SINK_SCORE_THRESHOLD) -> torch.Tensor:
    """Tokens of ``kv`` ``[L, 2, H, T, D]`` that look like attention sinks: values far smaller than the chunk's.

    Sinks draw a large share of attention while carrying almost no value, so a quantization error there moves
    every attention output; the codec stores them exactly (measured on SmolLM2: next-token KL 16x lower at
    +0.01 bits per element).

    Returns
    -------
    Tensor[n], int64, ascending
    """
    if kv.shape[3] < 8:  # too few tokens for a robust median
        return torch.zeros(0, dtype=torch.int64)
    v = kv[:, 1].detach().to("cpu", torch.float32)
    rms = v.pow(2).mean(dim=-1).sqrt().clamp_min(1e-30)  # [L, H, T]
    score = torch.log(rms / rms.median(dim=-1, keepdim=True).values).mean(dim=(0, 1))  # [T]
    return torch.nonzero(score < threshold).flatten().to(torch.int64)


def exact_dtype_for(kv: torch.Tensor, lossless: bool = False) -> torch.dtype:
    """dtype of exactly stored values: the chunk's own dtype if lossless or 16-bit, else fp16 when it holds them."""
    if lossless or kv.dtype != torch.float32:
        return kv.dtype
    return torch.float16 if bool(kv.abs().max() <= torch.finfo(torch.float16).max) else torch.float32


def with_exact_tokens(q: QuantizedChunk, kv: torch.Tensor, tokens: torch.Tensor) -> QuantizedChunk:
    """``q`` with ``tokens`` stored exactly: their symbols set to 0, their values kept (see :func:`exact_dtype_for`)."""
    if tokens.numel() == 0:
        return q
    tokens = tokens.to(torch.int64)
    vals = kv[:, :, :, tokens].detach().to("cpu")
    vals = vals.to(exact_dtype_for(vals))
    q.symbols[:, :, :, tokens] = 0
    q.exact_tokens, q.exact_values = tokens, vals.contiguous()
    return q
