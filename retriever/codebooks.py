"""Codebooks: training with FAISS (k-means / ProductQuantizer), encoding keys to codes, FAISS code packing.

A single codebook over the whole head dimension is product quantization with ``m = 1`` sub-vector, so both
kinds share one layout::

    centroids : Tensor[m, 2**bits, head_dim // m]     codes : Tensor[..., tokens, m]

Codes are stored as ``uint8`` (bits <= 8), ``int16`` (bits <= 15) or ``int32``.
"""

from __future__ import annotations

import numpy as np
import torch

from kvrecall.retriever.errors import RetrieverError

__all__ = ["code_dtype", "train_codebook", "encode", "decode", "pack_faiss_codes", "check_codebook_settings"]

MAX_BITS = 16


def check_codebook_settings(head_dim: int, m: int, bits: int) -> None:
    """Raise :class:`RetrieverError` unless ``m`` sub-vectors of ``bits`` bits fit ``head_dim``."""
    if not isinstance(m, int) or m < 1 or head_dim % m != 0:
        raise RetrieverError(f"sub-vector count m={m!r} must be a positive divisor of head_dim={head_dim}")
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise RetrieverError(f"bits per sub-vector must be an integer in 1..{MAX_BITS}, got {bits!r}")


def code_dtype(bits: int) -> torch.dtype:
    """Smallest torch integer dtype holding codes of ``bits`` bits."""
    if bits <= 8:
        return torch.uint8
    if bits <= 15:
        return torch.int16
    return torch.int32


def train_codebook(
    x: torch.Tensor, m: int, bits: int, niter: int = 20, seed: int = 1234, max_points_per_centroid: int = 256
) -> torch.Tensor:
    """Train ``m`` sub-codebooks of ``2**bits`` centroids with ``faiss.ProductQuantizer`` (k-means per sub-vector).

    Parameters
    ----------
    x : Tensor[n, head_dim], float
        Training vectors (already transformed for query-aware coding). ``n`` must be at least ``2**bits``.

    Returns
    -------
    Tensor[m, 2**bits, head_dim // m], float32
    """
    import faiss

    if x.ndim != 2:
        raise RetrieverError(f"training vectors must be [n, head_dim], got {tuple(x.shape)}")
    n, d = x.shape
    check_codebook_settings(d, m, bits)
    k = 1 << bits
    if n < k:
        raise RetrieverError(f"{n} training vectors cannot train {k} centroids; calibrate on more tokens or fewer bits")
    xs = np.ascontiguousarray(x.detach().float().cpu().numpy())
    if not np.isfinite(xs).all():
        raise RetrieverError("training vectors contain NaN or Inf")
    pq = faiss.ProductQuantizer(d, m, bits)
    pq.cp.niter = niter
    pq.cp.seed = seed
    pq.cp.max_points_per_centroid = max_points_per_centroid
    pq.verbose = False
    pq.cp.verbose = False
    pq.train(xs)
    cents = faiss.vector_to_array(pq.centroids).reshape(m, k, d // m)
    return torch.from_numpy(cents.copy()).float()


def encode(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Nearest-centroid codes per sub-vector (squared Euclidean; ties go to the lower code).

    Parameters
    ----------
    x : Tensor[..., tokens, head_dim]
    centroids : Tensor[m, K, head_dim // m]

    Returns
    -------
    Tensor[..., tokens, m] of :func:`code_dtype`
    """
    m, k, dsub = centroids.shape
    if x.shape[-1] != m * dsub:
        raise RetrieverError(f"vectors have dim {x.shape[-1]}, codebook expects {m * dsub}")
    lead = x.shape[:-1]
    flat = x.reshape(-1, m, dsub).float()
    cents = centroids.to(flat.device).float()
    norms = (cents * cents).sum(-1)  # [m, K]
    out = torch.empty(flat.shape[0], m, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk]  # [c, m, dsub]
        dist = norms[None] - 2 * torch.einsum("cmd,mkd->cmk", part, cents)
        out[start : start + chunk] = dist.argmin(-1)
    bits = max(1, (k - 1).bit_length())
    return out.to(code_dtype(bits)).reshape(*lead, m)


def decode(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Reconstruct vectors from codes: ``Tensor[..., tokens, m] -> Tensor[..., tokens, head_dim]``."""
    m, _, dsub = centroids.shape
    idx = codes.long()
    parts = [centroids[j][idx[..., j]] for j in range(m)]
    return torch.cat(parts, dim=-1)


def pack_faiss_codes(codes: torch.Tensor, bits: int) -> np.ndarray:
    """Pack codes ``[n, m]`` into FAISS's PQ byte layout (``m*bits`` bits per vector, LSB first).

    Returns
    -------
    ndarray[n, ceil(m * bits / 8)], uint8 — accepted by ``IndexPQ.add_sa_codes``.
    """
    c = codes.detach().cpu().numpy().astype(np.int64)
    n, m = c.shape
    if (c < 0).any() or (c >> bits).any():
        raise RetrieverError(f"codes out of range for {bits} bits")
    shifts = np.arange(bits, dtype=np.int64)
    bit_matrix = ((c[:, :, None] >> shifts) & 1).astype(np.uint8).reshape(n, m * bits)
    pad = (-bit_matrix.shape[1]) % 8
    if pad:
        bit_matrix = np.concatenate([bit_matrix, np.zeros((n, pad), np.uint8)], axis=1)
    return np.packbits(bit_matrix, axis=1, bitorder="little")
