"""Seeded synthetic layers with the structure compaction exploits (clusters, correlated queries)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Layer:
    """One synthetic layer: a block to compact, its reference and held-out queries, later tokens.

    keys/values [H, T, d]; queries [H, n, d] (for the fit); held_out [H, m, d] (unseen, same
    distribution); later_keys/later_values [H, T2, d] (tokens after the block).
    """

    keys: Tensor
    values: Tensor
    queries: Tensor
    held_out: Tensor
    later_keys: Tensor
    later_values: Tensor


def structured_layer(
    heads: int = 2,
    length: int = 256,
    dim: int = 32,
    queries: int = 256,
    held_out: int = 128,
    later: int = 64,
    clusters: int = 12,
    sharpness: float = 1.0,
    spread: float = 0.5,
    seed: int = 0,
) -> Layer:
    """Keys drawn around a few cluster centres (``spread`` = within-cluster noise; values share
    the cluster), plus a shared offset; queries are random mixtures of the centres scaled by
    ``sharpness``, so attention lands on clusters with moderate entropy.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    centres = randn(heads, clusters, dim)
    value_centres = randn(heads, clusters, dim)
    offset = randn(heads, 1, dim)

    def tokens(count: int) -> tuple[Tensor, Tensor]:
        which = torch.randint(clusters, (heads, count), generator=gen)
        pick = which[..., None].expand(-1, -1, dim)
        k = centres.gather(1, pick) + spread * randn(heads, count, dim) + offset
        v = value_centres.gather(1, pick) + spread * randn(heads, count, dim)
        return k, v

    def probes(count: int) -> Tensor:
        mix = torch.softmax(2.0 * randn(heads, count, clusters), dim=-1)
        return sharpness * (torch.bmm(mix, centres) + 0.5 * randn(heads, count, dim))

    keys, values = tokens(length)
    later_keys, later_values = tokens(later)
    return Layer(keys, values, probes(queries), probes(held_out), later_keys, later_values)
