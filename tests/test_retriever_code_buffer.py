"""CodeBuffer: packed 9-12-bit codes and plain ones round-trip exactly through appends of any sizes."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kvrecall.retriever.code_buffer import CodeBuffer
from kvrecall.retriever.errors import RetrieverError


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([4, 8, 9, 10, 12, 13, 16]), m=st.sampled_from([1, 2]),
       sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=5), seed=st.integers(0, 2**31 - 1))
def test_appends_of_any_sizes_round_trip(bits, m, sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    buf = CodeBuffer(2, 3, m, bits)
    parts = [torch.randint(0, 1 << bits, (2, 3, n, m), generator=gen) for n in sizes]
    for p in parts:
        buf.append(p)
    want = torch.cat(parts, dim=2)
    n = want.shape[2]
    assert buf.length == n and buf.packed == (m == 1 and 8 < bits <= 12)
    assert torch.equal(buf.range(0, n), want)
    s, e = sorted(int(x) for x in torch.randint(0, n + 1, (2,), generator=gen))
    got = buf.range(s, e)
    assert got.dtype == torch.int64 and torch.equal(got, want[:, :, s:e])
    per_code = 1.5 if buf.packed else (1 if bits <= 8 else 2 if bits <= 15 else 4) * m
    assert buf.nbytes == 2 * 3 * buf.capacity * per_code and buf.capacity - n < 4096


def test_bad_shapes_and_ranges_raise():
    buf = CodeBuffer(1, 3, 1, 10)
    with pytest.raises(RetrieverError, match="codes must be"):
        buf.append(torch.zeros(1, 2, 5, 1, dtype=torch.long))
    buf.append(torch.zeros(1, 3, 5, 1, dtype=torch.long))
    with pytest.raises(RetrieverError, match="outside"):
        buf.range(2, 6)
    with pytest.raises(RetrieverError, match="bits"):
        CodeBuffer(1, 3, 1, 0)
