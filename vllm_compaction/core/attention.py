"""Reference attention and the numerically safe exponentials the fits are built on."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def default_scale(head_dim: int, scale: float | None) -> float:
    """The softmax scale: ``scale`` if given, else 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def logits(
    queries: Tensor,
    keys: Tensor,
    scale: float,
    bias: Tensor | None = None,
    query_positions: Tensor | None = None,
    key_positions: Tensor | None = None,
) -> Tensor:
    """fp32 attention logits ``scale * Q K^T + bias``, causally masked when positions are given.

    queries [H, n, d], keys [H, T, d], bias [H, T], query_positions [H, n],
    key_positions [H, T] (defaults to 0..T-1). Returns [H, n, T]; masked entries are -inf.
    """
    q, k = queries.float(), keys.float()
    if bias is None:
        out = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    else:
        out = torch.baddbmm(bias.float()[:, None, :], q, k.transpose(1, 2), alpha=scale)
    if query_positions is not None:
        if key_positions is None:
            key_positions = torch.arange(keys.shape[1], device=keys.device).expand(
                keys.shape[0], -1
            )
        future = key_positions[:, None, :] > query_positions[:, :, None]
        out.masked_fill_(future, -math.inf)
    return out


def exp_shifted_(scores: Tensor) -> tuple[Tensor, Tensor]:
    """In place: ``scores`` [H, n, T] -> exp(scores - row max), plus the row sums [H, n].

    A row with every entry -inf (a query that sees no key) becomes all zeros with sum 0, so
    callers can drop it instead of propagating NaN.
    """
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = scores.sub_(row_max).exp_()
    return weights, weights.sum(dim=-1)


def safe_reciprocal(x: Tensor) -> Tensor:
    """1/x where x > 0, else 0 (rows without mass are dropped from every fit)."""
    return torch.where(x > 0, 1.0 / x.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def attention(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Plain softmax attention in fp32, the reference every compaction is measured against.

    queries [H, n, d], keys [H, T, d], values [H, T, d_v], bias [H, T] added to the logits
    (-inf allowed: such keys are ignored). Returns [H, n, d_v] float32.
    """
    s = logits(queries, keys, default_scale(keys.shape[-1], scale), bias)
    return torch.bmm(torch.softmax(s, dim=-1), values.float())
