"""The offload store of retrieval decoding: every offloaded K/V row of one layer, in a compact working form.

Rows leave resident memory when they leave the recent window (or at prefill). They live in host memory —
pinned when CUDA is present, so that a gather of selected rows can be copied to the GPU asynchronously — in one
of these forms (``form``):

``"exact"``   the model's dtype, bit-identical rows (what the full-budget equality tests use);
``"float16"`` half precision;
``"int8"``    asymmetric per-row quantization: ``x = code * scale + zero`` over the head dim, fp16 scale/zero;
``"int4"``    the same with 4-bit codes, two per byte (channel ``2j`` in the low nibble, KIVI's packing).

Keys are stored **post-RoPE**, rotated once at their true positions when they enter the store: a retrieval
cache never moves a token, and rotating the gathered rows again at every decode step cost more than scoring them
(2.2 ms per layer and step for the ~17,600 candidate rows of a 32K context on one core; docs/retrieval-decoding.md).
Codes for scoring are taken from the pre-RoPE keys before they are stored.

:meth:`OffloadStore.dot` and :meth:`OffloadStore.mix` compute ``q · k`` and ``sum w v`` over selected rows without
dequantizing them first (for int8/int4 rows ``x = c * scale + zero``, so ``q · x = scale (q · c) + zero sum(q)``):
the decode step's exact scores and its weighted values. Rows are read through a
:class:`~kvrecall.kernels.fetch.HostRowGather` per target device: on a GPU the selected rows are staged in
pinned memory and cross in their stored form (int8 / int4 codes with fp16 scales, or fp16 rows), and are
dequantized or scored there; :attr:`OffloadStore.fetched_rows` / ``fetched_bytes`` count what was read.
"""

from __future__ import annotations

import torch

from kvrecall.kernels.fetch import HostRowGather
from kvrecall.kernels.kivi import pack_int4, unpack_int4

__all__ = ["OFFLOAD_FORMS", "OffloadStore", "RetrievalError", "resident_row_dtype"]

OFFLOAD_FORMS = ("exact", "float16", "int8", "int4")


def resident_row_dtype(model_dtype: torch.dtype, form: str) -> torch.dtype:
    """Dtype of the rows a retrieval cache keeps resident (sinks, window) next to rows offloaded in ``form``:
    the model's own under ``"exact"``, else 16 bits (float16 for a float32 model; a 16-bit model's own)."""
    if form == "exact" or model_dtype.itemsize <= 2:
        return model_dtype
    return torch.float16


class RetrievalError(ValueError):
    """Retrieval decoding cannot run as asked (unsupported input, setting or generation mode)."""


class _Rows:
    """A growable ``[B, H, cap, width]`` buffer of one tensor kind."""

    def __init__(self, b: int, h: int, width: int, dtype: torch.dtype, pin: bool) -> None:
        self.b, self.h, self.width, self.dtype, self.pin = b, h, width, dtype, pin
        self.data = self._alloc(0)

    def _alloc(self, cap: int) -> torch.Tensor:
        t = torch.empty(self.b, self.h, cap, self.width, dtype=self.dtype)
        return t.pin_memory() if self.pin else t

    def ensure(self, n: int, cap_now: int) -> None:
        if n <= self.data.shape[2]:
            return
        grown = self._alloc(max(n, 2 * self.data.shape[2], 256))
        grown[:, :, :cap_now] = self.data[:, :, :cap_now]
        self.data = grown


class OffloadStore:
    """Offloaded post-RoPE keys and values of one layer.

    Parameters
    ----------
    batch, kv_heads, head_dim : int
    form : one of :data:`OFFLOAD_FORMS`.
    dtype : the model's dtype (rows come back in it).
    pin : pin host memory (default: when CUDA is available).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, form: str, dtype: torch.dtype,
                 pin: bool | None = None) -> None:
        if form not in OFFLOAD_FORMS:
            raise RetrievalError(f"offload form must be one of {OFFLOAD_FORMS}, got {form!r}")
        if form == "int4" and head_dim % 2:
            raise RetrievalError(f"int4 rows need an even head_dim, got {head_dim}")
        self.form, self.dtype, self.head_dim = form, dtype, head_dim
        pin = torch.cuda.is_available() if pin is None else pin
        self.length = 0
        if form in ("exact", "float16"):
            row_dtype = dtype if form == "exact" else torch.float16
            self._parts = {name: _Rows(batch, kv_heads, head_dim, row_dtype, pin) for name in ("k", "v")}
        else:
            width = head_dim if form == "int8" else head_dim // 2
            self._parts = {}
            for name in ("k", "v"):
                self._parts[name] = _Rows(batch, kv_heads, width, torch.uint8, pin)
                self._parts[name + "_scale"] = _Rows(batch, kv_heads, 2, torch.float16, pin)  # scale, zero
        self._gatherers: dict[torch.device, HostRowGather] = {}

    @property
    def fetched_rows(self) -> int:
        """Rows read from the store so far (keys and values counted apart), on every device."""
        return sum(g.rows for g in self._gatherers.values())

    @property
    def fetched_bytes(self) -> int:
        """Bytes of the rows (and their scales) read from the store so far; on a GPU, bytes copied to it."""
        return sum(g.nbytes for g in self._gatherers.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (the used part of the buffers)."""
        total = 0
        for rows in self._parts.values():
            total += rows.b * rows.h * self.length * rows.width * rows.data.element_size()
        return total

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = 255 if self.form == "int8" else 15
        xf = x.float()
        lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        scale = ((hi - lo) / levels).clamp_min(1e-8).half()
        zero = lo.half()
        codes = ((xf - zero.float()) / scale.float()).round().clamp(0, levels).to(torch.uint8)
        if self.form == "int4":
            codes = pack_int4(codes)
        return codes, torch.cat([scale, zero], dim=-1)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows ``[B, Hkv, n, D]`` (keys post-RoPE) at the next token indices."""
        n = keys.shape[2]
        if n == 0:
            return
        start, end = self.length, self.length + n
        for rows in self._parts.values():
            rows.ensure(end, start)
        for name, x in (("k", keys), ("v", values)):  # quantized where the rows are (a GPU), then copied down
            x = x.detach()
            if self.form in ("exact", "float16"):
                self._parts[name].data[:, :, start:end] = x.to(self._parts[name].dtype).cpu()
            else:
                codes, sz = self._encode(x)
                self._parts[name].data[:, :, start:end] = codes.cpu()
                self._parts[name + "_scale"].data[:, :, start:end] = sz.cpu()
        self.length = end

    def _flat(self, idx: torch.Tensor) -> torch.Tensor:
        """Token indices ``[B, Hkv, S]`` -> row numbers of the flattened ``[B * Hkv * capacity]`` buffers."""
        b, h, _ = idx.shape
        cap = self._parts["k"].data.shape[2]
        base = torch.arange(b * h, dtype=torch.int64).reshape(b, h, 1) * cap
        return (idx.to("cpu", torch.int64) + base).reshape(-1)

    def _raw(self, name: str, flat: torch.Tensor, shape: tuple[int, int, int],
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored rows of ``name`` at flat row numbers, on ``device``, as float32 ``[B, Hkv, S, D]`` codes (int
        forms) or values, and ``[B, Hkv, S, 2]`` (scale, zero) for the int forms (None otherwise). One
        ``index_select`` per buffer (a ``gather`` with an expanded index is ~20x slower on CPU); rows cross to a
        GPU in their stored dtype and are widened there."""
        device = torch.device(device)
        gatherer = self._gatherers.get(device)
        if gatherer is None:
            gatherer = self._gatherers[device] = HostRowGather(device)
        data = self._parts[name].data
        sources = {"rows": data.view(-1, data.shape[3])}
        if self.form not in ("exact", "float16"):
            sources["sz"] = self._parts[name + "_scale"].data.view(-1, 2)
        got = gatherer.gather(sources, flat)
        rows = got["rows"]
        if self.form == "int4":
            rows = unpack_int4(rows)
        rows = rows.view(*shape, self.head_dim).float()
        return rows, (got["sz"].float().view(*shape, 2) if "sz" in got else None)

    def _decode(self, name: str, idx: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows of ``name`` at token indices ``idx [B, Hkv, S]``, dequantized on ``device``, in the model's dtype."""
        rows, sz = self._raw(name, self._flat(idx), tuple(idx.shape), device)
        if sz is not None:
            rows = torch.addcmul(sz[..., 1:], rows, sz[..., :1])
        return rows.to(self.dtype)

    def dot(self, indices: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Scores ``q · k`` of queries against the stored (post-RoPE) keys of selected tokens.

        Parameters
        ----------
        indices : Tensor[B, Hkv, S], int64, all ``< length``.
        q : Tensor[B, Hkv, g, D], float32, on the device the scores are wanted on.

        Returns
        -------
        Tensor[B, Hkv, g, S], float32: for int rows ``scale * (q · codes) + zero * sum(q)`` (no dequantized copy).
        """
        rows, sz = self._raw("k", self._flat(indices), tuple(indices.shape), q.device)
        out = torch.matmul(q, rows.transpose(2, 3))
        if sz is None:
            return out
        return out * sz[:, :, None, :, 0] + q.sum(-1, keepdim=True) * sz[:, :, None, :, 1]

    def mix(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sums ``sum_s w[s] v[s]`` of the stored values of selected tokens.

        Parameters
        ----------
        indices : Tensor[B, Hkv, S], int64, all ``< length``.
        weights : Tensor[B, Hkv, g, S], float32 (attention weights; zero for padding rows).

        Returns
        -------
        Tensor[B, Hkv, g, D], float32: for int rows ``(w * scale) @ codes + (w · zero)``.
        """
        rows, sz = self._raw("v", self._flat(indices), tuple(indices.shape), weights.device)
        if sz is None:
            return torch.matmul(weights, rows)
        out = torch.matmul(weights * sz[:, :, None, :, 0], rows)
        return out + (weights * sz[:, :, None, :, 1]).sum(-1, keepdim=True)

    def gather(self, indices: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (post-RoPE) and values of token indices ``[B, Hkv, S]`` (all valid, ``< length``):
        ``[B, Hkv, S, D]`` each, in the model's dtype on ``device`` (stored rows cross, then are dequantized)."""
        return self.gather_part("k", indices, device), self.gather_part("v", indices, device)

    def gather_part(self, part: str, indices: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Keys (``part="k"``) or values (``"v"``) of token indices ``[B, Hkv, S]``: ``[B, Hkv, S, D]`` in the
        model's dtype on ``device`` (a rerank fetches its candidates' keys, then the chosen rows' values)."""
        if part not in ("k", "v"):
            raise RetrievalError(f"part must be 'k' or 'v', got {part!r}")
        return self._decode(part, indices.to("cpu"), device)

    def all_rows(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored row (for prefill chunks that attend densely to earlier ones)."""
        b, h = self._parts["k"].b, self._parts["k"].h
        idx = torch.arange(self.length).expand(b, h, self.length)
        return self.gather(idx, device)
