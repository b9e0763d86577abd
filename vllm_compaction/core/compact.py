"""compact_layer: the entry point that compacts one layer's KV cache."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .attention import default_scale
from .compacted import Compacted
from .methods import make_method
from .problem import Problem
from .validation import check_inputs


def compact_layer(
    keys: Tensor,
    values: Tensor,
    queries: Tensor,
    budget: int | Tensor,
    *,
    method: str = "am-highest",
    scale: float | None = None,
    bias: Tensor | None = None,
    query_positions: Tensor | None = None,
    outside_lse: Tensor | None = None,
    **method_options: Any,
) -> Compacted:
    """Compact one layer's cache to ``budget`` rows per KV head.

    Args:
        keys: [H_kv, T, d] post-RoPE keys; values: [H_kv, T, d] values (any float dtype).
        queries: [H_kv, n, d] post-RoPE reference queries, GQA query heads pooled per KV head.
        budget: kept rows per head, an int or a LongTensor [H_kv] (rows padded to the largest).
        method: a name from ``METHODS`` ("am-highest", "am-omp", "recent", "strided", "h2o",
            "snapkv", "kvzip", "random").
        scale: softmax scale, default 1/sqrt(d).
        bias: [H_kv, T] bias already on the keys (a compacted cache); -inf marks masked rows.
        query_positions: [H_kv, n] position of each query; query i then sees only keys at
            positions <= its own (key j is at position j). None: every query sees every key.
        outside_lse: [H_kv, n] log of the attention mass (exp of scaled logits) each query
            spends on keys not passed in: sinks and template tokens kept verbatim, tokens
            after the context (-inf: none). Selection and fits then weigh each query by the
            part of its attention these keys receive. None: the keys passed in are all it sees.
        method_options: options of the method's class, e.g. ``max_queries``, ``seed``,
            ``beta_min``, ``value_ridge`` (see ``vllm_compaction.core.methods``).

    Returns:
        Compacted with keys/values in the input dtype, float32 bias and sorted source indices.
    """
    budgets = check_inputs(keys, values, queries, budget, bias, query_positions, outside_lse)
    chosen = make_method(method, **method_options)
    if bias is None:
        bias = torch.zeros(keys.shape[:2], dtype=torch.float32, device=keys.device)
    queries, query_positions, outside_lse = _subsample(
        queries, query_positions, outside_lse, chosen.max_queries, chosen.seed
    )
    problem = Problem(
        keys=keys,
        values=values,
        queries=queries,
        bias=bias.float(),
        query_positions=None if query_positions is None else query_positions.long(),
        budgets=budgets,
        scale=default_scale(keys.shape[-1], scale),
        outside=None if outside_lse is None else outside_lse.float(),
    )
    return chosen(problem)


def _subsample(
    queries: Tensor, positions: Tensor | None, outside: Tensor | None, limit: int, seed: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Keep a seeded random ``limit`` of the n queries (the same rows for every head), in order,
    with their positions and outside masses."""
    n = queries.shape[1]
    if n <= limit:
        return queries, positions, outside
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=gen)[:limit].sort().values.to(queries.device)
    return (
        queries[:, rows],
        None if positions is None else positions[:, rows],
        None if outside is None else outside[:, rows],
    )
