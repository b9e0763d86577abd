"""The Attention Matching fit shared by every selection: mass weights beta, then values C2."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .attention import exp_, exp_shifted_, safe_reciprocal
from .indexing import gather_rows
from .linalg import ridge_solve, top_eigenvalue
from .problem import Problem


def mass_rows(problem: Problem, weighting: float) -> tuple[Tensor, Tensor]:
    """Row weights u [H, n] and weighted targets z = u * y [H, n] of the mass system.

    u = Y^-weighting, Y the query's whole attention mass (y plus what it spends outside the
    problem): 0 fits absolute mass (queries with diffuse attention dominate), 1 fits the mass
    error relative to everything the query sees, so a query whose attention mostly goes to
    sinks or later tokens barely counts. Queries that see no key get u = 0.
    """
    u = problem.inverse_total.pow(float(weighting)).masked_fill_(problem.mass == 0, 0.0)
    return u, u * problem.mass


def normal_equations(
    problem: Problem,
    indices: Tensor,
    design: Tensor,
    targets: Tensor | None = None,
    kept: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """X^T X [H, t, t] and, given targets Y [H, n, k] and kept values V [H, t, k], X^T (Y - X V)
    [H, t, k] (else None), for a design X [H, n, t] over the kept keys ``indices``.

    Summed over ``problem.kept_blocks``, each block of rows only over the columns it can
    see (X is zero past them): the fits' time is mostly these products.
    """
    heads, _, t = design.shape
    gram = design.new_zeros(heads, t, t)
    product = None if targets is None else design.new_zeros(heads, t, targets.shape[-1])
    for rows, reach in problem.kept_blocks(indices):
        block = design[:, rows, :reach]
        gram[:, :reach, :reach].baddbmm_(block.transpose(1, 2), block)
        if product is not None:
            residual = torch.baddbmm(targets[:, rows], block, kept[:, :reach], alpha=-1.0)
            product[:, :reach].baddbmm_(block.transpose(1, 2), residual)
    return gram, product


def solve_mass(
    design: Tensor,
    gram: Tensor,
    residual: Tensor,
    lengths: Tensor,
    *,
    beta_min: float,
    beta_max: float,
    ridge: float,
    steps: int,
) -> Tensor:
    """Non-negative least squares for w = exp(beta): min ||M w - z||, w >= 0.

    design: M [H, n, t] (weighted columns, zero on padding); gram: [H, t, t] = M^T M;
    residual: [H, n] z - M 1, the weighted mass the kept keys miss as they are (formed by
    the caller in query space, where it is accurate); lengths: [H] real columns per head.
    Solves for the deviation from keeping the originals (w = 1 + delta): directions the
    queries do not determine stay at w = 1 instead of drifting to a bound. Then clamps into
    [exp(beta_min), exp(beta_max)] and runs ``steps`` projected-gradient steps (step 1/L,
    L = top eigenvalue of M^T M). Returns w [H, t] (1 on padding slots).
    """
    # M^T r as r^T M: reads M row by row, many times faster than through its transpose.
    rhs = torch.bmm(residual[:, None, :], design).squeeze(1)
    delta = ridge_solve(gram, rhs[..., None], lengths, ridge).squeeze(-1)
    lo, hi = math.exp(beta_min), math.exp(beta_max)
    w = (1.0 + delta).clamp(lo, hi)
    step = safe_reciprocal(top_eigenvalue(gram))[:, None]
    for _ in range(steps):
        # Gradient of 0.5 ||M w - z||^2 written around w = 1: G (w - 1) - M^T (z - M 1).
        grad = torch.bmm(gram, (w - 1.0)[..., None]).squeeze(-1) - rhs
        w = (w - step * grad).clamp(lo, hi)
    return w


def fit_beta(
    problem: Problem,
    indices: Tensor,
    selected: Tensor,
    *,
    weighting: float,
    beta_min: float,
    beta_max: float,
    ridge: float,
    steps: int,
) -> Tensor:
    """Mass correction beta [H, t] for the kept keys ``indices`` [H, t] (-1 = padding, beta 0).

    selected: [H, n, t] logits of the kept keys, ``problem.logits(indices)`` (-inf on
    padding). The correction is added on top of any bias the keys already carry.
    """
    u = mass_rows(problem, weighting)[0]
    # The kept columns of E (0 on padding), formed from their logits, not kept from the pass.
    design = exp_(selected - problem.shift[..., None])
    # Unweighted first: with every key kept the residual is then (up to rounding) zero.
    residual = u * (problem.mass - design.sum(dim=-1))
    design.mul_(u[..., None])
    gram = normal_equations(problem, indices, design)[0]
    lengths = (indices >= 0).sum(dim=1)
    w = solve_mass(
        design,
        gram,
        residual,
        lengths,
        beta_min=beta_min,
        beta_max=beta_max,
        ridge=ridge,
        steps=steps,
    )
    return w.log_().masked_fill_(indices < 0, 0.0)


def fit_values(
    problem: Problem,
    indices: Tensor,
    selected: Tensor,
    beta: Tensor,
    *,
    ridge: float,
    share_weighting: float,
) -> Tensor:
    """Compact values C2 [H, t, d_v] (fp32) matching softmax(S) V on the reference queries.

    indices: [H, t] kept keys (-1 = padding); selected: [H, n, t] their logits (as for
    ``fit_beta``); beta: [H, t] mass correction on top of the keys' existing bias. Design
    X = softmax over the compact keys only, causally masked by their original positions;
    queries that see no compact key are dropped. Row i is weighted by share_i^share_weighting
    (``Problem.share``): an error in the block's output moves the query's output by share_i
    times as much. Fits the deviation from the original values with a relative ridge,
    C2 = V_sel + D, because an unregularised fit can blow values up and hurt unseen queries.
    """
    design, total, _ = exp_shifted_(selected + beta[:, None, :])
    rows = safe_reciprocal(total)
    targets = problem.targets
    if share_weighting and problem.outside is not None:  # else every share is 1
        weight = problem.share.pow(float(share_weighting))
        rows, targets = rows * weight, targets * weight[..., None]
    design.mul_(rows[..., None])
    kept = gather_rows(problem.values.float(), indices)
    # A query that sees no compact key has an all-zero design row and drops out of X^T R.
    gram, product = normal_equations(problem, indices, design, targets, kept)
    lengths = (indices >= 0).sum(dim=1)
    return kept + ridge_solve(gram, product, lengths, ridge)
