"""One layer's compaction inputs and the attention statistics every method reads."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .attention import exp_shifted_, logits, safe_reciprocal

# Query rows per chunk when a statistic needs an [H, n, T]-sized temporary.
_ROW_CHUNK = 1024


@dataclass
class Problem:
    """Inputs of one layer, with the shifted exponentials E computed once and shared.

    Attributes:
        keys: [H, T, d] post-RoPE keys (input dtype).
        values: [H, T, d_v] values (input dtype).
        queries: [H, n, d] reference queries (already subsampled).
        bias: [H, T] float32 bias already on the keys (zeros for a fresh cache; -inf allowed).
        query_positions: [H, n] long position of each query, or None (queries see every key).
        budgets: [H] long number of keys to keep per head.
        scale: softmax scale.
    """

    keys: Tensor
    values: Tensor
    queries: Tensor
    bias: Tensor
    query_positions: Tensor | None
    budgets: Tensor
    scale: float

    def logits(self, indices: Tensor | None = None) -> Tensor:
        """fp32 logits [H, n, t] of the queries against the keys at ``indices`` [H, t].

        All keys if ``indices`` is None. Causal masking uses the keys' original positions;
        ``indices`` must be >= 0.
        """
        if indices is None:
            return logits(self.queries, self.keys, self.scale, self.bias, self.query_positions)
        keys = self.keys.gather(1, indices[..., None].expand(-1, -1, self.keys.shape[-1]))
        bias = self.bias.gather(1, indices)
        return logits(self.queries, keys, self.scale, bias, self.query_positions, indices)

    @cached_property
    def _shifted(self) -> tuple[Tensor, Tensor]:
        return exp_shifted_(self.logits())

    @property
    def weights(self) -> Tensor:
        """E [H, n, T] = exp(S - row max) in fp32; the softmax weights are E / mass."""
        return self._shifted[0]

    @property
    def mass(self) -> Tensor:
        """y [H, n] = row sums of E: each query's attention mass, the target of the beta fit."""
        return self._shifted[1]

    @cached_property
    def inverse_mass(self) -> Tensor:
        """[H, n] 1/y, 0 for queries that see no key (those rows drop out of every fit)."""
        return safe_reciprocal(self.mass)

    @cached_property
    def targets(self) -> Tensor:
        """Y [H, n, d_v] = softmax(S) V in fp32 (zero rows for queries that see no key)."""
        return torch.bmm(self.weights, self.values.float()).mul_(self.inverse_mass[..., None])

    def mean_attention(self, rows: slice = slice(None)) -> Tensor:
        """[H, T] mean softmax weight of each key over the query ``rows`` that see any key."""
        inv = self.inverse_mass[:, rows]
        total = torch.bmm(inv[:, None, :], self.weights[:, rows]).squeeze(1)
        return total / (inv > 0).sum(dim=1, keepdim=True).clamp_min(1)

    def rms_attention(self) -> Tensor:
        """[H, T] root-mean-square softmax weight of each key over the queries that see any key."""
        total = torch.zeros_like(self.bias)
        for w, inv in zip(
            self.weights.split(_ROW_CHUNK, dim=1),
            self.inverse_mass.split(_ROW_CHUNK, dim=1),
            strict=True,
        ):
            total += (w * inv[..., None]).square_().sum(dim=1)
        count = (self.inverse_mass > 0).sum(dim=1, keepdim=True).clamp_min(1)
        return (total / count).sqrt_()

    @cached_property
    def duplicates(self) -> Tensor:
        """[H, T] bool: True for every exact copy of a key row after its first occurrence.

        Copies score alike under every method, so score ties would keep several of them
        although one copy with beta = log(count) carries them all.
        """
        h, t, d = self.keys.shape
        head = torch.arange(h, device=self.keys.device).repeat_interleave(t)
        rows = torch.cat([head[:, None].float(), self.keys.reshape(h * t, d).float()], dim=1)
        _, group = torch.unique(rows, dim=0, return_inverse=True)
        order = torch.arange(h * t, device=self.keys.device)
        first = torch.full((int(group.max()) + 1,), h * t, device=self.keys.device)
        first = first.scatter_reduce(0, group, order, reduce="amin")
        return (first[group] != order).view(h, t)
