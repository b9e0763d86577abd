"""compact_cache: compact every layer of a captured cache, keeping sinks and spans verbatim."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .attention import default_scale, log_mass
from .compact import compact_layer
from .compacted import Compacted
from .indexing import gather_rows


def compact_cache(
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    queries: Sequence[Tensor],
    budget: int | None = None,
    *,
    ratio: float | None = None,
    query_positions: Sequence[Tensor] | None = None,
    biases: Sequence[Tensor] | None = None,
    outside_lse: Sequence[Tensor] | None = None,
    keep_first: int = 4,
    protected: Sequence[tuple[int, int]] = (),
    method: str = "am-highest",
    scale: float | None = None,
    **method_options: Any,
) -> list[Compacted]:
    """Compact a whole model's cache to ``budget`` rows per head and layer.

    The first ``keep_first`` tokens (attention sinks) and every ``protected`` span [start, end)
    (e.g. chat-template tokens) are kept verbatim with beta = 0; the remaining tokens are
    compacted with ``compact_layer`` into what is left of the budget.

    Args:
        keys, values: per layer [H_kv, T, d]; queries: per layer [H_kv, n, d].
        budget: total kept rows per head, verbatim rows included. Give this or ``ratio``.
        ratio: compression ratio T / budget (e.g. 10 keeps a tenth).
        query_positions: per layer [H_kv, n] positions for causal masking, or None.
        biases: per layer [H_kv, T] bias already on the keys, or None.
        outside_lse: per layer [H_kv, n] log attention mass of each query on tokens after the
            context (e.g. the repeat turn it belongs to; -inf for none). When given, the mass
            on the verbatim rows is added and the fit weighs each query by the share of its
            attention the compacted rows receive (``compact_layer``'s ``outside_lse``). None
            (the default; it kept more answer likelihood on SQuAD, docs/benchmarks-core.md):
            each query counts by its attention among the compacted rows alone.
        method, scale, method_options: passed to ``compact_layer``.

    Returns:
        One Compacted per layer; indices are original token positions, ascending.
    """
    if not (len(keys) == len(values) == len(queries)) or not keys:
        raise ValueError("keys, values and queries must be non-empty lists of the same length")
    length = keys[0].shape[1]
    if any(k.ndim != 3 or k.shape[1] != length for k in keys):
        raise ValueError("every layer's keys must be [H_kv, T, d] with the same T")
    verbatim = _verbatim_positions(length, keep_first, protected, keys[0].device)
    total = _total_budget(length, budget, ratio)
    if total < verbatim.numel():
        raise ValueError(
            f"budget {total} is smaller than the {verbatim.numel()} tokens kept verbatim "
            "(keep_first + protected spans)"
        )
    is_rest = torch.ones(length, dtype=torch.bool, device=verbatim.device)
    is_rest[verbatim] = False
    rest = is_rest.nonzero().squeeze(1)
    rest_budget = min(total - verbatim.numel(), rest.numel())
    out = []
    for layer, (k, v, q) in enumerate(zip(keys, values, queries, strict=True)):
        bias = None if biases is None else biases[layer]
        positions = None if query_positions is None else query_positions[layer]
        kept = [_verbatim(k, v, bias, verbatim)]
        outside = None
        if outside_lse is not None:
            verbatim_lse = _verbatim_lse(q, kept[0], positions, scale)
            outside = torch.logaddexp(verbatim_lse, outside_lse[layer].float())
        if rest_budget > 0:
            part = compact_layer(
                k[:, rest],
                v[:, rest],
                q,
                rest_budget,
                method=method,
                scale=scale,
                bias=None if bias is None else bias[:, rest],
                # A query at position p sees the rest tokens at positions <= p; in the subset
                # those are the ones before index searchsorted(rest, p, right=True).
                query_positions=None
                if positions is None
                else torch.searchsorted(rest, positions.contiguous(), right=True) - 1,
                outside_lse=outside,
                **method_options,
            )
            source = torch.where(part.indices >= 0, rest[part.indices.clamp(min=0)], -1)
            kept.append(Compacted(part.keys, part.bias, part.values, source, part.lengths))
        out.append(_merge(kept))
    return out


def _total_budget(length: int, budget: int | None, ratio: float | None) -> int:
    if (budget is None) == (ratio is None):
        raise ValueError("give exactly one of budget and ratio")
    if ratio is not None:
        if ratio < 1:
            raise ValueError(f"ratio is T / budget and must be >= 1, got {ratio}")
        return max(1, round(length / ratio))
    if not 1 <= budget <= length:
        raise ValueError(f"budget must be in [1, T={length}], got {budget}")
    return budget


def _verbatim_positions(
    length: int, keep_first: int, protected: Sequence[tuple[int, int]], device: torch.device
) -> Tensor:
    """Sorted unique positions kept verbatim: [0, keep_first) and every protected span."""
    if keep_first < 0:
        raise ValueError(f"keep_first must be >= 0, got {keep_first}")
    mask = torch.zeros(length, dtype=torch.bool, device=device)
    mask[: min(keep_first, length)] = True
    for start, end in protected:
        if not 0 <= start <= end <= length:
            raise ValueError(
                f"protected span ({start}, {end}) must satisfy 0 <= start <= end <= T={length}"
            )
        mask[start:end] = True
    return mask.nonzero().squeeze(1)


def _verbatim(keys: Tensor, values: Tensor, bias: Tensor | None, positions: Tensor) -> Compacted:
    h = keys.shape[0]
    index = positions.expand(h, -1)
    kept_bias = (
        torch.zeros(index.shape, device=keys.device) if bias is None else bias[:, positions].float()
    )
    return Compacted(
        keys=gather_rows(keys, index),
        bias=kept_bias,
        values=gather_rows(values, index),
        indices=index,
        lengths=torch.full((h,), positions.numel(), dtype=torch.long, device=keys.device),
    )


def _verbatim_lse(
    queries: Tensor, kept: Compacted, positions: Tensor | None, scale: float | None
) -> Tensor:
    """[H, n] log of each query's attention mass on the verbatim rows (-inf if it sees none)."""
    scale = default_scale(kept.keys.shape[-1], scale)
    return log_mass(queries, kept.keys, scale, kept.bias, positions, kept.indices)


def _merge(parts: list[Compacted]) -> Compacted:
    """Concatenate compacted parts of one layer and order rows by source position, padding
    (index -1) last as ``compact_layer`` leaves it."""
    indices = torch.cat([p.indices for p in parts], dim=1)
    order = indices.masked_fill(indices < 0, indices.shape[1] + indices.max()).argsort(dim=1)
    return Compacted(
        keys=gather_rows(torch.cat([p.keys for p in parts], dim=1), order),
        bias=torch.cat([p.bias for p in parts], dim=1).gather(1, order),
        values=gather_rows(torch.cat([p.values for p in parts], dim=1), order),
        indices=indices.gather(1, order),
        lengths=sum(p.lengths for p in parts),
    )
