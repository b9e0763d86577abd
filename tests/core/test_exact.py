"""Exactness: a full budget changes nothing, and repeated keys are recovered exactly."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_compaction.core import METHODS, attention, compact_layer
from vllm_compaction.core.methods import AMHighest
from vllm_compaction.core.problem import Problem


@pytest.mark.parametrize("method", sorted(METHODS))
def test_full_budget_reproduces_attention(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 48, 16, generator=gen), torch.randn(3, 48, 16, generator=gen)
    queries = torch.randn(3, 96, 16, generator=gen)
    unseen = torch.randn(3, 40, 16, generator=gen)

    out = compact_layer(keys, values, queries, 48, method=method)

    assert torch.equal(out.indices, torch.arange(48).expand(3, -1))
    torch.testing.assert_close(
        attention(unseen, out.keys, out.values, out.bias),
        attention(unseen, keys, values),
        atol=1e-5,
        rtol=1e-5,
    )


def _repeated(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Distinct keys/values [H, k, d] repeated m_j in 1..20 times each, shuffled in position."""
    gen = torch.Generator().manual_seed(seed)
    heads, distinct, dim = 2, 12, 16
    base_k = torch.randn(heads, distinct, dim, generator=gen)
    base_v = torch.randn(heads, distinct, dim, generator=gen)
    counts = torch.randint(1, 21, (distinct,), generator=gen)
    counts[0] = 20  # the largest multiplicity allowed must be recovered too
    source = torch.repeat_interleave(torch.arange(distinct), counts)
    source = source[torch.randperm(source.numel(), generator=gen)]
    keys, values = base_k[:, source], base_v[:, source]
    first = torch.stack([(source == j).nonzero()[0, 0] for j in range(distinct)])
    queries = torch.randn(heads, 64, dim, generator=gen)
    return keys, values, queries, counts, first


def test_fit_on_distinct_keys_recovers_log_multiplicity() -> None:
    keys, values, queries, counts, first = _repeated()
    heads = keys.shape[0]
    order = first.argsort()
    problem = Problem(
        keys=keys,
        values=values,
        queries=queries,
        bias=torch.zeros(keys.shape[:2]),
        query_positions=None,
        budgets=torch.full((heads,), first.numel()),
        scale=0.25,
    )
    out = AMHighest().build(problem, first[order].expand(heads, -1))

    expected = counts[order].float().log().expand(heads, -1)
    torch.testing.assert_close(out.bias, expected, atol=2e-3, rtol=0)
    unseen = torch.randn(heads, 30, keys.shape[-1], generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(
        attention(unseen, out.keys, out.values, out.bias, scale=0.25),
        attention(unseen, keys, values, scale=0.25),
        atol=1e-4,
        rtol=1e-4,
    )


def test_am_highest_keeps_one_copy_per_key() -> None:
    keys, values, queries, counts, first = _repeated(seed=1)
    distinct = counts.numel()

    # Budget = number of distinct keys: exactly the first copy of each is kept.
    out = compact_layer(keys, values, queries, distinct)
    assert torch.equal(out.indices, first.sort().values.expand(keys.shape[0], -1))
    expected = counts[first.argsort()].float().log()
    assert (out.bias - expected).abs().max() < 2e-3

    # Smaller budgets never keep two copies of one key.
    for budget in range(1, distinct):
        kept = compact_layer(keys, values, queries, budget).keys
        for head in kept:
            assert torch.unique(head, dim=0).shape[0] == budget


def test_beta_bounds_clip() -> None:
    keys, values, queries, _, first = _repeated()
    out = compact_layer(keys, values, queries, first.numel(), beta_max=1.0, beta_min=-0.5)
    assert out.bias.max() <= 1.0 + 1e-6
    assert out.bias.min() >= -0.5 - 1e-6
    assert math.isclose(float(out.bias.max()), 1.0, abs_tol=1e-6)
