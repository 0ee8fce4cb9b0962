"""Fetch path: only the selected K/V rows cross from host memory to the GPU.

The whole context's K/V (float, or KIVI int8/int4 codes to cut the bytes that cross PCIe) stays in pinned host
memory. Each call to :meth:`SelectedRowFetcher.fetch` gathers the selected rows on the CPU into a pinned staging
buffer and copies them to a reusable device buffer on a dedicated CUDA stream; the returned
:class:`FetchedRows` carries a CUDA event so the consumer's stream waits only for its own copy. ``num_buffers``
staging/device slots rotate, so the copy of step ``n + 1`` can run while step ``n``'s attention reads its slot.

The fetched rows are in the *gathered* layout of :mod:`kvrecall.kernels.sparse_attention`: row ``s`` of
``[B, Hkv, S, D]`` holds token ``indices[b, h, s]`` (pass ``gathered=True``). For quantized K/V the per-group key
scales of the whole context are small and are copied to the device once, at construction; values' per-token
scales travel with their rows.

On a machine without CUDA the same API gathers into a reusable buffer in ordinary memory (no streams).

:class:`HostRowGather` is the same path for a store that grows (retrieval decoding's offload store): rows of
2-D host buffers picked by row number, staged in pinned memory and copied to the device without a dedicated
stream (each decode step needs its rows at once, so there is nothing to overlap them with).

Reference twin: :func:`fetch_rows_reference` (plain advanced indexing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrecall.kernels.common import (
    FLOAT_DTYPES,
    KernelIndexError,
    KernelInputError,
    KernelShapeError,
    check_tensor,
)
from kvrecall.kernels.kivi import KiviRows

__all__ = ["SelectedRowFetcher", "FetchedRows", "HostRowGather", "fetch_rows_reference"]


@dataclass
class FetchedRows:
    """Rows of one fetch, on the fetcher's device.

    Attributes
    ----------
    k, v : Tensor[B, Hkv, S, D] (float) or None
    quantized : KiviRows or None
        Gathered codes ``[B, Hkv, S, W]``, value scales ``[B, Hkv, S]``, and the whole context's key scales.
    indices, counts : Tensor[B, Hkv, S], Tensor[B, Hkv]
        The selection, on the device (token positions for RoPE and key scale groups).
    nbytes : int
        Bytes copied host -> device by this fetch (rows and their per-token scales).
    """

    k: torch.Tensor | None
    v: torch.Tensor | None
    quantized: KiviRows | None
    indices: torch.Tensor
    counts: torch.Tensor
    nbytes: int
    _ready: object = None
    _slot: int = 0
    _owner: "SelectedRowFetcher | None" = None

    def wait(self, stream: "torch.cuda.Stream | None" = None) -> "FetchedRows":
        """Make ``stream`` (default: the current stream) wait until the copy has landed; returns ``self``."""
        if self._ready is not None:
            (stream or torch.cuda.current_stream(self.indices.device)).wait_event(self._ready)
        return self

    def release(self, stream: "torch.cuda.Stream | None" = None) -> None:
        """Mark the slot reusable once the work queued so far on ``stream`` (default current) has run."""
        if self._owner is not None:
            self._owner._release(self._slot, stream)


def _as_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if pin and not t.is_pinned():
        t = t.pin_memory()
    return t


class SelectedRowFetcher:
    """Gather selected K/V rows from host memory into a reusable device buffer, copying on a side stream.

    Parameters
    ----------
    k, v : Tensor[B, Hkv, T, D], float32/float16/bfloat16, optional
        The whole context (keys as stored, e.g. pre-RoPE). Give either ``k``/``v`` or ``quantized``.
    quantized : KiviRows, optional
        KIVI codes of the whole context instead of float K/V.
    max_selected : int
        Largest selection width ``S`` a fetch may ask for (sizes the buffers).
    device : torch.device or str
        Where the rows go ("cuda", "cuda:1", or "cpu").
    num_buffers : int
        Staging/device slots rotated between fetches (2 = double buffering).
    pin : bool
        Pin host copies when CUDA is used (copies the context once if it is not already pinned).
    """

    def __init__(
        self,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        *,
        quantized: KiviRows | None = None,
        max_selected: int,
        device: torch.device | str = "cpu",
        num_buffers: int = 2,
        pin: bool = True,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise KernelInputError("device is CUDA but CUDA is not available")
        if int(max_selected) < 1:
            raise KernelInputError(f"max_selected must be >= 1, got {max_selected}")
        if int(num_buffers) < 1:
            raise KernelInputError(f"num_buffers must be >= 1, got {num_buffers}")
        self.max_selected = int(max_selected)
        self.num_buffers = int(num_buffers)
        use_cuda = self.device.type == "cuda"
        pin = pin and use_cuda
        if (quantized is None) == (k is None):
            raise KernelInputError("give either k and v, or quantized")
        if quantized is not None:
            if not isinstance(quantized, KiviRows):
                raise KernelInputError(f"quantized must be a KiviRows, got {type(quantized).__name__}")
            quantized.validate()
            self.quantized_meta = (quantized.bits, quantized.group_size, quantized.head_dim)
            self._host = {
                "k": _as_host(quantized.k_codes, pin),
                "v": _as_host(quantized.v_codes, pin),
                "v_scale": _as_host(quantized.v_scale, pin),
                "v_zero": _as_host(quantized.v_zero, pin),
            }
            self._k_scale = quantized.k_scale.to(self.device)
            self._k_zero = quantized.k_zero.to(self.device)
        else:
            check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4)
            check_tensor("v", v, dtypes=FLOAT_DTYPES, shape=tuple(k.shape))
            self.quantized_meta = None
            self._host = {"k": _as_host(k, pin), "v": _as_host(v, pin)}
        b, h, t = self._host["k"].shape[:3]
        self.batch, self.kv_heads, self.tokens = b, h, t
        self._staging = [self._alloc(pin_memory=pin) for _ in range(self.num_buffers)] if use_cuda else None
        self._dev = [self._alloc(device=self.device) for _ in range(self.num_buffers)]
        if use_cuda:
            self._dev_sel = [  # selection copies per slot (preallocated: nothing is allocated on the side stream)
                (torch.empty(b * h * self.max_selected, dtype=torch.int64, device=self.device),
                 torch.empty(b * h, dtype=torch.int64, device=self.device))
                for _ in range(self.num_buffers)
            ]
            self._stream = torch.cuda.Stream(self.device)
            self._copied = [None] * self.num_buffers  # event: H2D copy out of staging slot i finished
            self._released = [None] * self.num_buffers  # event: consumer finished reading device slot i
        self._next = 0

    def _alloc(self, device: torch.device | str = "cpu", pin_memory: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in self._host.items():
            per_row = t[0, 0, 0].numel() if t.dim() == 4 else 1
            n = self.batch * self.kv_heads * self.max_selected * per_row
            out[name] = torch.empty(n, dtype=t.dtype, device=device, pin_memory=pin_memory)
        return out

    @property
    def host_nbytes(self) -> int:
        """Bytes of the host-resident context."""
        return sum(t.numel() * t.element_size() for t in self._host.values())

    def _release(self, slot: int, stream) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record(stream or torch.cuda.current_stream(self.device))
            self._released[slot] = ev

    def _check(self, indices: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor("indices", indices, dtypes=(torch.int64, torch.int32), ndim=3)
        check_tensor("indices", indices, shape=(self.batch, self.kv_heads, None))
        check_tensor("counts", counts, dtypes=(torch.int64, torch.int32), shape=(self.batch, self.kv_heads))
        width = indices.shape[2]
        if width > self.max_selected:
            raise KernelShapeError(f"selection width {width} exceeds max_selected {self.max_selected}")
        idx = indices.to("cpu", torch.int64)
        cnt = counts.to("cpu", torch.int64)
        if ((cnt < 0) | (cnt > width)).any():
            raise KernelIndexError(f"counts must lie in [0, {width}]")
        live = torch.arange(width) < cnt[..., None]
        if (((idx < 0) | (idx >= self.tokens)) & live).any():
            raise KernelIndexError(f"a selected index is negative or >= {self.tokens} (context tokens)")
        return torch.where(live, idx, torch.zeros((), dtype=torch.int64)), live

    def fetch(self, indices: torch.Tensor, counts: torch.Tensor) -> FetchedRows:
        """Gather the rows of a selection and start their copy to the device.

        Parameters
        ----------
        indices : Tensor[B, Hkv, S], int64/int32, any device
            Selected token indices, padded past ``counts`` (padding is not read).
        counts : Tensor[B, Hkv], int64/int32

        Returns
        -------
        FetchedRows
            Views of the fetcher's buffers, valid until ``num_buffers`` further fetches reuse the slot. On CUDA
            call ``.wait()`` before reading the rows on another stream than the fetcher's, and ``.release()``
            after queuing the work that reads them, so the slot can be refilled without waiting for later work.
        """
        rows, _ = self._check(indices, counts)
        b, h, width = rows.shape
        slot = self._next
        self._next = (self._next + 1) % self.num_buffers
        cuda = self.device.type == "cuda"
        if cuda and self._copied[slot] is not None:
            self._copied[slot].synchronize()  # the staging slot's previous copy must be done before overwriting
        target = self._staging[slot] if cuda else self._dev[slot]
        views, nbytes = {}, 0
        # one flat row index per selected row: row (b, h, t) of [B*H*T, ...] is b*H*T + h*T + t
        flat = (rows + torch.arange(b * h, dtype=torch.int64).view(b, h, 1) * self.tokens).reshape(-1)
        for name, src in self._host.items():
            per_row = src.shape[3] if src.dim() == 4 else None
            shape = (b, h, width) if per_row is None else (b, h, width, per_row)
            out = target[name][: b * h * width * (per_row or 1)]
            rows_view = src.view(b * h * self.tokens, per_row) if per_row else src.view(-1)
            torch.index_select(rows_view, 0, flat, out=out.view(-1, per_row) if per_row else out)
            views[name] = out.view(shape)
            nbytes += out.numel() * out.element_size()
        ready = None
        if cuda:
            stream = self._stream
            if self._released[slot] is not None:
                stream.wait_event(self._released[slot])
            else:  # never released: be conservative and wait for everything queued so far
                stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                dev = {}
                for name, staged in views.items():
                    d = self._dev[slot][name][: staged.numel()].view(staged.shape)
                    d.copy_(staged, non_blocking=True)
                    dev[name] = d
                sel_buf, cnt_buf = self._dev_sel[slot]
                sel = sel_buf[: b * h * width].view(b, h, width)
                cnt = cnt_buf.view(b, h)
                sel.copy_(indices, non_blocking=True)
                cnt.copy_(counts, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
            self._copied[slot] = ready
            self._released[slot] = None
            views = dev
        else:
            sel, cnt = indices.to(self.device), counts.to(self.device)
        if self.quantized_meta is not None:
            bits, group, dim = self.quantized_meta
            q = KiviRows(k_codes=views["k"], k_scale=self._k_scale, k_zero=self._k_zero, v_codes=views["v"],
                            v_scale=views["v_scale"], v_zero=views["v_zero"], bits=bits, group_size=group,
                            head_dim=dim)
            return FetchedRows(None, None, q, sel, cnt, nbytes, ready, slot, self)
        return FetchedRows(views["k"], views["v"], None, sel, cnt, nbytes, ready, slot, self)


class HostRowGather:
    """Selected rows of host buffers, delivered on a device: the fetch of a store that grows between calls.

    Each :meth:`gather` picks rows of 2-D host tensors by row number (one ``index_select`` per tensor, in their
    stored dtype: int8 codes cross as int8). For a CUDA ``device`` the rows are gathered into pinned staging
    buffers and copied with ``non_blocking=True`` on the current stream; ``num_slots`` staging slots rotate and
    a slot is rewritten only once its previous copy has landed, so a copy never reads rows a later gather
    overwrote. For a CPU ``device`` the gathered rows are returned as they are (no staging, no copy).

    Parameters
    ----------
    device : torch.device or str
        Where the rows are wanted.
    num_slots : int
        Staging slots (on CUDA); 2 lets the rows of one gather cross while the next is gathered.

    Attributes
    ----------
    rows, nbytes : int
        Rows gathered so far (the length of each call's ``rows``) and their bytes over all tensors; on CUDA
        ``nbytes`` are the bytes copied host -> device.
    """

    def __init__(self, device: torch.device | str = "cpu", num_slots: int = 2) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise KernelInputError("device is CUDA but CUDA is not available")
        if int(num_slots) < 1:
            raise KernelInputError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = int(num_slots)
        self._staging: list[dict[str, torch.Tensor]] = [{} for _ in range(self.num_slots)]
        self._copied: list[object] = [None] * self.num_slots
        self._next = 0
        self.rows = 0
        self.nbytes = 0

    def _buffer(self, slot: int, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._staging[slot].get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            size = max(numel, 2 * (buf.numel() if buf is not None and buf.dtype == dtype else 0))
            buf = torch.empty(size, dtype=dtype, pin_memory=True)
            self._staging[slot][name] = buf
        return buf[:numel]

    def gather(self, sources: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``rows`` of every 2-D host tensor in ``sources``.

        Parameters
        ----------
        sources : dict of name -> Tensor[N, W] on the CPU (pinned for a truly asynchronous copy; any works).
        rows : Tensor[S], int64, on the CPU, every value in ``[0, N)`` (not checked: the store's own indices).

        Returns
        -------
        dict of name -> Tensor[S, W] on ``device``, in each source's dtype. On CUDA valid as soon as the current
        stream reaches them; the staging they came from is reused ``num_slots`` gathers later.
        """
        n = rows.numel()
        self.rows += n
        if self.device.type != "cuda":
            out = {name: src.index_select(0, rows) for name, src in sources.items()}
            self.nbytes += sum(t.numel() * t.element_size() for t in out.values())
            return out
        slot = self._next
        self._next = (slot + 1) % self.num_slots
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # that slot's last copy must have read its staging first
        out = {}
        for name, src in sources.items():
            width = src.shape[1]
            staged = self._buffer(slot, name, n * width, src.dtype).view(n, width)
            torch.index_select(src, 0, rows, out=staged)
            out[name] = staged.to(self.device, non_blocking=True)
            self.nbytes += staged.numel() * staged.element_size()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._copied[slot] = event
        return out


def fetch_rows_reference(x: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Plain-indexing twin: ``out[b, h, s] = x[b, h, indices[b, h, s]]`` for live ``s``; zeros in padding.

    Parameters
    ----------
    x : Tensor[B, H, T, ...]
    indices : Tensor[B, H, S]
    counts : Tensor[B, H]

    Returns
    -------
    Tensor[B, H, S, ...]
    """
    b, h, width = indices.shape
    out = torch.zeros((b, h, width, *x.shape[3:]), dtype=x.dtype)
    for i in range(b):
        for j in range(h):
            c = int(counts[i, j])
            out[i, j, :c] = x[i, j, indices[i, j, :c].long().cpu()].cpu()
    return out
