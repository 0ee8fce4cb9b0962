"""An append-only buffer of key codes, packed to 1.5 bytes per code for 9-12-bit VQ codes.

The codes of a retrieval cache are the one per-token structure it keeps resident beside the sink and window
rows, so their width is the resident cost per token: a 10-bit code in an ``int16`` is 2 bytes per KV head and
token (0.78% of an fp16 KV row of head_dim 64), packed it is 1.5 (0.59%). Codes of 9-12 bits with one sub-vector
(``m == 1``) are stored as a low byte per code plus the high nibbles two to a byte; other codes as the smallest
integer dtype (:func:`kvrecall.retriever.codebooks.code_dtype`). :meth:`CodeBuffer.range` unpacks a token range
to ``int64`` for the scorer.
"""

from __future__ import annotations

import torch

from kvrecall.retriever.codebooks import code_dtype
from kvrecall.retriever.errors import RetrieverError

__all__ = ["CodeBuffer"]

_GROW = 4096  # tokens: capacity grows in steps of this (counted in nbytes)


class CodeBuffer:
    """Codes ``[B, H, n, m]`` of tokens ``0 .. n-1``, appended in order.

    Parameters
    ----------
    batch, heads : leading dimensions; m : sub-vectors per code; bits : bits per code.
    device : where the codes live.
    """

    def __init__(self, batch: int, heads: int, m: int, bits: int, device: str | torch.device = "cpu") -> None:
        if not 1 <= bits <= 31:
            raise RetrieverError(f"bits must be in 1..31, got {bits}")
        self.batch, self.heads, self.m, self.bits = batch, heads, m, bits
        self.packed = m == 1 and 8 < bits <= 12
        self.length = 0
        dev = torch.device(device)
        if self.packed:
            self._low = torch.empty(batch, heads, 0, dtype=torch.uint8, device=dev)
            self._high = torch.empty(batch, heads, 0, dtype=torch.uint8, device=dev)  # two nibbles per byte
        else:
            self._codes = torch.empty(batch, heads, 0, m, dtype=code_dtype(bits), device=dev)

    @property
    def device(self) -> torch.device:
        return (self._low if self.packed else self._codes).device

    @property
    def capacity(self) -> int:
        return self._low.shape[2] if self.packed else self._codes.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not only the codes held)."""
        parts = (self._low, self._high) if self.packed else (self._codes,)
        return sum(t.numel() * t.element_size() for t in parts)

    def _grow(self, need: int) -> None:
        cap = -(-need // _GROW) * _GROW
        if self.packed:
            low = self._low.new_zeros(self.batch, self.heads, cap)
            high = self._high.new_zeros(self.batch, self.heads, cap // 2)
            low[:, :, : self.length] = self._low[:, :, : self.length]
            high[:, :, : self._high.shape[2]] = self._high
            self._low, self._high = low, high
        else:
            codes = self._codes.new_empty(self.batch, self.heads, cap, self.m)
            codes[:, :, : self.length] = self._codes[:, :, : self.length]
            self._codes = codes

    def append(self, codes: torch.Tensor) -> None:
        """Append codes ``[B, H, n, m]`` (integers in ``[0, 2**bits)``) at token indices ``length ..``."""
        if codes.ndim != 4 or tuple(codes.shape[:2]) != (self.batch, self.heads) or codes.shape[3] != self.m:
            raise RetrieverError(f"codes must be [{self.batch}, {self.heads}, n, {self.m}], got {tuple(codes.shape)}")
        n = codes.shape[2]
        if n == 0:
            return
        start, end = self.length, self.length + n
        if end > self.capacity:
            self._grow(end)
        c = codes.to(self.device)
        if not self.packed:
            self._codes[:, :, start:end] = c.to(self._codes.dtype)
            self.length = end
            return
        c = c[..., 0].to(torch.int32)
        self._low[:, :, start:end] = (c & 0xFF).to(torch.uint8)
        hi = (c >> 8).to(torch.uint8)  # 0..15
        if start % 2:  # the first code fills the high nibble of a byte whose low nibble is held
            self._high[:, :, start // 2] |= hi[:, :, 0] << 4
            hi, start = hi[:, :, 1:], start + 1
        pairs = hi.shape[2] // 2
        a = start // 2
        self._high[:, :, a : a + pairs] = hi[:, :, 0 : 2 * pairs : 2] | (hi[:, :, 1 : 2 * pairs : 2] << 4)
        if hi.shape[2] % 2:
            self._high[:, :, a + pairs] = hi[:, :, -1]
        self.length = end

    def range(self, start: int, end: int) -> torch.Tensor:
        """Codes of tokens ``start .. end-1`` as ``int64 [B, H, end - start, m]``."""
        if not 0 <= start <= end <= self.length:
            raise RetrieverError(f"token range [{start}, {end}) outside the {self.length} codes held")
        if not self.packed:
            return self._codes[:, :, start:end].long()
        a, b = start // 2, (end + 1) // 2
        p = self._high[:, :, a:b].to(torch.int16)  # 12-bit codes fit int16: 3x faster than int64 math
        high = torch.stack((p & 15, p >> 4), dim=-1).reshape(self.batch, self.heads, -1)
        high = high[:, :, start - 2 * a : end - 2 * a]
        return (self._low[:, :, start:end].to(torch.int16) | (high << 8)).long()[..., None]
