"""RoPE description shared by the kernels that rotate keys stored pre-RoPE at their true positions.

Keys in the working cache are stored before RoPE; a kernel rotates key ``t`` by the angles of position
``t + position_offset`` while it loads it. Two equivalent sources of angles are accepted:

* tables ``cos, sin`` of shape ``[P, D]`` in Hugging Face's rotate-half layout (``cos[:, :D/2] == cos[:, D/2:]``),
  e.g. :func:`kvrecall.models.rope_cos_sin` for positions ``0..P-1``; any RoPE scaling the model uses is already
  in them. Only the first half of the columns is kept.
* ``inv_freq`` of shape ``[D/2]`` (the model's ``rotary_emb.inv_freq``) and an ``attention_scaling`` factor;
  the kernel computes ``angle = position * inv_freq`` in float32 like Hugging Face does.

The rotation is the rotate-half form: for ``i < D/2``::

    k'[i]       = k[i] * cos[i] - k[i + D/2] * sin[i]
    k'[i + D/2] = k[i + D/2] * cos[i] + k[i] * sin[i]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrecall.kernels.common import KernelInputError, KernelShapeError, check_tensor
from kvrecall.models import rope_tables

__all__ = ["RopeSpec"]


@dataclass(frozen=True)
class RopeSpec:
    """Angles for RoPE at true positions; build with :meth:`from_tables` or :meth:`from_inv_freq`.

    Attributes
    ----------
    cos_half, sin_half : Tensor[P, D/2], float32, or None
    inv_freq : Tensor[D/2], float32, or None
    attention_scaling : float
        Multiplies cos and sin computed from ``inv_freq`` (tables already include it).
    position_offset : int
        Position of token index 0.
    """

    cos_half: torch.Tensor | None = None
    sin_half: torch.Tensor | None = None
    inv_freq: torch.Tensor | None = None
    attention_scaling: float = 1.0
    position_offset: int = 0

    @classmethod
    def from_tables(cls, cos: torch.Tensor, sin: torch.Tensor, position_offset: int = 0) -> "RopeSpec":
        """From ``[P, D]`` rotate-half tables (``kvrecall.models.rope_cos_sin``) covering positions ``0..P-1``."""
        check_tensor("cos", cos, ndim=2)
        check_tensor("sin", sin, shape=tuple(cos.shape))
        if not cos.is_floating_point() or not sin.is_floating_point():
            raise KernelInputError("cos and sin must be floating point")
        d = cos.shape[1]
        if d % 2:
            raise KernelShapeError(f"RoPE tables need an even head_dim, got {d}")
        half = d // 2
        cos32, sin32 = cos.float(), sin.float()
        if not (torch.equal(cos32[:, :half], cos32[:, half:]) and torch.equal(sin32[:, :half], sin32[:, half:])):
            raise KernelInputError("cos/sin tables are not in rotate-half layout (first half != second half)")
        _check_offset(position_offset)
        return cls(
            cos_half=cos32[:, :half].contiguous(),
            sin_half=sin32[:, :half].contiguous(),
            position_offset=int(position_offset),
        )

    @classmethod
    def from_inv_freq(
        cls, inv_freq: torch.Tensor, attention_scaling: float = 1.0, position_offset: int = 0
    ) -> "RopeSpec":
        """From the model's ``inv_freq`` (``[D/2]``); angles are computed in the kernel."""
        check_tensor("inv_freq", inv_freq, ndim=1)
        if not inv_freq.is_floating_point():
            raise KernelInputError("inv_freq must be floating point")
        _check_offset(position_offset)
        return cls(
            inv_freq=inv_freq.float().contiguous(),
            attention_scaling=float(attention_scaling),
            position_offset=int(position_offset),
        )

    @property
    def half_dim(self) -> int:
        """``D / 2``."""
        return int(self.inv_freq.shape[0] if self.inv_freq is not None else self.cos_half.shape[1])

    @property
    def max_positions(self) -> int | None:
        """Number of table rows (positions ``0..P-1``), or None when angles come from ``inv_freq``."""
        return None if self.cos_half is None else int(self.cos_half.shape[0])

    def to(self, device: torch.device | str) -> "RopeSpec":
        """A copy with its tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RopeSpec(move(self.cos_half), move(self.sin_half), move(self.inv_freq),
                        self.attention_scaling, self.position_offset)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full rotate-half tables ``[..., D]`` float32 at token indices ``positions`` (offset added here)."""
        pos = positions.long() + self.position_offset
        if self.cos_half is None:
            cos, sin = rope_tables(self.inv_freq, pos, self.attention_scaling)
            return cos.reshape(*pos.shape, -1), sin.reshape(*pos.shape, -1)
        cos, sin = self.cos_half[pos], self.sin_half[pos]
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def _check_offset(position_offset: int) -> None:
    if int(position_offset) < 0:
        raise KernelInputError(f"position_offset must be >= 0, got {position_offset}")
