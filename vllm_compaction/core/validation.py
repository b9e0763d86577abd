"""Input checks for compact_layer, each failing with a ValueError that names the problem."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_tensor(name: str, x: object, ndim: int, layout: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    return x


def _check_per_query(name: str, x: object, queries: Tensor) -> None:
    """``x`` must be a [H_kv, n] tensor: one entry per reference query."""
    x = _check_tensor(name, x, 2, "[H_kv, n]")
    if x.shape != queries.shape[:2]:
        raise ValueError(
            f"{name} must be [H_kv, n] = {tuple(queries.shape[:2])}, got {tuple(x.shape)}"
        )


def _check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_inputs(
    keys: Tensor,
    values: Tensor,
    queries: Tensor,
    budget: int | Tensor,
    bias: Tensor | None,
    query_positions: Tensor | None,
    outside_lse: Tensor | None = None,
) -> Tensor:
    """Validate one layer's inputs; return the per-head budgets as a LongTensor [H]."""
    keys = _check_tensor("keys", keys, 3, "[H_kv, T, d]")
    values = _check_tensor("values", values, 3, "[H_kv, T, d]")
    queries = _check_tensor("queries", queries, 3, "[H_kv, n, d]")
    h, t, d = keys.shape
    if values.shape[:2] != keys.shape[:2]:
        raise ValueError(
            f"values {tuple(values.shape)} must match keys {tuple(keys.shape)} in H_kv, T"
        )
    if queries.shape[0] != h or queries.shape[2] != d:
        raise ValueError(f"queries {tuple(queries.shape)} must be [H_kv={h}, n, d={d}]")
    if queries.shape[1] == 0:
        raise ValueError("queries is empty (n = 0): the fit needs at least one reference query")
    for name, x in (("keys", keys), ("values", values), ("queries", queries)):
        _check_float(name, x)
    if bias is not None:
        bias = _check_tensor("bias", bias, 2, "[H_kv, T]")
        if bias.shape != (h, t):
            raise ValueError(f"bias must be [H_kv={h}, T={t}], got {tuple(bias.shape)}")
        if not bias.is_floating_point() or torch.isnan(bias).any() or (bias == math.inf).any():
            raise ValueError("bias must be floating point without NaN or +inf (-inf is allowed)")
    if query_positions is not None:
        _check_per_query("query_positions", query_positions, queries)
        if query_positions.is_floating_point() or query_positions.dtype == torch.bool:
            raise ValueError(f"query_positions must be integers, got {query_positions.dtype}")
    if outside_lse is not None:
        _check_per_query("outside_lse", outside_lse, queries)
        if not outside_lse.is_floating_point() or not (outside_lse < math.inf).all():
            raise ValueError("outside_lse must be floating point without NaN or +inf")
    return _budgets(budget, h, t, keys.device)


def _budgets(budget: int | Tensor, heads: int, length: int, device: torch.device) -> Tensor:
    if isinstance(budget, Tensor):
        if budget.is_floating_point() or budget.dtype == torch.bool or budget.is_complex():
            raise ValueError(f"budget tensor must hold integers, got {budget.dtype}")
        if budget.ndim == 0:
            budget = budget.expand(heads)
        if budget.shape != (heads,):
            raise ValueError(f"budget tensor must be [H_kv={heads}], got {tuple(budget.shape)}")
        budgets = budget.to(device=device, dtype=torch.long)
    elif isinstance(budget, int) and not isinstance(budget, bool):
        budgets = torch.full((heads,), budget, dtype=torch.long, device=device)
    else:
        raise ValueError(
            f"budget must be an int or a LongTensor [H_kv], got {type(budget).__name__}"
        )
    if int(budgets.min()) < 1 or int(budgets.max()) > length:
        raise ValueError(f"budget must be in [1, T={length}], got {budgets.tolist()}")
    return budgets
