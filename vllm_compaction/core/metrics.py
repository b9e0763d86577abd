"""How well a compact cache stands in for the original, measured on held-out queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import attention, default_scale, logits
from .compacted import Compacted


@dataclass(frozen=True)
class Errors:
    """Attention-matching errors on a set of queries.

    Attributes:
        output: ||o_c - o||_F / ||o||_F over all heads and queries, where o attends over the
            original block (followed by the later keys, if any) and o_c over the compact one.
        log_mass: mean over heads and queries of |log Z_c - log Z|, the block's own attention
            mass (later keys excluded).
    """

    output: float
    log_mass: float


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """||approx - exact||_F / ||exact||_F in fp32."""
    exact = exact.float()
    return float((approx.float() - exact).norm() / exact.norm().clamp_min(1e-30))


def log_mass(
    queries: Tensor, keys: Tensor, bias: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """[H, n] log sum_j exp(scale q.k_j + bias_j) in fp32."""
    return logits(queries, keys, default_scale(keys.shape[-1], scale), bias).logsumexp(dim=-1)


def compaction_errors(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    compacted: Compacted,
    *,
    bias: Tensor | None = None,
    later_keys: Tensor | None = None,
    later_values: Tensor | None = None,
    scale: float | None = None,
) -> Errors:
    """Errors of ``compacted`` against the original block on held-out ``queries``.

    queries [H, n, d]; keys [H, T, d], values [H, T, d_v] and bias [H, T] of the original
    block; later_keys [H, T', d], later_values [H, T', d_v]: tokens after the block (the
    realistic case: a question or the model's own output attends to both). Every query sees
    every key.
    """
    scale = default_scale(keys.shape[-1], scale)
    if bias is None:
        bias = keys.new_zeros(keys.shape[:2], dtype=torch.float32)
    full_k, full_v, full_b = keys, values, bias.float()
    comp_k, comp_v, comp_b = compacted.keys, compacted.values, compacted.bias
    if later_keys is not None:
        if later_values is None:
            raise ValueError("later_keys needs later_values")
        later_b = later_keys.new_zeros(later_keys.shape[:2], dtype=torch.float32)
        full_k, comp_k = (torch.cat([k.float(), later_keys.float()], 1) for k in (full_k, comp_k))
        full_v, comp_v = (torch.cat([v.float(), later_values.float()], 1) for v in (full_v, comp_v))
        full_b, comp_b = (torch.cat([b, later_b], 1) for b in (full_b, comp_b))
    output = relative_error(
        attention(queries, comp_k, comp_v, comp_b, scale),
        attention(queries, full_k, full_v, full_b, scale),
    )
    mass_gap = log_mass(queries, compacted.keys, compacted.bias, scale) - log_mass(
        queries, keys, bias, scale
    )
    return Errors(output=output, log_mass=float(mass_gap.abs().mean()))
