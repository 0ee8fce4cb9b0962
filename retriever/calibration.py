"""Calibrate a :class:`RetrieverProfile` for one model from calibration texts."""

from __future__ import annotations

import torch

from kvrecall.retriever.codebooks import check_codebook_settings, train_codebook
from kvrecall.retriever.errors import RetrieverError
from kvrecall.retriever.profile import RetrieverProfile, RetrieverSettings
from kvrecall.retriever.query_aware import cholesky_transforms, identity_transforms, query_covariance
from kvrecall import defaults
from kvrecall.models import rope_parameters
from kvrecall.retriever.rope_window import rotate, windowed_query

__all__ = ["collect_qk", "calibrate"]


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


@torch.no_grad()
def collect_qk(model, ids: torch.Tensor, chunk: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE queries and keys of ``ids`` (``[n]``), prefilled in independent chunks of ``chunk`` tokens.

    Returns
    -------
    q : Tensor[layers, heads, n, head_dim]
    k : Tensor[layers, kv_heads, n, head_dim]
        Position ``i`` of a chunk sits at RoPE position ``i`` (chunks restart at 0).
    """
    from kvrecall.models import capture_qkv

    qs, ks = [], []
    for start in _progress(range(0, ids.numel(), chunk), progress, desc="prefill", unit="chunk"):
        part = capture_qkv(model, ids[start : start + chunk])
        qs.append(part.q.float().cpu())
        ks.append(part.k.float().cpu())
    return torch.cat(qs, dim=2), torch.cat(ks, dim=2)


def calibrate(
    model,
    ids: torch.Tensor,
    *,
    model_id: str,
    model_name: str = "",
    kind: str = defaults.RETRIEVER_KIND,
    m: int = 1,
    bits: int = defaults.RETRIEVER_BITS,
    chunk: int | None = None,
    window_distance: int = defaults.RETRIEVER_WINDOW_DISTANCE,
    rope_mode: str = defaults.RETRIEVER_ROPE_MODE,
    query_aware: bool = True,
    position_spread: int = 32768,
    ridge: float = 1e-4,
    niter: int = defaults.RETRIEVER_KMEANS_ITERATIONS,
    seed: int = defaults.RETRIEVER_SEED,
    progress: bool = True,
    qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RetrieverProfile:
    """Fit transforms and codebooks per (layer, KV head) on the queries/keys of calibration tokens ``ids``.

    Parameters
    ----------
    model : Hugging Face Llama-family model (RoPE required).
    ids : Tensor[n], int64 — calibration token ids (see :func:`kvrecall.models.long_token_ids`).
    kind, m, bits : ``"vq"`` (``m = 1``) or ``"pq"`` with ``m`` sub-vectors of ``bits`` bits.
    chunk : prefill length (default: the model's ``max_position_embeddings``, at most
        ``kvrecall.defaults.RETRIEVER_CALIBRATION_CHUNK``).
    rope_mode : ``"positional"`` (the default, ``kvrecall.defaults.RETRIEVER_ROPE_MODE``: pre-RoPE codes scored
        at their true positions; H over queries rotated by random distances up to ``window_distance``),
        ``"windowed"`` (A²ATS) or ``"absolute"`` (plain baseline: post-RoPE keys, each chunk at a random offset in
        ``[0, position_spread)`` so that codebooks see the rotations of long contexts).
    query_aware : use the Cholesky transform of the query second moment (else identity).
    qk : optional ``(q, k)`` already returned by :func:`collect_qk` for ``ids`` and ``chunk`` (saves the
        prefill when several profiles are fitted on the same tokens).
    """
    from kvrecall.models import model_info

    info = model_info(model)
    if kind == "vq":
        m = 1
    elif kind != "pq":
        raise RetrieverError(f"codebook kind must be 'vq' or 'pq', got {kind!r}")
    check_codebook_settings(info.head_dim, m, bits)
    if rope_mode not in ("windowed", "absolute", "positional"):
        raise RetrieverError(f"rope_mode must be 'windowed', 'absolute' or 'positional', got {rope_mode!r}")
    if ids.ndim != 1 or ids.numel() < (1 << bits):
        raise RetrieverError(f"need at least {1 << bits} calibration tokens for {bits}-bit codebooks, got {ids.numel()}")
    inv_freq, scaling = rope_parameters(model)
    max_pos = int(getattr(model.config, "max_position_embeddings", 1024) or 1024)
    chunk = chunk or min(max_pos, defaults.RETRIEVER_CALIBRATION_CHUNK)
    if qk is None:
        q, k = collect_qk(model, ids, chunk, progress)
    else:
        q, k = qk
        if q.ndim != 4 or k.ndim != 4 or q.shape[2] != ids.numel() or k.shape[2] != ids.numel():
            raise RetrieverError(f"qk shapes {tuple(q.shape)}, {tuple(k.shape)} do not match {ids.numel()} tokens")
    n = q.shape[2]
    if rope_mode == "windowed":
        qr = windowed_query(q, inv_freq, window_distance, scaling)
        kr = k
    elif rope_mode == "positional":
        gen = torch.Generator().manual_seed(seed)
        dist = torch.randint(0, window_distance + 1, (n,), generator=gen)
        qr = rotate(q, inv_freq, dist, scaling)
        kr = k
    else:
        gen = torch.Generator().manual_seed(seed)
        pos = torch.cat([
            int(torch.randint(0, max(1, position_spread - chunk), (1,), generator=gen)) + torch.arange(min(chunk, n - s))
            for s in range(0, n, chunk)
        ])
        qr = rotate(q, inv_freq, pos, scaling)
        kr = rotate(k, inv_freq, pos, scaling)
    group = info.group_size
    L, H, D = info.num_layers, info.num_kv_heads, info.head_dim
    key_t = torch.empty(L, H, D, D)
    query_t = torch.empty(L, H, D, D)
    books = torch.empty(L, H, m, 1 << bits, D // m)
    pairs = [(layer, h) for layer in range(L) for h in range(H)]
    for layer, h in _progress(pairs, progress, desc=f"codebooks {kind} {m}x{bits}b", unit="head"):
        if query_aware:
            hmat = query_covariance(qr[layer, h * group : (h + 1) * group].reshape(-1, D))
            kt, qt = cholesky_transforms(hmat, ridge)
        else:
            kt, qt = identity_transforms(D)
        key_t[layer, h], query_t[layer, h] = kt, qt
        books[layer, h] = train_codebook(kr[layer, h] @ kt, m, bits, niter=niter, seed=seed + layer * H + h)
    settings = RetrieverSettings(
        model_id=model_id,
        model_name=model_name,
        num_layers=L,
        num_heads=info.num_heads,
        num_kv_heads=H,
        head_dim=D,
        kind=kind,
        m=m,
        bits=bits,
        rope_mode=rope_mode,
        window_distance=window_distance,
        query_aware=query_aware,
        rope_scaling=scaling,
        calibration={"tokens": int(n), "chunk": int(chunk), "niter": niter, "seed": seed, "ridge": ridge,
                     "position_spread": position_spread if rope_mode == "absolute" else None},
    )
    return RetrieverProfile(settings, key_t, query_t, books, inv_freq)
