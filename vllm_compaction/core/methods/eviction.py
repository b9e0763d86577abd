"""Eviction baselines: select keys, keep them verbatim (beta = 0, values copied)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..indexing import sort_padded
from ..problem import Problem
from .base import Method, ScoreMethod


@dataclass
class Recent(ScoreMethod):
    """Keep the last t keys (a sliding window)."""

    def score(self, problem: Problem) -> Tensor:
        h, t, _ = problem.keys.shape
        return torch.arange(t, dtype=torch.float32, device=problem.keys.device).expand(h, -1)


@dataclass
class Strided(Method):
    """Keep t evenly spaced keys: the centre of each of t equal segments."""

    def select(self, problem: Problem) -> Tensor:
        length = problem.keys.shape[1]
        budgets = problem.budgets[:, None]
        slot = torch.arange(int(budgets.max()), device=budgets.device)
        picked = ((slot + 0.5) * length / budgets).long().clamp(max=length - 1)
        return sort_padded(picked, slot < budgets)


@dataclass
class H2O(ScoreMethod):
    """Keep the keys with the highest mean softmax weight over the queries.

    Zhang et al., "H2O: Heavy-Hitter Oracle" (arXiv 2306.14048).
    """

    def score(self, problem: Problem) -> Tensor:
        return problem.mean_attention()


@dataclass
class SnapKV(ScoreMethod):
    """Mean softmax weight of the last ``window`` queries, max-pooled over ``kernel`` neighbours.

    Li et al., "SnapKV" (arXiv 2404.14469). "Last" is the order of the query tensor.

    Args:
        window: number of trailing queries that vote.
        kernel: odd width of the max-pool over neighbouring keys (keeps local context whole).
    """

    window: int = 32
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv needs window >= 1 and an odd kernel, got {self}")

    def score(self, problem: Problem) -> Tensor:
        votes = problem.mean_attention(slice(-self.window, None))[:, None, :]
        pooled = F.max_pool1d(votes, self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.squeeze(1)


@dataclass
class KVzip(ScoreMethod):
    """Keep the keys with the highest RMS softmax weight, without any fit.

    Kim et al., "KVzip" (arXiv 2505.23416); here with per-head budgets.
    """

    def score(self, problem: Problem) -> Tensor:
        return problem.rms_attention()


@dataclass
class Random(ScoreMethod):
    """Keep a uniformly random subset of keys (seeded by ``seed``)."""

    def score(self, problem: Problem) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(problem.bias.shape, generator=gen).to(problem.bias.device)
