"""compact_cache: sinks and protected spans verbatim, the rest compacted into what is left."""

from __future__ import annotations

import pytest
import torch

from vllm_compaction.core import compact_cache

from .synthetic import structured_layer


def _layers(count: int = 3):
    return [
        structured_layer(heads=2, length=128, dim=16, queries=128, seed=20 + i)
        for i in range(count)
    ]


def test_verbatim_tokens_and_total_budget() -> None:
    layers = _layers()
    keys = [x.keys for x in layers]
    values = [x.values for x in layers]
    outs = compact_cache(keys, values, [x.queries for x in layers], 32, protected=[(60, 66)])
    verbatim = torch.tensor([0, 1, 2, 3, 60, 61, 62, 63, 64, 65])
    for out, k, v in zip(outs, keys, values, strict=True):
        assert out.keys.shape == (2, 32, 16) and torch.equal(out.lengths, torch.tensor([32, 32]))
        assert (out.indices.diff(dim=1) > 0).all()
        rows = torch.isin(out.indices, verbatim)
        assert (rows.sum(dim=1) == verbatim.numel()).all()
        assert (out.bias[rows] == 0).all()
        # Every row is the original token at its reported position (keys; values where verbatim).
        assert torch.equal(out.keys, k.gather(1, out.indices[..., None].expand(-1, -1, 16)))
        original_v = v.gather(1, out.indices[..., None].expand(-1, -1, 16))
        assert torch.equal(out.values[rows], original_v[rows])
        assert not torch.equal(out.values[~rows], original_v[~rows])  # fitted, not copied


def test_ratio_equals_budget() -> None:
    layers = _layers(1)
    args = ([layers[0].keys], [layers[0].values], [layers[0].queries])
    by_ratio = compact_cache(*args, ratio=4)[0]
    by_budget = compact_cache(*args, 32)[0]
    assert torch.equal(by_ratio.indices, by_budget.indices)


def test_budget_of_verbatim_only() -> None:
    layer = _layers(1)[0]
    out = compact_cache([layer.keys], [layer.values], [layer.queries], 4)[0]
    assert torch.equal(out.indices, torch.arange(4).expand(2, -1))
    assert torch.equal(out.values, layer.values[:, :4])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 3}, "smaller than the 4 tokens"),
        ({"budget": 10, "ratio": 4}, "exactly one"),
        ({}, "exactly one"),
        ({"ratio": 0.5}, "ratio"),
        ({"budget": 20, "protected": [(50, 40)]}, "protected span"),
        ({"budget": 20, "protected": [(120, 200)]}, "protected span"),
    ],
)
def test_bad_cache_arguments(kwargs, message) -> None:
    layer = _layers(1)[0]
    with pytest.raises(ValueError, match=message):
        compact_cache([layer.keys], [layer.values], [layer.queries], **kwargs)


def test_pooled_head_budgets_keep_verbatim_rows_and_pad_last() -> None:
    layers = _layers()
    outs = compact_cache(
        [x.keys for x in layers],
        [x.values for x in layers],
        [x.queries for x in layers],
        32,
        protected=[(60, 66)],
        pool_heads=True,
    )
    verbatim = torch.tensor([0, 1, 2, 3, 60, 61, 62, 63, 64, 65])
    for out in outs:
        assert int(out.lengths.sum()) == 64
        for head, live in enumerate(out.lengths.tolist()):
            rows = out.indices[head]
            assert (rows[:live].diff() > 0).all() and (rows[live:] == -1).all()
            assert torch.isin(verbatim, rows[:live]).all()  # each head keeps them all
            assert (out.bias[head, live:] == -torch.inf).all()
    assert any(not torch.equal(out.lengths, torch.tensor([32, 32])) for out in outs)
