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


def _focused_and_diffuse_heads(seed: int = 6):
    """Head 0 reads four keys (its queries all point at them); head 1 spreads over many."""
    layer = structured_layer(heads=2, length=96, dim=16, queries=128, sharpness=0.3, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=gen), dim=0)
    keys = layer.keys.clone()
    keys[0, :] -= (keys[0] @ direction)[:, None] * direction  # nothing else aligns with it
    keys[0, [10, 40, 70, 90]] += 8 * direction
    queries, held_out = layer.queries.clone(), layer.held_out.clone()
    queries[0] = 0.2 * queries[0] + 3 * direction
    held_out[0] = 0.2 * held_out[0] + 3 * direction
    return keys, layer.values, queries, held_out


@pytest.mark.parametrize("method", ["am-highest", "kvzip", "h2o"])
def test_pooled_head_budgets_follow_attention(method: str) -> None:
    keys, values, queries, held_out = _focused_and_diffuse_heads()
    uniform = compact_layer(keys, values, queries, 16, method=method)
    pooled = compact_layer(keys, values, queries, 16, method=method, pool_heads=True)

    lengths = pooled.lengths.tolist()
    assert sum(lengths) == 32 and lengths[0] >= 4 and lengths[1] > 16  # floor 0.25 x 16
    assert lengths == [4, 28] and pooled.indices[0, :4].tolist() == [10, 40, 70, 90]
    for h, b in enumerate(lengths):  # each head keeps its own top keys, fitted as alone
        alone = compact_layer(
            keys[h : h + 1], values[h : h + 1], queries[h : h + 1], b, method=method
        )
        _assert_same_rows(pooled, h, alone, b, held_out)

    exact = attention(held_out, keys, values)

    def error(out) -> float:  # mean over heads of the relative output error
        approx = attention(held_out, out.keys, out.values, out.bias)
        return float(((approx - exact).norm(dim=(1, 2)) / exact.norm(dim=(1, 2))).mean())

    # The same rows in all, moved to the head that spreads: the layer's output error drops.
    assert error(pooled) < 0.9 * error(uniform)


def test_pooled_budgets_never_exceed_a_head_length() -> None:
    keys, values, queries, _ = _focused_and_diffuse_heads()
    bias = torch.zeros(2, 96)
    bias[1, 20:] = -math.inf  # head 1 has 20 live keys; padding must not be counted as kept
    out = compact_layer(
        keys, values, queries, 60, bias=bias, method="am-highest", pool_heads=True, pool_floor=0.0
    )
    assert out.lengths.sum() == 120 and (out.lengths <= 96).all()
    assert torch.isfinite(out.bias[1, : int(out.lengths[1])]).sum() >= 20
