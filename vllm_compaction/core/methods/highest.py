"""Attention Matching with highest-attention selection (the default method)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..problem import Problem
from .base import AttentionMatching, ScoreMethod


@dataclass
class AMHighest(AttentionMatching, ScoreMethod):
    """Keep the keys with the highest RMS softmax weight over the reference queries, then fit.

    score_j = sqrt(mean_i A_ij^2). Exact copies of a key share its score; only the first copy
    can be kept (unless the budget exceeds the distinct keys), since beta = log(count) on one
    copy reproduces them all. Zweiger et al., "Fast KV Compaction via Attention Matching"
    (arXiv 2602.16284).
    """

    def score(self, problem: Problem) -> Tensor:
        return problem.rms_attention().masked_fill(problem.duplicates, -math.inf)
