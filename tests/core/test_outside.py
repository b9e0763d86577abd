"""Attention spent outside the compacted rows (sinks, template, later tokens) weighs each query."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_compaction.core import compact_cache, compact_layer
from vllm_compaction.core.attention import logits


def _two_audiences(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Keys 0-7 draw queries A sharply, keys 8-15 draw queries B more softly, 16-63 are noise.

    Without knowing where else they look, A's peaked attention wins the selection; A also
    looks almost entirely elsewhere, so what it wants should not.
    """
    gen = torch.Generator().manual_seed(seed)
    dim = 16
    a_dir, b_dir = torch.eye(dim)[0], torch.eye(dim)[1]
    keys = 0.1 * torch.randn(64, dim, generator=gen)
    keys[:8] += 6.0 * a_dir
    keys[8:16] += 2.0 * b_dir
    queries = torch.cat([a_dir.expand(32, -1) * 4.0, b_dir.expand(32, -1) * 4.0])
    queries = queries + 0.1 * torch.randn(64, dim, generator=gen)
    values = torch.randn(64, dim, generator=gen)
    return keys[None], values[None], queries[None]


def _block_lse(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    return logits(queries, keys, 1 / math.sqrt(keys.shape[-1])).logsumexp(-1)


def test_queries_that_look_elsewhere_do_not_decide_the_selection() -> None:
    keys, values, queries = _two_audiences()
    plain = compact_layer(keys, values, queries, 8, method="kvzip")
    assert set(plain.indices[0].tolist()) == set(range(8))  # the negative control

    # A spends e^12 times its block mass elsewhere (a sink); B sees only these keys.
    outside = _block_lse(keys, queries)
    outside[:, 32:] = -math.inf
    outside[:, :32] += 12.0
    for method in ("kvzip", "am-highest", "h2o"):
        out = compact_layer(keys, values, queries, 8, method=method, outside_lse=outside)
        assert set(out.indices[0].tolist()) == set(range(8, 16)), method


@pytest.mark.parametrize("method", ["am-highest", "am-omp", "kvzip"])
def test_no_mass_outside_is_the_same_as_none(method: str) -> None:
    keys, values, queries = _two_audiences(1)
    none = compact_layer(keys, values, queries, 12, method=method)
    empty = torch.full(queries.shape[:2], -math.inf)
    same = compact_layer(keys, values, queries, 12, method=method, outside_lse=empty)
    assert torch.equal(none.indices, same.indices) and torch.equal(none.keys, same.keys)
    # Every share is then 1 up to rounding (mass / mass): the fits agree to rounding.
    torch.testing.assert_close(same.bias, none.bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(same.values, none.values, rtol=1e-5, atol=1e-6)


def test_compact_cache_counts_the_verbatim_rows_as_outside_when_asked() -> None:
    keys, values, queries = _two_audiences(2)
    keep = 3
    nothing_after = [torch.full(queries.shape[:2], -math.inf)]
    asked = compact_cache(
        [keys], [values], [queries], 12, keep_first=keep, outside_lse=nothing_after
    )
    plain = compact_cache([keys], [values], [queries], 12, keep_first=keep)
    verbatim = _block_lse(keys[:, :keep], queries)
    rest = (keys[:, keep:], values[:, keep:], queries, 12 - keep)
    for cached, direct in (
        (asked[0], compact_layer(*rest, outside_lse=verbatim)),
        (plain[0], compact_layer(*rest)),
    ):
        assert torch.equal(cached.indices[0, keep:], direct.indices[0] + keep)
        assert torch.equal(cached.bias[:, keep:], direct.bias)
        assert torch.equal(cached.values[:, keep:], direct.values)
    assert not torch.equal(asked[0].values, plain[0].values)


def test_outside_lse_is_validated() -> None:
    keys, values, queries = _two_audiences()
    with pytest.raises(ValueError, match="outside_lse must be"):
        compact_layer(keys, values, queries, 8, outside_lse=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="outside_lse must be"):
        compact_layer(keys, values, queries, 8, outside_lse=torch.full((1, 64), math.nan))
