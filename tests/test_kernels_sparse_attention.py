"""Sparse decode attention kernel vs its torch twin, and the twin vs dense attention restricted to the selection.

Runs the Triton kernel under TRITON_INTERPRET=1 on CPU (set by conftest.py); the GPU variant skips without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvrecall.kernels.common import (
    KernelDeviceError,
    KernelDTypeError,
    KernelIndexError,
    KernelInputError,
    KernelShapeError,
    check_launchable,
)
from kvrecall.kernels.kivi import dequantize_keys, dequantize_values, quantize_kv
from kvrecall.kernels.rope import RopeSpec
from kvrecall.models import rope_tables
from kvrecall.kernels.sparse_attention import (
    sparse_decode_attention,
    sparse_decode_attention_quantized,
    sparse_decode_attention_quantized_reference,
    sparse_decode_attention_reference,
)
from kvrecall.kernels.testing import TOLERANCE, random_selection, relative_error
from kvrecall.models import apply_rope

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inv_freq(d: int) -> torch.Tensor:
    return 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


def _case(b, hkv, group, t, d, counts, dtype, seed, width=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * group, d, generator=g).to(dtype)
    k = (torch.randn(b, hkv, t, d, generator=g) * 2 + 0.5).to(dtype)
    v = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    idx, cnt = random_selection(b, hkv, t, counts, generator=g, width=width)
    return q, k, v, idx, cnt


def _rope(kind: str, d: int, positions: int, offset: int):
    if kind == "none":
        return None
    inv = _inv_freq(d)
    if kind == "inv_freq":
        return RopeSpec.from_inv_freq(inv, position_offset=offset)
    return RopeSpec.from_tables(*rope_tables(inv, torch.arange(positions + offset)), position_offset=offset)


# (B, Hkv, group, T, D, counts): odd lengths, MHA and GQA, empty rows, a single token, full selection
SHAPES = [
    (2, 2, 3, 97, 8, [[40, 0], [1, 97]]),
    (1, 3, 1, 300, 64, [[123, 7, 300]]),
    (3, 1, 4, 33, 8, [[33], [0], [1]]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}G{s[2]}T{s[3]}D{s[4]}")
@pytest.mark.parametrize("rope_kind", ["none", "tables", "inv_freq"])
def test_float_kv_matches_reference(dtype, shape, rope_kind):
    b, hkv, group, t, d, counts = shape
    q, k, v, idx, cnt = _case(b, hkv, group, t, d, counts, dtype, seed=t * 7 + d + len(rope_kind))
    rope = _rope(rope_kind, d, t, offset=11)
    out = sparse_decode_attention(q, k, v, idx, cnt, rope=rope, num_splits=3, block_s=16)
    ref = sparse_decode_attention_reference(q, k, v, idx, cnt, rope=rope)
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, ref) <= TOLERANCE[dtype]
    empty = cnt == 0
    heads_empty = empty.repeat_interleave(group, dim=1)
    assert torch.count_nonzero(out[heads_empty]) == 0


@pytest.mark.parametrize("shape", SHAPES[::2], ids=lambda s: f"B{s[0]}H{s[1]}G{s[2]}T{s[3]}D{s[4]}")
def test_broadcast_variant_matches_reference(shape):
    """The multiply+sum contraction (use_dot=False) computes the same as the tl.dot one."""
    b, hkv, group, t, d, counts = shape
    q, k, v, idx, cnt = _case(b, hkv, group, t, d, counts, torch.float16, seed=21)
    rope = _rope("inv_freq", d, t, offset=0)
    out = sparse_decode_attention(q, k, v, idx, cnt, rope=rope, use_dot=False, block_s=8, num_splits=2)
    ref = sparse_decode_attention_reference(q, k, v, idx, cnt, rope=rope)
    assert relative_error(out, ref) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantized_kv_matches_reference(bits, dtype):
    b, hkv, group, t, d = 2, 2, 2, 131, 8
    q, k, v, idx, cnt = _case(b, hkv, group, t, d, [[50, 1], [0, 131]], torch.float32, seed=bits)
    q = q.to(dtype)
    kv = quantize_kv(k, v, bits=bits, group_size=32)
    rope = _rope("tables", d, t, offset=3)
    out = sparse_decode_attention_quantized(q, kv, idx, cnt, rope=rope, num_splits=2, block_s=16)
    ref = sparse_decode_attention_quantized_reference(q, kv, idx, cnt, rope=rope)
    assert relative_error(out, ref) <= TOLERANCE[dtype]


def test_quantized_head_dim_64_int4_inv_freq():
    q, k, v, idx, cnt = _case(1, 2, 2, 200, 64, [[77, 200]], torch.float32, seed=5)
    kv = quantize_kv(k, v, bits=4, group_size=16)
    rope = _rope("inv_freq", 64, 200, offset=0)
    out = sparse_decode_attention_quantized(q, kv, idx, cnt, rope=rope)
    ref = sparse_decode_attention_quantized_reference(q, kv, idx, cnt, rope=rope)
    assert relative_error(out, ref) <= TOLERANCE[torch.float32]


def test_kivi_roundtrip_error_is_bounded():
    _, k, v, _, _ = _case(2, 2, 1, 70, 8, 1, torch.float32, seed=9)
    for bits, bound in ((8, 0.01), (4, 0.2)):
        kv = quantize_kv(k, v, bits=bits, group_size=32)
        assert relative_error(dequantize_keys(kv), k) < bound
        assert relative_error(dequantize_values(kv), v) < bound


def test_reference_equals_dense_attention_restricted_to_selection():
    """Independent check of the twin: SDPA over all keys rotated with kvrecall.models.apply_rope, masked."""
    b, hkv, group, t, d = 2, 2, 2, 60, 8
    q, k, v, idx, cnt = _case(b, hkv, group, t, d, [[20, 60], [3, 1]], torch.float32, seed=1)
    offset = 4
    cos, sin = rope_tables(_inv_freq(d), torch.arange(t + offset))
    rope = RopeSpec.from_tables(cos, sin, position_offset=offset)
    k_rot = apply_rope(k, cos[offset:], sin[offset:])
    mask = torch.zeros(b, hkv, t, dtype=torch.bool)
    for i in range(b):
        for j in range(hkv):
            mask[i, j, idx[i, j, : cnt[i, j]]] = True
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(b, hkv, group, 1, d).reshape(b * hkv, group, 1, d),
        k_rot.reshape(b * hkv, 1, t, d).expand(b * hkv, group, t, d),
        v.reshape(b * hkv, 1, t, d).expand(b * hkv, group, t, d),
        attn_mask=mask.reshape(b * hkv, 1, 1, t),
    ).reshape(b, hkv * group, d)
    ref = sparse_decode_attention_reference(q, k, v, idx, cnt, rope=rope)
    out = sparse_decode_attention(q, k, v, idx, cnt, rope=rope)
    assert relative_error(ref, dense) < 1e-5
    assert relative_error(out, dense) < 1e-5


def test_model_rope_tables_and_inv_freq_agree(stories):
    """Pre-RoPE keys of stories260K rotated in-kernel equal the model's own post-RoPE keys in attention."""
    from kvrecall.models import rope_cos_sin

    from kvrecall.models import model_info

    model, _ = stories
    d = model_info(model).head_dim
    t = 90
    cos, sin = rope_cos_sin(model, torch.arange(t))
    q, k, v, idx, cnt = _case(1, 2, 2, t, d, [[30, 90]], torch.float32, seed=3)
    tables = RopeSpec.from_tables(cos, sin)
    inv = RopeSpec.from_inv_freq(model.model.rotary_emb.inv_freq, model.model.rotary_emb.attention_scaling)
    post = apply_rope(k, cos, sin)
    dense_like = sparse_decode_attention_reference(q, post, v, idx, cnt)
    for rope in (tables, inv):
        assert relative_error(sparse_decode_attention(q, k, v, idx, cnt, rope=rope), dense_like) < 1e-5


def test_single_token_returns_its_value():
    q, k, v, idx, cnt = _case(1, 1, 2, 40, 8, [[1]], torch.float32, seed=2)
    out = sparse_decode_attention(q, k, v, idx, cnt, rope=_rope("inv_freq", 8, 40, 0))
    token = int(idx[0, 0, 0])
    torch.testing.assert_close(out[0], v[0, 0, token].expand(2, 8), rtol=1e-6, atol=1e-6)


def test_large_scores_are_stable():
    """Scores around 1e4 overflow a naive exp; the online softmax must stay finite and match the twin."""
    q, k, v, idx, cnt = _case(1, 1, 2, 64, 8, [[64]], torch.float32, seed=4)
    q = q * 300.0
    out = sparse_decode_attention(q, k, v, idx, cnt, block_s=16, num_splits=4)
    ref = sparse_decode_attention_reference(q, k, v, idx, cnt)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < 1e-5


def test_gathered_rows_equal_indexed_rows():
    q, k, v, idx, cnt = _case(2, 2, 2, 80, 8, [[10, 0], [80, 33]], torch.float16, seed=6, width=81)
    rope = _rope("tables", 8, 80, 2)
    rows = idx.clamp(min=0)[..., None].expand(*idx.shape, 8)
    kg, vg = torch.gather(k, 2, rows), torch.gather(v, 2, rows)
    direct = sparse_decode_attention(q, k, v, idx, cnt, rope=rope)
    gathered = sparse_decode_attention(q, kg, vg, idx, cnt, rope=rope, gathered=True)
    ref = sparse_decode_attention_reference(q, kg, vg, idx, cnt, rope=rope, gathered=True)
    assert relative_error(gathered, direct) <= TOLERANCE[torch.float16]
    assert relative_error(gathered, ref) <= TOLERANCE[torch.float16]


def test_strided_cache_view():
    """K/V may be views into a larger [L, 2, B, H, T, D] cache (only the last dim must be contiguous)."""
    g = torch.Generator().manual_seed(8)
    cache = torch.randn(3, 2, 2, 2, 50, 8, generator=g)
    k, v = cache[1, 0], cache[1, 1]
    q = torch.randn(2, 4, 8, generator=g)
    idx, cnt = random_selection(2, 2, 50, [[5, 50], [17, 2]], generator=g)
    out = sparse_decode_attention(q, k, v, idx, cnt)
    ref = sparse_decode_attention_reference(q, k.contiguous(), v.contiguous(), idx, cnt)
    assert relative_error(out, ref) < 1e-5


def test_all_empty_and_zero_width():
    q, k, v, _, _ = _case(2, 1, 2, 10, 8, 1, torch.float32, seed=0)
    for idx, cnt in (
        (torch.full((2, 1, 3), -1), torch.zeros(2, 1, dtype=torch.int64)),
        (torch.empty(2, 1, 0, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64)),
    ):
        out = sparse_decode_attention(q, k, v, idx, cnt)
        assert torch.equal(out, torch.zeros_like(q))
        assert torch.equal(sparse_decode_attention_reference(q, k, v, idx, cnt), torch.zeros_like(q))


# ------------------------------------------------------------------------------------------------ bad input
def _valid():
    return _case(1, 2, 2, 20, 8, [[5, 20]], torch.float32, seed=0)


def test_bad_dtypes_raise():
    q, k, v, idx, cnt = _valid()
    with pytest.raises(KernelDTypeError):
        sparse_decode_attention(q.to(torch.int32), k, v, idx, cnt)
    with pytest.raises(KernelDTypeError):
        sparse_decode_attention(q, k, v, idx.float(), cnt)
    with pytest.raises(KernelDTypeError):
        sparse_decode_attention(q, k.to(torch.float64), v, idx, cnt)


def test_bad_shapes_raise():
    q, k, v, idx, cnt = _valid()
    with pytest.raises(KernelShapeError):
        sparse_decode_attention(q[:, :3], k, v, idx, cnt)  # 3 query heads over 2 KV heads
    with pytest.raises(KernelShapeError):
        sparse_decode_attention(q, k, v[..., :6], idx, cnt)
    with pytest.raises(KernelShapeError):
        sparse_decode_attention(q, k, v, idx[:, :1], cnt)
    with pytest.raises(KernelShapeError):
        sparse_decode_attention(q, k.transpose(2, 3), v.transpose(2, 3), idx, cnt)  # channels not contiguous
    with pytest.raises(KernelShapeError):
        sparse_decode_attention(q[..., :7], k[..., :7], v[..., :7], idx, cnt)  # odd head dim
    with pytest.raises(KernelShapeError):
        sparse_decode_attention(q, k[:, :, :3], v[:, :, :3], idx, cnt, gathered=True)  # fewer rows than S
    with pytest.raises(KernelInputError):
        sparse_decode_attention(q, k, v, idx, cnt, rope="yes")


def test_out_of_range_indices_raise():
    q, k, v, idx, cnt = _valid()
    bad = idx.clone()
    bad[0, 0, 2] = 20
    with pytest.raises(KernelIndexError):
        sparse_decode_attention(q, k, v, bad, cnt)
    bad[0, 0, 2] = -3
    with pytest.raises(KernelIndexError):
        sparse_decode_attention(q, k, v, bad, cnt)
    with pytest.raises(KernelIndexError):
        sparse_decode_attention(q, k, v, idx, cnt + 1)  # counts beyond the width
    short = RopeSpec.from_tables(*rope_tables(_inv_freq(8), torch.arange(10)))
    with pytest.raises(KernelIndexError):
        sparse_decode_attention(q, k, v, idx, cnt, rope=short)  # positions beyond the table
    kv = quantize_kv(k, v, bits=8, group_size=4)
    with pytest.raises(KernelIndexError):
        sparse_decode_attention_quantized(q, kv, bad, cnt)


def test_padding_beyond_count_is_ignored():
    q, k, v, idx, cnt = _valid()
    junk = idx.clone()
    junk[0, 0, 5:] = 10_000  # past counts: never read, never validated
    out = sparse_decode_attention(q, k, v, junk, cnt)
    assert relative_error(out, sparse_decode_attention_reference(q, k, v, idx, cnt)) < 1e-5


def test_device_errors():
    q, k, v, idx, cnt = _valid()
    with pytest.raises(KernelDeviceError):
        sparse_decode_attention(q, k.to("meta"), v.to("meta"), idx, cnt)
    with pytest.raises(KernelDeviceError):
        check_launchable(object(), torch.device("cpu"))  # a compiled (non-interpreted) kernel cannot take CPU


def test_quantized_bad_fields_raise():
    q, k, v, idx, cnt = _valid()
    kv = quantize_kv(k, v, bits=8, group_size=4)
    from dataclasses import replace

    with pytest.raises(KernelDTypeError):
        sparse_decode_attention_quantized(q, replace(kv, k_codes=kv.k_codes.to(torch.int32)), idx, cnt)
    with pytest.raises(KernelShapeError):
        sparse_decode_attention_quantized(q, replace(kv, v_scale=kv.v_scale[..., :3]), idx, cnt)
    with pytest.raises(KernelInputError):
        sparse_decode_attention_quantized(q, replace(kv, bits=5), idx, cnt)
    with pytest.raises(KernelInputError):
        sparse_decode_attention_quantized(q, (k, v), idx, cnt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; the same cases run above on CPU "
                    "under TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(dtype):
    for shape in SHAPES:
        b, hkv, group, t, d, counts = shape
        q, k, v, idx, cnt = (x.cuda() for x in _case(b, hkv, group, t, d, counts, dtype, seed=7))
        rope = _rope("tables", d, t, 5).to("cuda")
        out = sparse_decode_attention(q, k, v, idx, cnt, rope=rope)
        ref = sparse_decode_attention_reference(q, k, v, idx, cnt, rope=rope)
        assert relative_error(out, ref) <= TOLERANCE[dtype]
        kv = quantize_kv(k.float(), v.float(), bits=4, group_size=16)
        out = sparse_decode_attention_quantized(q, kv, idx, cnt, rope=rope)
        ref = sparse_decode_attention_quantized_reference(q, kv, idx, cnt, rope=rope)
        assert relative_error(out, ref) <= TOLERANCE[dtype]
    assert math.isfinite(float(out.float().sum()))


def test_full_selection_reproduces_model_attention(hd64, sotu_text):
    """fixture-hd64 (ours): the kernel over every token (keys pre-RoPE, rotated in-kernel) equals the model's own
    attention output at the last position (the input of o_proj), layer by layer."""
    from kvrecall.models import capture_qkv, model_info, rope_cos_sin, tokenize

    model, tok = hd64
    info = model_info(model)
    ids = tokenize(tok, sotu_text, 150)
    t = ids.numel()
    seen = {}
    hooks = [
        layer.self_attn.o_proj.register_forward_hook(lambda _m, inp, _o, i=i: seen.__setitem__(i, inp[0].detach()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        qkv = capture_qkv(model, ids)
    finally:
        for h in hooks:
            h.remove()
    cos, sin = rope_cos_sin(model, torch.arange(t))
    rope = RopeSpec.from_tables(cos, sin)
    idx = torch.arange(t).reshape(1, 1, t).expand(1, info.num_kv_heads, t).contiguous()
    cnt = torch.full((1, info.num_kv_heads), t)
    for layer in range(info.num_layers):
        q_last = apply_rope(qkv.q[layer, :, t - 1 : t], cos[t - 1 :], sin[t - 1 :])[:, 0][None]  # [1, Hq, D]
        out = sparse_decode_attention(q_last, qkv.k[layer][None], qkv.v[layer][None], idx, cnt, rope=rope)
        model_out = seen[layer][0, t - 1].reshape(info.num_heads, info.head_dim)
        assert relative_error(out[0], model_out) < 1e-4, layer


def test_int32_selection_and_counts():
    q, k, v, idx, cnt = _case(2, 2, 2, 45, 8, [[3, 45], [0, 20]], torch.bfloat16, seed=12)
    rope = _rope("inv_freq", 8, 45, 1)
    out = sparse_decode_attention(q, k, v, idx.to(torch.int32), cnt.to(torch.int32), rope=rope)
    ref = sparse_decode_attention_reference(q, k, v, idx, cnt, rope=rope)
    assert relative_error(out, ref) <= TOLERANCE[torch.bfloat16]
