"""KIVI-style asymmetric int8 / int4 quantization of a KV cache (the working form the kernels read).

Keys are quantized **per channel** within groups of ``group_size`` consecutive tokens (key outliers live in fixed
channels); values are quantized **per token** across the head dimension. Every quantity is asymmetric::

    scale = (max - min) / (2**bits - 1)        zero = min
    code  = clamp(round((x - zero) / scale), 0, 2**bits - 1)
    x_hat = code * scale + zero

Layouts (``B`` batch, ``H`` KV heads, ``T`` tokens, ``D`` head dim, ``NG = ceil(T / group_size)``):

* ``k_codes``, ``v_codes``: ``[B, H, T, D]`` uint8 for 8 bits; ``[B, H, T, D // 2]`` uint8 for 4 bits, byte ``j``
  holding channel ``2j`` in its low nibble and channel ``2j + 1`` in its high nibble.
* ``k_scale``, ``k_zero``: ``[B, H, NG, D]``; token ``t`` uses group ``t // group_size``.
* ``v_scale``, ``v_zero``: ``[B, H, T]``.

Scales and zeros are stored in ``scale_dtype`` (float16 by default); the kernels and :func:`dequantize_keys` /
:func:`dequantize_values` read the stored values, so quantize-then-dequantize is the same on every path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrecall.kernels.common import FLOAT_DTYPES, KernelInputError, KernelShapeError, check_tensor

__all__ = ["KiviRows", "quantize_kv", "dequantize_keys", "dequantize_values", "pack_int4", "unpack_int4"]


@dataclass(frozen=True)
class KiviRows:
    """A KIVI-quantized KV cache for one layer (see the module docstring for layouts)."""

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    bits: int
    group_size: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, T, D)`` of the dequantized cache."""
        b, h, t, _ = self.k_codes.shape
        return (b, h, t, self.head_dim)

    def validate(self, gathered: bool = False) -> None:
        """Raise :class:`KernelInputError` if the fields are inconsistent.

        With ``gathered=True`` the codes and value scales hold ``R`` selected rows (any ``R``) while the key
        scales keep the whole context's groups (any ``NG``): the layout :mod:`kvrecall.kernels.fetch` delivers.
        """
        if self.bits not in (4, 8):
            raise KernelInputError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size < 1:
            raise KernelInputError(f"group_size must be >= 1, got {self.group_size}")
        d = self.head_dim
        if d < 2 or (self.bits == 4 and d % 2):
            raise KernelShapeError(f"head_dim {d} is not usable with {self.bits}-bit codes")
        width = d if self.bits == 8 else d // 2
        codes = check_tensor("k_codes", self.k_codes, dtypes=(torch.uint8,), ndim=4, last_dim_contiguous=True)
        b, h, t, _ = codes.shape
        ng = None if gathered else -(-t // self.group_size)
        check_tensor("k_codes", codes, shape=(b, h, t, width))
        check_tensor("v_codes", self.v_codes, dtypes=(torch.uint8,), shape=(b, h, t, width), last_dim_contiguous=True)
        for name in ("k_scale", "k_zero"):
            check_tensor(name, getattr(self, name), dtypes=FLOAT_DTYPES, shape=(b, h, ng, d), last_dim_contiguous=True)
        if self.k_zero.shape != self.k_scale.shape:
            raise KernelShapeError("k_zero and k_scale shapes differ")
        for name in ("v_scale", "v_zero"):
            check_tensor(name, getattr(self, name), dtypes=FLOAT_DTYPES, shape=(b, h, t), last_dim_contiguous=True)

    def to(self, device: torch.device | str) -> "KiviRows":
        """A copy with every tensor on ``device``."""
        moved = {
            name: getattr(self, name).to(device)
            for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
        }
        return KiviRows(**moved, bits=self.bits, group_size=self.group_size, head_dim=self.head_dim)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack ``[..., D]`` codes in ``0..15`` (any integer dtype, ``D`` even) into ``[..., D // 2]`` uint8."""
    if codes.shape[-1] % 2:
        raise KernelShapeError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., D // 2]`` uint8 -> ``[..., D]`` uint8."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def _quantize(x: torch.Tensor, dim: int, bits: int, scale_dtype: torch.dtype):
    levels = (1 << bits) - 1
    mn = x.amin(dim=dim, keepdim=True)
    mx = x.amax(dim=dim, keepdim=True)
    scale = ((mx - mn) / levels).to(scale_dtype)
    zero = mn.to(scale_dtype)
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((x - zero.float()) / safe).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def quantize_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    bits: int = 8,
    group_size: int = 32,
    scale_dtype: torch.dtype = torch.float16,
) -> KiviRows:
    """Quantize one layer's keys and values KIVI-style.

    Parameters
    ----------
    k, v : Tensor[B, H, T, D], float
        Keys (usually pre-RoPE) and values.
    bits : {4, 8}
    group_size : int
        Tokens per key quantization group.
    scale_dtype : torch.dtype
        Storage dtype of scales and zero points.

    Returns
    -------
    KiviRows
    """
    if bits not in (4, 8):
        raise KernelInputError(f"bits must be 4 or 8, got {bits}")
    if group_size < 1:
        raise KernelInputError(f"group_size must be >= 1, got {group_size}")
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, shape=tuple(k.shape))
    b, h, t, d = k.shape
    if bits == 4 and d % 2:
        raise KernelShapeError(f"4-bit codes need an even head_dim, got {d}")
    ng = -(-t // group_size)
    kf = k.float()
    pad = ng * group_size - t
    if pad:  # pad the last group by repeating its last token (does not change its min/max)
        kf = torch.cat((kf, kf[:, :, -1:].expand(b, h, pad, d)), dim=2)
    grouped = kf.reshape(b, h, ng, group_size, d)
    k_codes, k_scale, k_zero = _quantize(grouped, 3, bits, scale_dtype)
    k_codes = k_codes.reshape(b, h, ng * group_size, d)[:, :, :t]
    v_codes, v_scale, v_zero = _quantize(v.float(), 3, bits, scale_dtype)
    if bits == 4:
        k_codes, v_codes = pack_int4(k_codes), pack_int4(v_codes)
    return KiviRows(
        k_codes=k_codes.contiguous(),
        k_scale=k_scale.reshape(b, h, ng, d).contiguous(),
        k_zero=k_zero.reshape(b, h, ng, d).contiguous(),
        v_codes=v_codes.contiguous(),
        v_scale=v_scale.reshape(b, h, t).contiguous(),
        v_zero=v_zero.reshape(b, h, t).contiguous(),
        bits=bits,
        group_size=group_size,
        head_dim=d,
    )


def _codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(packed) if bits == 4 else packed


def dequantize_keys(qkv: KiviRows) -> torch.Tensor:
    """Keys ``[B, H, T, D]`` float32 from their codes, per-channel group scales and zeros."""
    codes = _codes(qkv.k_codes, qkv.bits).float()
    t = codes.shape[2]
    group = torch.arange(t, device=codes.device) // qkv.group_size
    scale = qkv.k_scale.float()[:, :, group]
    zero = qkv.k_zero.float()[:, :, group]
    return codes * scale + zero


def dequantize_values(qkv: KiviRows) -> torch.Tensor:
    """Values ``[B, H, T, D]`` float32 from their codes and per-token scales and zeros."""
    codes = _codes(qkv.v_codes, qkv.bits).float()
    return codes * qkv.v_scale.float()[..., None] + qkv.v_zero.float()[..., None]
