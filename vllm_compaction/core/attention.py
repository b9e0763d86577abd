"""Reference attention and the numerically safe exponentials the fits are built on."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG2E = math.log2(math.e)


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
        # beta = 0: the empty input is ignored and the scale applied inside the product.
        shape = (q.shape[0], q.shape[1], k.shape[1])
        out = q.new_empty(shape).baddbmm_(q, k.transpose(1, 2), beta=0.0, alpha=scale)
    else:
        out = torch.baddbmm(bias.float()[:, None, :], q, k.transpose(1, 2), alpha=scale)
    if query_positions is not None:
        start = 0
        if key_positions is None:
            # Keys sit at 0..T-1: those at or before the earliest query are never masked, so
            # only the columns after it need the (as large as the scores) comparison.
            start = min(max(int(query_positions.min()) + 1, 0), keys.shape[1])
            key_positions = torch.arange(start, keys.shape[1], device=keys.device).expand(
                keys.shape[0], -1
            )
        future = key_positions[:, None, :] > query_positions[:, :, None]
        out[..., start:].masked_fill_(future, -math.inf)
    return out


def log_mass(
    queries: Tensor,
    keys: Tensor,
    scale: float,
    bias: Tensor | None = None,
    query_positions: Tensor | None = None,
    key_positions: Tensor | None = None,
    rows: int = 1024,
) -> Tensor:
    """[H, n] log sum_j exp(logit_ij) over the keys each query sees (-inf if none).

    The attention mass reference queries spend on keys that are not compacted (sinks, template
    tokens, the tokens after the context): ``compact_layer``'s ``outside_lse``. Arguments as
    for ``logits``; formed ``rows`` queries at a time.
    """
    out = [
        logits(
            queries[:, start : start + rows],
            keys,
            scale,
            bias,
            None if query_positions is None else query_positions[:, start : start + rows],
            key_positions,
        ).logsumexp(dim=-1)
        for start in range(0, queries.shape[1], rows)
    ]
    return torch.cat(out, dim=1)


def exp_shifted_(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In place: ``scores`` [H, n, T] -> exp(scores - row max), the row sums and the shifts.

    The shift [H, n] is the row max, 0 for a row with every entry -inf (a query that sees no
    key): that row becomes all zeros with sum 0, so callers can drop it instead of
    propagating NaN. Returns (weights [H, n, T], sums [H, n], shifts [H, n]).
    """
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = exp_(scores.sub_(row_max))
    return weights, weights.sum(dim=-1), row_max.squeeze(-1)


def exp_(x: Tensor) -> Tensor:
    """In place exp(x), as exp2(x log2 e): equal to within the rounding that x already carries,
    and several times faster than torch.exp on CPU."""
    return x.mul_(_LOG2E).exp2_()


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
