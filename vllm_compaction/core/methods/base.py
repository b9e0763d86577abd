"""The shared compaction flow: select kept keys, then build the compact rows.

Eviction methods copy what they keep (beta = 0, C2 = V[kept]); Attention Matching methods
fit beta and C2 on top of the same selection. A method overrides only ``select`` (or
``score``), in the spirit of kvpress's small press classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..compacted import Compacted
from ..fit import fit_beta, fit_values
from ..indexing import gather_rows, top_budget
from ..problem import Problem


@dataclass
class Method:
    """Base of every method.

    Args:
        max_queries: reference queries used per head; more are subsampled at random. Time
            grows with n x T; methods that read E whole, am-omp, h2o and snapkv, hold it as
            [H, n, T] fp32: 16384 x 8192 x 3 heads is 1.6 GB. On SQuAD with Qwen2.5-Coder-0.5B
            (about 20,000 pooled context queries per head) 16384 kept more than 8192 (retained
            0.826 vs 0.788 at 10x, 0.690 vs 0.675 at 20x) and 4096 much less.
        seed: seed of the query subsampling (and of the ``random`` method).
    """

    max_queries: int = 16384
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {self.max_queries}")

    def select(self, problem: Problem) -> Tensor:
        """Kept key positions [H, max budget], ascending per head, -1 past each head's budget."""
        raise NotImplementedError

    def build(self, problem: Problem, indices: Tensor) -> Compacted:
        """Compact rows for ``indices``: keep existing bias (beta = 0) and copy the values."""
        return _compacted(problem, indices, torch.zeros_like(indices, dtype=torch.float32), None)

    def __call__(self, problem: Problem) -> Compacted:
        return self.build(problem, self.select(problem))


@dataclass
class ScoreMethod(Method):
    """Keep the top-scoring keys of each head; subclasses define ``score``.

    Args:
        pool_heads: share the layer's rows (the sum of the budgets) among its heads by ranking
            every head's keys together, as KVzip does: a head whose attention spreads over many
            keys gets more rows than one that reads a few. Scores must be comparable across
            heads (softmax weights are). Each head keeps at least ``pool_floor`` x its own
            budget; padding rows (bias -inf) fill the heads up to the largest budget.
        pool_floor: the smallest share of its budget a pooled head keeps (0..1).
    """

    pool_heads: bool = False
    pool_floor: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.pool_floor <= 1:
            raise ValueError(f"pool_floor must be in [0, 1], got {self.pool_floor}")

    def score(self, problem: Problem) -> Tensor:
        """[H, T] importance of each key (higher is kept first)."""
        raise NotImplementedError

    def select(self, problem: Problem) -> Tensor:
        # Keys already masked out (bias -inf, e.g. padding of a compacted cache) come last.
        scores = self.score(problem).masked_fill(problem.bias == -math.inf, -math.inf)
        budgets = problem.budgets
        if self.pool_heads:
            budgets = pooled_budgets(scores, budgets, self.pool_floor)
        return top_budget(scores, budgets)


def pooled_budgets(scores: Tensor, budgets: Tensor, floor: float) -> Tensor:
    """Per-head budgets [H] summing to ``budgets.sum()``: each head first gets
    ``floor * budgets[h]`` rows, the rest go to the highest remaining scores of any head."""
    heads, length = scores.shape
    base = (budgets.float() * floor).floor().long().clamp(min=1, max=length)
    order = scores.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(length, device=scores.device).expand(heads, -1))
    # A head's own top `base` keys are taken; the remaining keys compete across heads
    # (masked keys last but still countable, so no head can win more keys than it has).
    rest = scores.clamp(min=torch.finfo(scores.dtype).min)
    rest = rest.masked_fill(ranks < base[:, None], -math.inf).flatten()
    extra = int(budgets.sum() - base.sum())
    won = rest.topk(extra).indices // length if extra > 0 else rest.new_empty(0, dtype=torch.long)
    return base + torch.bincount(won, minlength=heads)


@dataclass
class AttentionMatching(Method):
    """Base of Attention Matching: after selection, fit beta (NNLS) and the values (ridge LS).

    Args:
        beta_min, beta_max: bounds of the fitted correction beta = log w.
        mass_weighting: mass-fit rows are weighted by y^-mass_weighting (y = a query's mass):
            0 fits absolute mass, where queries with diffuse attention dominate; 1 fits
            relative mass error, every query alike. 0.5 gave the lowest held-out output and
            log-mass errors on captured Qwen2.5-Coder-0.5B layers (1 did best on synthetic).
        mass_ridge: relative ridge of the mass solve (toward w = 1, i.e. keep the original).
        mass_steps: projected-gradient steps after clamping w into bounds.
        value_ridge: relative ridge of the value fit (toward the original values). 1 kept
            more answer likelihood on SQuAD than 1e-2 (a refit that matches the reference
            queries more closely generalised worse to later questions) and than 1e6 at 10x.
        share_weighting: value-fit rows weighted by share^share_weighting, share = the part
            of a query's attention on the compacted keys (needs ``outside`` masses).
    """

    beta_min: float = -3.0
    beta_max: float = 3.0
    mass_weighting: float = 0.5
    mass_ridge: float = 1e-6
    mass_steps: int = 20
    value_ridge: float = 1.0
    share_weighting: float = 1.0

    def build(self, problem: Problem, indices: Tensor) -> Compacted:
        selected = problem.logits(indices)  # shared by both fits
        beta = fit_beta(
            problem,
            indices,
            selected,
            weighting=self.mass_weighting,
            beta_min=self.beta_min,
            beta_max=self.beta_max,
            ridge=self.mass_ridge,
            steps=self.mass_steps,
        )
        values = fit_values(
            problem,
            indices,
            selected,
            beta,
            ridge=self.value_ridge,
            share_weighting=self.share_weighting,
        )
        return _compacted(problem, indices, beta, values)


def _compacted(problem: Problem, indices: Tensor, beta: Tensor, values: Tensor | None) -> Compacted:
    """Assemble the output; ``values`` None copies the originals. Padding: bias -inf, zeros."""
    padding = indices < 0
    bias = problem.bias.gather(1, indices.clamp(min=0)) + beta
    if values is None:
        values = gather_rows(problem.values, indices)
    else:
        finite = torch.finfo(problem.values.dtype).max  # fp16 overflow would give inf
        values = values.clamp(-finite, finite).to(problem.values.dtype)
        values = values.masked_fill(padding[..., None], 0)
    return Compacted(
        keys=gather_rows(problem.keys, indices),
        bias=bias.masked_fill(padding, -math.inf),
        values=values,
        indices=indices,
        lengths=(~padding).sum(dim=1),
    )
