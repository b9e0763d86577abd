"""Attention Matching with greedy (orthogonal matching pursuit) selection on the mass residual."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..fit import mass_rows, solve_mass
from ..indexing import gather_columns, sort_padded
from ..problem import Problem
from .base import AttentionMatching


@dataclass
class _Pursuit:
    """Greedy state, all heads batched. Slots are filled in any order and sorted at the end.

    slots [H, t] kept key per slot (-1 = free); design [H, n, t] weighted columns u * E[:, key];
    gram [H, t, t] = design^T design; w [H, t] current weights;
    taken [H, T] keys ever selected (a dropped key is not selected again).
    """

    slots: Tensor
    design: Tensor
    gram: Tensor
    w: Tensor
    taken: Tensor

    @property
    def filled(self) -> Tensor:
        return (self.slots >= 0).sum(dim=1)


@dataclass
class AMOmp(AttentionMatching):
    """Greedy selection: repeatedly add the keys that best explain the remaining mass, then fit.

    The residual of the weighted mass system is r = z - M w; each step adds the
    ``keys_per_step`` unselected keys with the largest sum_i u_i E_ij r_i and refits w.
    When the budget is full, keys whose beta fell below ``drop_beta`` carry no mass: they are
    dropped and the freed slots refilled (``drop_rounds`` times at most). Slower than
    ``am-highest`` (one refit per step) and better at high compaction ratios.
    Zweiger et al., arXiv 2602.16284.

    Args:
        keys_per_step: keys added between refits; None adds ceil(budget / 32) per head, so a
            selection costs about 32 refits whatever the budget (one key per step is best
            but slowest; quality drops once a step adds more than ~1/16 of the budget).
        drop_beta: beta below which a kept key is replaced.
        drop_rounds: drop-and-refill rounds after the first fill.
    """

    beta_min: float = -12.0  # below drop_beta, so useless keys show up and get replaced
    beta_max: float = 7.0
    keys_per_step: int | None = None
    drop_beta: float = -7.0
    drop_rounds: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keys_per_step is not None and self.keys_per_step < 1:
            raise ValueError(f"keys_per_step must be >= 1, got {self.keys_per_step}")

    def select(self, problem: Problem) -> Tensor:
        weights = problem.weights
        h, n, length = weights.shape
        t = int(problem.budgets.max())
        u, z = mass_rows(problem, self.mass_weighting)
        # Copies and masked-out keys are used only once nothing else is left.
        avoid = problem.duplicates | (problem.bias == -math.inf)
        state = _Pursuit(
            slots=torch.full((h, t), -1, dtype=torch.long, device=weights.device),
            design=weights.new_zeros(h, n, t),
            gram=weights.new_zeros(h, t, t),
            w=weights.new_ones(h, t),
            taken=torch.zeros(h, length, dtype=torch.bool, device=weights.device),
        )
        self._fill(problem, state, u, z, avoid)
        for _ in range(self.drop_rounds):
            if not self._drop(state, avoid):
                break
            self._refit(state, z)
            self._fill(problem, state, u, z, avoid)
        return sort_padded(state.slots, state.slots >= 0)

    def _refit(self, state: _Pursuit, z: Tensor) -> None:
        state.w = solve_mass(
            state.design,
            state.gram,
            z - state.design.sum(dim=-1),
            state.filled,
            beta_min=self.beta_min,
            beta_max=self.beta_max,
            ridge=self.mass_ridge,
            steps=self.mass_steps,
        )

    def _fill(self, problem: Problem, state: _Pursuit, u: Tensor, z: Tensor, avoid: Tensor) -> None:
        """Add keys until every head holds its budget."""
        weights = problem.weights
        n, t = state.design.shape[1:]
        # Per-head step sizes keep each head's sequence of additions what it would be alone.
        if self.keys_per_step is None:
            per_step = (problem.budgets + 31) // 32
        else:
            per_step = torch.full_like(problem.budgets, self.keys_per_step)
        while True:
            quota = torch.minimum(problem.budgets - state.filled, per_step)
            k = int(quota.max())
            if k == 0:
                return
            residual = z - torch.bmm(state.design, state.w[..., None]).squeeze(-1)
            corr = torch.bmm((u * residual)[:, None, :], weights).squeeze(1)
            corr = corr.masked_fill(avoid, -torch.finfo(corr.dtype).max)
            cand = corr.masked_fill(state.taken, -math.inf).topk(k, dim=1).indices
            take = torch.arange(k, device=quota.device) < quota[:, None]
            pos = (state.slots >= 0).int().argsort(dim=1, stable=True)[:, :k]  # free slots first
            # Slots past a head's quota are rewritten with their own content (a no-op).
            new = torch.where(take, cand, state.slots.gather(1, pos))
            state.slots.scatter_(1, pos, new)
            cols = gather_columns(weights, new).mul_(u[..., None])
            state.design.scatter_(2, pos[:, None, :].expand(-1, n, -1), cols)
            cross = torch.bmm(state.design.transpose(1, 2), cols)
            state.gram.scatter_(2, pos[:, None, :].expand(-1, t, -1), cross)
            state.gram.scatter_(1, pos[:, :, None].expand(-1, -1, t), cross.transpose(1, 2))
            state.taken |= torch.zeros_like(state.taken).scatter_(1, cand, take)
            self._refit(state, z)

    def _drop(self, state: _Pursuit, avoid: Tensor) -> bool:
        """Free slots of keys with beta < drop_beta, lowest first, as many as can be refilled."""
        beta = state.w.log()
        low = (state.slots >= 0) & (beta < self.drop_beta)
        count = torch.minimum(low.sum(dim=1), (~state.taken & ~avoid).sum(dim=1))
        if int(count.max()) == 0:
            return False
        order = beta.masked_fill(~low, math.inf).argsort(dim=1)
        slot = torch.arange(order.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, slot)
        drop = low & (rank < count[:, None])
        state.slots.masked_fill_(drop, -1)
        state.design.masked_fill_(drop[:, None, :], 0.0)
        state.gram.masked_fill_(drop[:, None, :] | drop[:, :, None], 0.0)
        return True
