"""Fetch path: selected rows gathered into a reusable buffer equal plain indexing; feeds gathered attention."""

from __future__ import annotations

import pytest
import torch

from kvrecall.kernels.common import KernelDTypeError, KernelIndexError, KernelInputError, KernelShapeError
from kvrecall.kernels.fetch import HostRowGather, SelectedRowFetcher, fetch_rows_reference
from kvrecall.kernels.kivi import quantize_kv
from kvrecall.kernels.rope import RopeSpec
from kvrecall.models import rope_tables
from kvrecall.kernels.sparse_attention import (
    sparse_decode_attention,
    sparse_decode_attention_quantized,
    sparse_decode_attention_quantized_reference,
    sparse_decode_attention_reference,
)
from kvrecall.kernels.testing import TOLERANCE, random_selection, relative_error


def _kv(b, h, t, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g).to(dtype), torch.randn(b, h, t, d, generator=g).to(dtype), g


def _live_equal(got: torch.Tensor, want: torch.Tensor, counts: torch.Tensor) -> bool:
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            c = int(counts[i, j])
            if not torch.equal(got[i, j, :c].cpu(), want[i, j, :c]):
                return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_float_rows_equal_plain_indexing(dtype):
    k, v, g = _kv(2, 3, 101, 8, dtype, seed=1)
    fetcher = SelectedRowFetcher(k, v, max_selected=64)
    for counts in ([[5, 0, 64], [1, 33, 17]], [[2, 2, 2], [0, 0, 1]]):  # second fetch reuses the buffers
        idx, cnt = random_selection(2, 3, 101, counts, generator=g)
        rows = fetcher.fetch(idx, cnt).wait()
        assert rows.k.shape == (2, 3, idx.shape[2], 8) and rows.k.dtype == dtype
        assert _live_equal(rows.k, fetch_rows_reference(k, idx, cnt), cnt)
        assert _live_equal(rows.v, fetch_rows_reference(v, idx, cnt), cnt)
        assert rows.nbytes == 2 * rows.k.numel() * rows.k.element_size()
        rows.release()


def test_buffers_are_reused_not_reallocated():
    k, v, g = _kv(1, 2, 50, 8, torch.float32, seed=2)
    fetcher = SelectedRowFetcher(k, v, max_selected=20, num_buffers=2)
    ptrs = set()
    for _ in range(4):
        idx, cnt = random_selection(1, 2, 50, [[20, 3]], generator=g)
        ptrs.add(fetcher.fetch(idx, cnt).k.data_ptr())
    assert len(ptrs) == 2  # two slots, rotating


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_rows_and_attention(bits):
    k, v, g = _kv(2, 2, 90, 8, torch.float32, seed=bits)
    kv = quantize_kv(k, v, bits=bits, group_size=16)
    fetcher = SelectedRowFetcher(quantized=kv, max_selected=90)
    idx, cnt = random_selection(2, 2, 90, [[30, 1], [0, 90]], generator=g)
    rows = fetcher.fetch(idx, cnt).wait()
    got = rows.quantized
    for name in ("k_codes", "v_codes", "v_scale", "v_zero"):
        assert _live_equal(getattr(got, name), fetch_rows_reference(getattr(kv, name), idx, cnt), cnt), name
    assert rows.nbytes < 2 * idx.numel() * 8 * 2  # fewer bytes than fp16 rows
    q = torch.randn(2, 4, 8, generator=g)
    rope = RopeSpec.from_tables(*rope_tables(1.0 / (10000 ** (torch.arange(0, 8, 2) / 8)), torch.arange(100)), position_offset=7)
    out = sparse_decode_attention_quantized(q, got, rows.indices, rows.counts, rope=rope, gathered=True)
    direct = sparse_decode_attention_quantized_reference(q, kv, idx, cnt, rope=rope)
    twin = sparse_decode_attention_quantized_reference(q, got, rows.indices, rows.counts, rope=rope, gathered=True)
    assert relative_error(out, direct) <= TOLERANCE[torch.float32]
    assert relative_error(twin, direct) <= TOLERANCE[torch.float32]


def test_fetched_float_rows_feed_attention():
    k, v, g = _kv(1, 2, 77, 8, torch.float16, seed=3)
    q = torch.randn(1, 4, 8, generator=g).to(torch.float16)
    idx, cnt = random_selection(1, 2, 77, [[13, 77]], generator=g)
    rows = SelectedRowFetcher(k, v, max_selected=77).fetch(idx, cnt)
    out = sparse_decode_attention(q, rows.k, rows.v, rows.indices, rows.counts, gathered=True)
    ref = sparse_decode_attention_reference(q, k, v, idx, cnt)
    assert relative_error(out, ref) <= TOLERANCE[torch.float16]


def test_bad_input_raises():
    k, v, g = _kv(1, 2, 30, 8, torch.float32, seed=4)
    with pytest.raises(KernelInputError):
        SelectedRowFetcher(k, v, max_selected=0)
    with pytest.raises(KernelInputError):
        SelectedRowFetcher(max_selected=4)
    with pytest.raises(KernelDTypeError):
        SelectedRowFetcher(k.long(), v.long(), max_selected=4)
    with pytest.raises(KernelShapeError):
        SelectedRowFetcher(k, v[:, :1], max_selected=4)
    fetcher = SelectedRowFetcher(k, v, max_selected=8)
    idx, cnt = random_selection(1, 2, 30, [[8, 2]], generator=g)
    with pytest.raises(KernelShapeError):
        SelectedRowFetcher(k, v, max_selected=4).fetch(idx, cnt)  # wider than the buffers
    bad = idx.clone()
    bad[0, 0, 0] = 30
    with pytest.raises(KernelIndexError):
        fetcher.fetch(bad, cnt)
    with pytest.raises(KernelIndexError):
        fetcher.fetch(idx, torch.tensor([[9, 0]]))
    with pytest.raises(KernelDTypeError):
        fetcher.fetch(idx.float(), cnt)
    with pytest.raises(KernelShapeError):
        fetcher.fetch(idx[:, :1], cnt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned memory, copy stream, events)")
def test_gpu_fetch_overlaps_on_side_stream():
    k, v, g = _kv(2, 4, 4096, 64, torch.float16, seed=5)
    fetcher = SelectedRowFetcher(k, v, max_selected=512, device="cuda")
    for _ in range(3):
        idx, cnt = random_selection(2, 4, 4096, 512, generator=g)
        rows = fetcher.fetch(idx.cuda(), cnt.cuda()).wait()
        assert rows.k.is_cuda
        assert _live_equal(rows.k, fetch_rows_reference(k, idx, cnt), cnt)
        rows.release()


def _host_rows(seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (300, 16), generator=g, dtype=torch.int64).to(torch.uint8)
    scales = torch.randn(300, 2, generator=g).half()
    return {"rows": codes, "sz": scales}, g


def test_host_row_gather_picks_rows_in_their_stored_dtype():
    src, g = _host_rows(6)
    gather = HostRowGather("cpu")
    for n in (0, 1, 37, 300):
        rows = torch.randint(0, 300, (n,), generator=g)
        got = gather.gather(src, rows)
        assert got["rows"].dtype == torch.uint8 and got["sz"].dtype == torch.float16
        assert torch.equal(got["rows"], src["rows"][rows]) and torch.equal(got["sz"], src["sz"][rows])
    assert gather.rows == 338 and gather.nbytes == 338 * (16 + 4)
    with pytest.raises(KernelInputError):
        HostRowGather("cpu", num_slots=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned staging, async copies)")
def test_gpu_host_row_gather_keeps_earlier_results_while_slots_rotate():
    src, g = _host_rows(7)
    src = {name: t.pin_memory() for name, t in src.items()}
    gather = HostRowGather("cuda", num_slots=2)
    picks = [torch.randint(0, 300, (n,), generator=g) for n in (50, 120, 7, 300, 64)]
    outs = [gather.gather(src, rows) for rows in picks]  # later gathers rewrite the staging of earlier ones
    torch.cuda.synchronize()
    for rows, got in zip(picks, outs):
        assert got["rows"].is_cuda and got["rows"].dtype == torch.uint8
        assert torch.equal(got["rows"].cpu(), src["rows"][rows]) and torch.equal(got["sz"].cpu(), src["sz"][rows])
    assert gather.nbytes == sum(len(r) for r in picks) * (16 + 4)
