"""Causal reference queries: query i never uses keys after its own position."""

from __future__ import annotations

import torch

from vllm_compaction.core import attention, compact_cache, compact_layer

from .synthetic import structured_layer

LAST = 159  # every query sits at or before this position


def _positioned(seed: int = 8):
    layer = structured_layer(heads=2, length=256, dim=16, queries=384, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, LAST + 1, layer.queries.shape[:2], generator=gen)
    positions[:, 0] = LAST
    changed_k, changed_v = layer.keys.clone(), layer.values.clone()
    changed_k[:, LAST + 1 :] = 5 * torch.randn(changed_k[:, LAST + 1 :].shape, generator=gen)
    changed_v[:, LAST + 1 :] = torch.randn(changed_v[:, LAST + 1 :].shape, generator=gen)
    return layer, positions, changed_k, changed_v


def test_keys_after_every_query_do_not_matter() -> None:
    layer, positions, changed_k, changed_v = _positioned()
    for method in ("am-highest", "am-omp", "h2o"):
        out = compact_layer(
            layer.keys, layer.values, layer.queries, 40, method=method, query_positions=positions
        )
        moved = compact_layer(
            changed_k, changed_v, layer.queries, 40, method=method, query_positions=positions
        )
        assert (out.indices <= LAST).all(), method
        assert torch.equal(out.indices, moved.indices), method
        torch.testing.assert_close(out.bias, moved.bias)
        torch.testing.assert_close(out.values, moved.values)

    # Without positions the same change does move the fit (the check above can fail).
    free = compact_layer(layer.keys, layer.values, layer.queries, 40)
    free_moved = compact_layer(changed_k, changed_v, layer.queries, 40)
    assert not torch.equal(free.indices, free_moved.indices)


def test_full_budget_with_positions_reproduces_cache() -> None:
    # The value design must mask kept keys causally too, or the targets would not be met.
    layer, positions, _, _ = _positioned(seed=9)
    out = compact_layer(layer.keys, layer.values, layer.queries, 256, query_positions=positions)
    # beta moves with the masses' fp32 rounding (~2e-7 relative, from the statistics pass's
    # own exp and sums against the fit's), amplified by the causal design's conditioning.
    torch.testing.assert_close(out.bias, torch.zeros_like(out.bias), atol=5e-5, rtol=0)
    torch.testing.assert_close(out.values, layer.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        attention(layer.held_out, out.keys, out.values, out.bias),
        attention(layer.held_out, layer.keys, layer.values),
        atol=1e-5,
        rtol=1e-5,
    )


def test_compact_cache_maps_positions_of_the_rest() -> None:
    # Verbatim tokens shift the rest's indices; a wrong mapping would let queries see later keys.
    layer, positions, changed_k, changed_v = _positioned(seed=10)
    kwargs = dict(keep_first=4, protected=[(20, 40), (100, 110)], query_positions=[positions])
    out = compact_cache([layer.keys], [layer.values], [layer.queries], 60, **kwargs)[0]
    moved = compact_cache([changed_k], [changed_v], [layer.queries], 60, **kwargs)[0]
    assert (out.indices <= LAST).all()
    assert torch.equal(out.indices, moved.indices)
    torch.testing.assert_close(out.bias, moved.bias)
    torch.testing.assert_close(out.values, moved.values)
