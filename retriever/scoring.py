"""Scores of coded keys from a lookup table of q·centroid (the torch path; kernels/ has the Triton twin)."""

from __future__ import annotations

import torch

from kvrecall.retriever.errors import RetrieverError

__all__ = ["lut_scores", "exact_scores"]

_CODE_DTYPES = (torch.int32, torch.int64, torch.uint8, torch.int16)


def lut_scores(q: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, group: int) -> torch.Tensor:
    """Approximate scores of every coded key for every query head.

    ``scores[b, h, t] = sum_m < q[b, h, m*D/M:(m+1)*D/M], codebooks[h // group, m, codes[h // group, t, m]] >``,
    computed from a LUT ``[B, Hq, M, K]`` of q·centroid gathered by code.

    Parameters
    ----------
    q : Tensor[B, Hq, D]
        Already transformed queries (windowed-RoPE rotated, multiplied by the query-aware transform).
    codebooks : Tensor[Hkv, M, K, D // M]
    codes : Tensor[Hkv, T, M], int32 / int64 / uint8 / int16
    group : int
        Query heads per KV head (``Hq == Hkv * group``).

    Returns
    -------
    Tensor[B, Hq, T], float32
    """
    if q.ndim != 3 or codebooks.ndim != 4 or codes.ndim != 3:
        raise RetrieverError(
            f"expected q [B,Hq,D], codebooks [Hkv,M,K,D/M], codes [Hkv,T,M]; got {tuple(q.shape)}, "
            f"{tuple(codebooks.shape)}, {tuple(codes.shape)}"
        )
    if codes.dtype not in _CODE_DTYPES:
        raise RetrieverError(f"codes must be int32/int64/uint8/int16, got {codes.dtype}")
    b, hq, d = q.shape
    hkv, m, k, dsub = codebooks.shape
    if not isinstance(group, int) or group < 1 or hq != hkv * group:
        raise RetrieverError(f"group={group!r} does not map {hq} query heads onto {hkv} KV heads")
    if m * dsub != d or codes.shape[0] != hkv or codes.shape[2] != m:
        raise RetrieverError(f"shapes disagree: q D={d}, codebooks M={m} x {dsub}, codes {tuple(codes.shape)}")
    t = codes.shape[1]
    head_to_kv = torch.arange(hq, device=q.device) // group
    cb = codebooks.float()[head_to_kv]  # [Hq, M, K, dsub]
    lut = torch.einsum("bhmd,hmkd->bhmk", q.float().reshape(b, hq, m, dsub), cb)  # [B, Hq, M, K]
    idx = codes.long()[head_to_kv]  # [Hq, T, M]
    scores = torch.zeros(b, hq, t, dtype=torch.float32, device=q.device)
    for j in range(m):
        scores += torch.gather(lut[:, :, j, :], 2, idx[None, :, :, j].expand(b, hq, t))
    return scores


def exact_scores(q: torch.Tensor, keys: torch.Tensor, group: int) -> torch.Tensor:
    """Exact ``q·k`` for every query head: ``q [B, Hq, D]``, ``keys [Hkv, T, D]`` -> ``[B, Hq, T]`` float32."""
    if q.ndim != 3 or keys.ndim != 3 or q.shape[-1] != keys.shape[-1] or q.shape[1] != keys.shape[0] * group:
        raise RetrieverError(f"q {tuple(q.shape)} and keys {tuple(keys.shape)} disagree (group={group})")
    head_to_kv = torch.arange(q.shape[1], device=q.device) // group
    return torch.einsum("bhd,htd->bht", q.float(), keys.float()[head_to_kv])
