"""Heads are independent: batching, per-head budgets and padding."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_compaction.core import METHODS, attention, compact_layer

from .synthetic import structured_layer

# ``random`` draws one [H, T] score matrix, so a single head alone sees other numbers.
DETERMINISTIC = sorted(set(METHODS) - {"random"})


def _assert_same_rows(out, head: int, alone, rows: int, unseen: torch.Tensor) -> None:
    """Head ``head`` of a batched result equals the head compacted alone (first ``rows`` rows).

    Selections must agree exactly; fits up to float32 round-off, which ill-conditioned mass
    systems can amplify in beta along directions the outputs barely depend on.
    """
    assert torch.equal(out.indices[head, :rows], alone.indices[0, :rows])
    assert torch.equal(out.keys[head, :rows], alone.keys[0, :rows])
    torch.testing.assert_close(out.bias[head, :rows], alone.bias[0, :rows], atol=2e-2, rtol=0)

    def attend(c, h):
        return attention(
            unseen[head : head + 1],
            c.keys[h : h + 1, :rows],
            c.values[h : h + 1, :rows],
            c.bias[h : h + 1, :rows],
        )

    torch.testing.assert_close(attend(out, head), attend(alone, 0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_batched_equals_per_head_loop(method: str) -> None:
    layer = structured_layer(heads=3, length=96, dim=16, queries=128, seed=3)
    out = compact_layer(layer.keys, layer.values, layer.queries, 20, method=method)
    for h in range(3):
        alone = compact_layer(
            layer.keys[h : h + 1],
            layer.values[h : h + 1],
            layer.queries[h : h + 1],
            20,
            method=method,
        )
        _assert_same_rows(out, h, alone, 20, layer.held_out)


@pytest.mark.parametrize("method", ["am-highest", "am-omp", "h2o", "strided"])
def test_per_head_budgets(method: str) -> None:
    layer = structured_layer(heads=3, length=96, dim=16, queries=128, seed=4)
    budgets = torch.tensor([5, 17, 11])
    out = compact_layer(layer.keys, layer.values, layer.queries, budgets, method=method)

    assert out.keys.shape == (3, 17, 16) and out.indices.shape == (3, 17)
    assert torch.equal(out.lengths, budgets)
    for h, b in enumerate(budgets.tolist()):
        assert (out.indices[h, :b] >= 0).all() and (out.indices[h, b:] == -1).all()
        assert (out.indices[h, :b].diff() > 0).all()
        assert torch.isfinite(out.bias[h, :b]).all() and (out.bias[h, b:] == -math.inf).all()
        assert (out.keys[h, b:] == 0).all() and (out.values[h, b:] == 0).all()
        alone = compact_layer(
            layer.keys[h : h + 1],
            layer.values[h : h + 1],
            layer.queries[h : h + 1],
            b,
            method=method,
        )
        _assert_same_rows(out, h, alone, b, layer.held_out)


def test_query_subsampling_is_seeded() -> None:
    layer = structured_layer(heads=2, length=96, dim=16, queries=300, seed=5)
    positions = torch.arange(300).expand(2, -1) % 96

    def run(**options):
        return compact_layer(
            layer.keys, layer.values, layer.queries, 16, query_positions=positions, **options
        )

    a, b = run(max_queries=64, seed=1), run(max_queries=64, seed=1)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert not torch.equal(a.values, run(max_queries=64, seed=2).values)
    assert not torch.equal(a.values, run().values)  # 300 <= default cap: every query is used
