"""Per-head gathers and the sorted, padded index layout shared by all methods."""

from __future__ import annotations

import torch
from torch import Tensor


def gather_rows(x: Tensor, indices: Tensor) -> Tensor:
    """Rows of ``x`` [H, T, d] at ``indices`` [H, t] (-1 = padding, gives zeros) -> [H, t, d]."""
    rows = x.gather(1, indices.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))
    return rows.masked_fill((indices < 0)[..., None], 0)


def gather_columns(x: Tensor, indices: Tensor) -> Tensor:
    """Columns of ``x`` [H, n, T] at ``indices`` [H, t] (-1 = padding, zeros) -> [H, n, t]."""
    cols = x.gather(2, indices.clamp(min=0)[:, None, :].expand(-1, x.shape[1], -1))
    return cols.masked_fill((indices < 0)[:, None, :], 0)


def sort_padded(indices: Tensor, keep: Tensor) -> Tensor:
    """Sort kept indices ascending per head and move dropped entries to the end as -1.

    indices: [H, t] long; keep: [H, t] bool. Returns [H, t] long.
    """
    sentinel = torch.iinfo(indices.dtype).max  # sorts after every real position
    ordered = indices.masked_fill(~keep, sentinel).sort(dim=1).values
    return ordered.masked_fill(ordered == sentinel, -1)


def top_budget(scores: Tensor, budgets: Tensor) -> Tensor:
    """The ``budgets[h]`` highest-scoring keys of each head, sorted, -1 padded.

    scores: [H, T] float; budgets: [H] long. Returns [H, max(budgets)] long.
    """
    t_max = int(budgets.max())
    picked = scores.topk(t_max, dim=1).indices
    keep = torch.arange(t_max, device=scores.device) < budgets[:, None]
    return sort_padded(picked, keep)
