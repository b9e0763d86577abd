"""Attention Matching Triton kernels against their torch references and against core.

The kernels run under Triton's interpreter on CPU tensors (no GPU here). Shapes are small but
always span several [16, 16] tiles, so the tiling, masking and tile skipping are exercised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from tests.kernels.triton_ir import run_lowering
from vllm_compaction.core import fit as fit_module
from vllm_compaction.core.methods import AMHighest
from vllm_compaction.core.problem import Problem
from vllm_compaction.kernels import compaction
from vllm_compaction.kernels.compaction import Products, Statistics

BLOCKS = (16, 16)
# Max error relative to the largest reference entry (plus the same relative error
# elementwise). Measured: <= 1.2e-6 for fp32 and bf16 alike, since bf16 inputs are upcast
# exactly and every product runs in fp32 in the kernels as in the references; only the
# summation order differs. 1e-5 leaves room for other shapes, and a 1e-4 relative change of
# the scale already breaks it (test_tolerance_detects_a_wrong_scale).
TOLERANCE = 1e-5


@dataclass(frozen=True)
class Case:
    """A layer: ``heads`` KV heads, each pooling ``group`` query heads of ``tokens`` queries."""

    group: int
    tokens: int
    length: int
    dim: int
    dtype: torch.dtype
    bias: bool
    causal: bool
    heads: int = 2
    weighting: float = 0.5

    @property
    def kept(self) -> int:
        return max(2, self.length // 2)

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        flags = ("bias-inf" if self.bias else "") + ("causal" if self.causal else "")
        return f"g{self.group}-T{self.length}-d{self.dim}-{dtype}-{flags or 'plain'}"


# Pairwise cover: every group 1..8; T below one tile (5, 11), odd and not a multiple of the
# tile (21..37, 33 = 2 tiles + 1), a multiple (48); each dtype with d = 64 and 128 and with
# every bias x causal combination.
CASES = [
    Case(1, 12, 5, 64, torch.float32, bias=False, causal=False),
    Case(2, 7, 37, 128, torch.bfloat16, bias=True, causal=True),
    Case(3, 5, 48, 64, torch.bfloat16, bias=False, causal=True, weighting=1.0),
    Case(4, 4, 33, 128, torch.float32, bias=True, causal=False, heads=3),
    Case(5, 3, 21, 64, torch.float32, bias=True, causal=True, weighting=0.0),
    Case(6, 3, 11, 128, torch.bfloat16, bias=False, causal=False),
    Case(7, 2, 50, 128, torch.float32, bias=False, causal=True),
    Case(8, 2, 27, 64, torch.bfloat16, bias=True, causal=False),
]


@dataclass(frozen=True)
class Layer:
    """Inputs of one case, the kept keys of a compaction and a fitted beta on them."""

    queries: Tensor
    keys: Tensor
    values: Tensor
    bias: Tensor | None
    positions: Tensor | None
    indices: Tensor
    beta: Tensor
    scale: float


@cache
def _layer(case: Case) -> Layer:
    gen = torch.Generator().manual_seed(case.group)
    heads, length, n = case.heads, case.length, case.group * case.tokens
    keys = torch.randn(heads, length, case.dim, generator=gen)
    # Larger queries give peaked attention, so masses and scores spread over orders of magnitude.
    queries = 2 * torch.randn(heads, n, case.dim, generator=gen)
    # d_v = 40 or 104, not a power of two: the value tiles are masked.
    values = torch.randn(heads, length, case.dim - 24, generator=gen)
    bias = None
    if case.bias:
        bias = torch.randn(heads, length, generator=gen)
        bias[:, 0] = -math.inf
        bias[0, length // 2] = -math.inf
    positions = None
    if case.causal:
        # Each pooled query head has the same positions: context queries at random positions
        # in order, the last after the context (repeat-prefill: sees every key); pooled
        # head-major (odd groups) or position-major (even groups).
        own = torch.randint(1, length, (case.tokens,), generator=gen).sort().values
        own[0] = 0  # sees key 0 only: no key at all when its bias is -inf
        own[-1] = length + 3
        pooled = own.repeat(case.group) if case.group % 2 else own.repeat_interleave(case.group)
        positions = pooled.expand(heads, -1).contiguous()
    # Kept keys in random order, the last head two short (padding -1); never key 0, but head 0
    # may keep its other -inf key (an all-zero column of M and X).
    order = torch.stack([torch.randperm(length - 1, generator=gen) + 1 for _ in range(heads)])
    indices = order[:, : case.kept].clone()
    indices[-1, case.kept - 2 :] = -1
    beta = (0.5 * torch.randn(indices.shape, generator=gen)).masked_fill(indices < 0, 0.0)
    cast = case.dtype
    return Layer(
        queries.to(cast), keys.to(cast), values.to(cast), bias, positions, indices, beta, 0.125
    )


@cache
def _kernel_outputs(case: Case) -> tuple[Statistics, Products, Products]:
    """Kernel outputs, computed once per case; the products take the reference statistics."""
    x = _layer(case)
    stats = compaction.attention_statistics(
        x.queries, x.keys, x.values, x.scale, x.bias, x.positions, blocks=BLOCKS
    )
    ref = _reference_statistics(case)
    mass = compaction.mass_products(
        x.queries,
        x.keys,
        x.indices,
        ref.shift,
        ref.mass,
        x.scale,
        case.weighting,
        x.bias,
        x.positions,
        blocks=BLOCKS,
    )
    values = compaction.value_products(
        x.queries,
        x.keys,
        x.values,
        x.indices,
        x.beta,
        ref.targets,
        x.scale,
        x.bias,
        x.positions,
        blocks=BLOCKS,
    )
    return stats, mass, values


def _reference_statistics(case: Case, scale_error: float = 0.0) -> Statistics:
    x = _layer(case)
    scale = x.scale * (1 + scale_error)
    return compaction.attention_statistics_reference(
        x.queries, x.keys, x.values, scale, x.bias, x.positions
    )


def _reference_products(case: Case, scale_error: float = 0.0) -> tuple[Products, Products]:
    x, ref = _layer(case), _reference_statistics(case)
    scale = x.scale * (1 + scale_error)
    mass = compaction.mass_products_reference(
        x.queries,
        x.keys,
        x.indices,
        ref.shift,
        ref.mass,
        scale,
        case.weighting,
        x.bias,
        x.positions,
    )
    values = compaction.value_products_reference(
        x.queries, x.keys, x.values, x.indices, x.beta, ref.targets, scale, x.bias, x.positions
    )
    return mass, values


def _assert_close(actual: Tensor, expected: Tensor, name: str) -> None:
    """Entrywise |actual - expected| <= TOLERANCE (|expected| + max |expected|)."""
    assert expected.isfinite().all() and expected.abs().max() > 0, f"{name}: degenerate reference"
    scale = float(expected.abs().max())
    torch.testing.assert_close(
        actual, expected, rtol=TOLERANCE, atol=TOLERANCE * scale, msg=lambda m: f"{name}: {m}"
    )


def _fields(stats: Statistics, mass: Products, values: Products) -> dict[str, Tensor]:
    return {
        "shift": stats.shift,
        "mass": stats.mass,
        "targets": stats.targets,
        "rms": stats.rms,
        "mass gram": mass.gram,
        "mass rhs": mass.rhs,
        "value gram": values.gram,
        "value rhs": values.rhs,
    }


def test_kernels_run_under_the_interpreter() -> None:
    kernels = (compaction._rows_kernel, compaction._columns_kernel, compaction._gram_kernel)
    assert all(isinstance(kernel, InterpretedFunction) for kernel in kernels)


# Every kernel once with every flag on (bf16 inputs) and once with every flag off (fp32).
_LOWER = """
from tests.kernels.triton_ir import lower
from vllm_compaction.kernels import compaction

lowered = 0
for kernel in (compaction._rows_kernel, compaction._columns_kernel, compaction._gram_kernel):
    for on in (True, False):
        signature, constants = {}, {"PRECISION": "tf32" if on else "ieee"}
        for name, param in zip(kernel.arg_names, kernel.params):
            if param.is_constexpr:
                signature[name] = "constexpr"
                constants.setdefault(name, 64 if name.startswith("BLOCK") else on)
            elif name in ("idx_ptr", "qpos_ptr"):
                signature[name] = "*i64"
            elif name in ("q_ptr", "k_ptr", "v_ptr"):
                signature[name] = "*bf16" if on else "*fp32"
            elif name.endswith("_ptr"):
                signature[name] = "*fp32"
            else:
                signature[name] = "fp32" if name == "scale" else "i32"
        lower(kernel, signature, constants)
        lowered += 1
print(lowered)
"""


def test_kernels_lower_to_triton_ir() -> None:
    assert run_lowering(_LOWER).split() == ["6"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernels_match_the_torch_references(case: Case) -> None:
    actual = _fields(*_kernel_outputs(case))
    expected = _fields(_reference_statistics(case), *_reference_products(case))
    for name, value in expected.items():
        _assert_close(actual[name], value, name)
    stats = _kernel_outputs(case)[0]
    # The edge cases the inputs were built to contain did occur.
    assert (stats.mass == 0).any() == (case.bias and case.causal)
    assert (stats.rms == 0).any() == case.bias


@pytest.mark.parametrize("case", [CASES[3], CASES[1]], ids=str)
def test_tolerance_detects_a_wrong_scale(case: Case) -> None:
    """Every output moves out of tolerance when the scale is off by 1e-4 (relative)."""
    actual = _fields(*_kernel_outputs(case))
    wrong = _fields(_reference_statistics(case, 1e-4), *_reference_products(case, 1e-4))
    for name, value in wrong.items():
        with pytest.raises(AssertionError):
            _assert_close(actual[name], value, name)


def test_products_are_what_core_solves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Core's statistics and the normal equations AMHighest hands to ridge_solve."""
    case = CASES[1]
    x = _layer(case)
    heads, length = x.keys.shape[:2]
    problem = Problem(
        keys=x.keys,
        values=x.values,
        queries=x.queries,
        bias=x.bias,
        query_positions=x.positions,
        budgets=torch.tensor([case.kept, case.kept - 2]),
        scale=x.scale,
    )
    method = AMHighest()
    solved: list[tuple[Tensor, Tensor]] = []

    def recording(gram: Tensor, rhs: Tensor, lengths: Tensor, ridge: float) -> Tensor:
        solved.append((gram, rhs))
        return ridge_solve(gram, rhs, lengths, ridge)

    ridge_solve = fit_module.ridge_solve
    monkeypatch.setattr(fit_module, "ridge_solve", recording)
    indices = method.select(problem)
    compacted = method.build(problem, indices)
    assert len(solved) == 2  # the mass fit, then the value fit

    stats = compaction.attention_statistics(
        x.queries, x.keys, x.values, x.scale, x.bias, x.positions, blocks=BLOCKS
    )
    _assert_close(stats.shift, problem.shift, "shift")
    _assert_close(stats.mass, problem.mass, "mass")
    _assert_close(stats.targets, problem.targets, "targets")
    _assert_close(stats.rms, problem.rms_attention(), "rms")

    beta = (compacted.bias - x.bias.gather(1, indices.clamp(min=0))).masked_fill(indices < 0, 0)
    mass = compaction.mass_products(
        x.queries,
        x.keys,
        indices,
        problem.shift,
        problem.mass,
        x.scale,
        method.mass_weighting,
        x.bias,
        x.positions,
        blocks=BLOCKS,
    )
    values = compaction.value_products(
        x.queries,
        x.keys,
        x.values,
        indices,
        beta,
        problem.targets,
        x.scale,
        x.bias,
        x.positions,
        blocks=BLOCKS,
    )
    assert indices.shape == (heads, case.kept) and int(indices.max()) < length
    _assert_close(mass.gram, solved[0][0], "mass gram")
    _assert_close(mass.rhs, solved[0][1].squeeze(-1), "mass rhs")
    _assert_close(values.gram, solved[1][0], "value gram")
    _assert_close(values.rhs, solved[1][1], "value rhs")
