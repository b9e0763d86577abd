"""Batched ridge solves on normal equations that never return NaN."""

from __future__ import annotations

import torch
from torch import Tensor

# Ridge growth per failed Cholesky attempt, and how many attempts before giving up on a head.
_RIDGE_GROWTH = 100.0
_ATTEMPTS = 6


def ridge_solve(gram: Tensor, rhs: Tensor, lengths: Tensor, ridge: float) -> Tensor:
    """Solve (G + lam I) x = rhs per head, lam = ridge * mean diagonal of G over real columns.

    gram: [H, t, t] symmetric PSD (zero rows/columns on padding slots); rhs: [H, t, k];
    lengths: [H] long count of real columns per head (the relative ridge must not depend on
    padding, so a padded head solves exactly as it would alone). Heads whose factorisation
    fails retry with a 100x larger ridge; a head that never factorises gets x = 0.
    Returns [H, t, k] float32.
    """
    diag = gram.diagonal(dim1=1, dim2=2)
    level = (diag.sum(dim=1) / lengths.clamp_min(1)).clamp_min(torch.finfo(gram.dtype).tiny)
    lam = ridge * level
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    for _ in range(_ATTEMPTS):
        chol, info = torch.linalg.cholesky_ex(gram + lam[:, None, None] * eye)
        failed = info != 0
        if not failed.any():
            break
        lam = torch.where(failed, torch.maximum(lam * _RIDGE_GROWTH, 1e-6 * level), lam)
    x = torch.cholesky_solve(rhs, chol)
    bad = failed[:, None, None] | ~torch.isfinite(x)
    return x.masked_fill(bad, 0.0)


def top_eigenvalue(gram: Tensor, iters: int = 20) -> Tensor:
    """[H] largest eigenvalue of each PSD ``gram`` [H, t, t] by power iteration.

    The start vector is all ones: Gram matrices of non-negative columns have a non-negative
    top eigenvector (Perron-Frobenius), so the iteration converges fast from there.
    """
    v = torch.ones(gram.shape[:2], dtype=gram.dtype, device=gram.device)
    for _ in range(iters):
        v = torch.bmm(gram, v[..., None]).squeeze(-1)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
    return (v * torch.bmm(gram, v[..., None]).squeeze(-1)).sum(dim=1)
