"""Query-aware transform (A²ATS): make Euclidean key-quantization error equal the error of q·k.

Per (layer, KV head): ``H = E[q qᵀ]`` over calibration queries of the query heads sharing the KV head (already
rotated by windowed RoPE), ``H = L Lᵀ`` (Cholesky). With row vectors::

    k' = k @ L            q' = q @ L^{-T}            q' . k' = q . k

and ``||k' - k̂'||² = (k - k̂)ᵀ H (k - k̂) = E[(q·k - q·k̂)²]``, so k-means on ``k'`` minimises score error.
"""

from __future__ import annotations

import torch

from kvrecall.retriever.errors import RetrieverError

__all__ = ["query_covariance", "cholesky_transforms", "identity_transforms"]


def query_covariance(queries: torch.Tensor) -> torch.Tensor:
    """Second-moment matrix of queries.

    Parameters
    ----------
    queries : Tensor[n, head_dim]

    Returns
    -------
    Tensor[head_dim, head_dim], float64, ``queriesᵀ queries / n``.
    """
    if queries.ndim != 2 or queries.shape[0] == 0:
        raise RetrieverError(f"queries must be a non-empty [n, head_dim] matrix, got {tuple(queries.shape)}")
    q = queries.double()
    if not torch.isfinite(q).all():
        raise RetrieverError("calibration queries contain NaN or Inf")
    return q.T @ q / q.shape[0]


def cholesky_transforms(h: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and query transforms from ``H``.

    A ridge of ``ridge * trace(H) / head_dim`` is added so that directions no query uses stay (weakly) coded.

    Parameters
    ----------
    h : Tensor[head_dim, head_dim], symmetric positive semi-definite

    Returns
    -------
    key_transform : Tensor[head_dim, head_dim], float32
        ``L`` (lower triangular); transformed keys are ``k @ L``.
    query_transform : Tensor[head_dim, head_dim], float32
        ``L^{-T}``; transformed queries are ``q @ L^{-T}``.
    """
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise RetrieverError(f"H must be square, got {tuple(h.shape)}")
    d = h.shape[0]
    h = h.double()
    h = (h + h.T) / 2
    scale = float(torch.trace(h)) / d
    if not scale > 0:
        raise RetrieverError("H has zero trace: calibration queries are all zero")
    eye = torch.eye(d, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(h + ridge * scale * eye)
    if int(info) != 0:
        raise RetrieverError(f"Cholesky of H failed (not positive definite at minor {int(info)}); raise the ridge")
    inv_t = torch.linalg.solve_triangular(chol, eye, upper=False).T
    return chol.float(), inv_t.float()


def identity_transforms(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity key and query transforms (no query awareness)."""
    eye = torch.eye(head_dim, dtype=torch.float32)
    return eye.clone(), eye.clone()
