"""The blocked statistics of a Problem equal their plain dense definitions."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_compaction.core import problem as problem_module
from vllm_compaction.core.fit import normal_equations
from vllm_compaction.core.problem import Problem, _row_hash
from vllm_compaction.kernels import cpu

# Not a multiple of 8 or 16: the native pass pads its score rows to whole vectors.
LENGTH = 45
# More than one slab of the native pass (256 queries): its partial key sums are added up.
QUERIES = 300


def _layer(positions: str, biased: bool, seed: int = 0) -> Problem:
    """Keys with or without bias (some -inf); queries without positions or with positions
    shuffled or sorted, the first ones seeing no key at all (a whole block of them), and some
    mass outside (none for a few queries). Head size 16: the native pass applies."""
    gen = torch.Generator().manual_seed(seed)
    heads, length, n, dim = 2, LENGTH, QUERIES, 16
    bias = torch.zeros(heads, length)
    if biased:
        bias = torch.randn(heads, length, generator=gen)
        bias[0, 5] = bias[1, :3] = -math.inf
    where = None
    if positions != "none":
        where = torch.randint(-1, length, (heads, n), generator=gen)
        if positions == "sorted":
            where = where.sort(dim=1).values
        where[:, :8] = -1
    outside = 3 * torch.randn(heads, n, generator=gen)
    outside[:, 40:45] = -math.inf
    return Problem(
        keys=torch.randn(heads, length, dim, generator=gen),
        values=torch.randn(heads, length, dim, generator=gen),
        queries=torch.randn(heads, n, dim, generator=gen),
        bias=bias,
        query_positions=where,
        budgets=torch.full((heads,), 10),
        scale=0.6,
        outside=outside,
    )


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("positions", ["none", "shuffled", "sorted"])
def test_blocked_statistics_match_dense_definitions(
    positions: str, biased: bool, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    problem = _layer(positions, biased)
    causal = positions != "none"
    # Tiny blocks: many row blocks, each with its own count of visible keys.
    monkeypatch.setattr(problem_module, "_BLOCK_ROWS", 7)
    monkeypatch.setattr(problem_module, "_KEPT_ROWS", 7)
    if native:
        # Set-up builds the kernels: a missing build is a failure here, not a quiet fallback.
        assert cpu.load() is not None
        assert problem._native_statistics() is not None
    else:
        monkeypatch.setattr(Problem, "_native_statistics", lambda self: None)

    scores = problem.scale * problem.queries.double() @ problem.keys.double().transpose(1, 2)
    scores = scores + problem.bias.double()[:, None, :]
    if causal:
        future = torch.arange(LENGTH)[None, None, :] > problem.query_positions[:, :, None]
        scores = scores.masked_fill(future, -math.inf)
    sees = torch.isfinite(scores).any(dim=-1)
    shift = torch.where(sees, scores.amax(dim=-1), 0.0)
    weights = (scores - shift[..., None]).exp()
    mass = weights.sum(dim=-1)
    targets = (weights / mass.clamp_min(1e-300)[..., None]) @ problem.values.double()
    # Softmax weights over everything a query sees: these keys and the mass outside.
    total = mass + (problem.outside.double() - shift).exp()
    attn = torch.where(sees[..., None], weights / total[..., None], 0.0)
    count = sees.sum(dim=1, keepdim=True)
    rms = (attn.square().sum(dim=1) / count).sqrt()

    assert causal == bool((~sees).any())
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(problem.shift, shift.float(), **close)
    torch.testing.assert_close(problem.mass, mass.float(), **close)
    inverse_total = torch.where(sees, 1 / total, 0.0)
    torch.testing.assert_close(problem.inverse_total, inverse_total.float(), **close)
    torch.testing.assert_close(problem.targets, targets.float(), **close)
    torch.testing.assert_close(problem.rms_attention(), rms.float(), **close)
    torch.testing.assert_close(problem.weights, weights.float(), **close)
    torch.testing.assert_close(problem.mean_attention(), (attn.sum(1) / count).float(), **close)

    # The fits form the kept columns of E from their logits; padding slots (-1) give 0.
    indices = torch.tensor([[3, 9, 17, 30, 39], [0, 12, 25, -1, -1]])
    columns = (problem.logits(indices) - problem.shift[..., None]).exp()
    expected = weights.gather(2, indices.clamp(min=0)[:, None, :].expand(-1, QUERIES, -1))
    expected = expected.masked_fill(indices[:, None, :] < 0, 0.0)
    torch.testing.assert_close(columns, expected.float(), **close)


@pytest.mark.parametrize("positions", ["none", "shuffled", "sorted"])
def test_kept_blocks_normal_equations_match_dense_products(
    positions: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fits' products summed over row blocks, each over the kept columns it reaches,
    equal the dense ones: no column a block's queries see is left out."""
    problem = _layer(positions, biased=True)
    monkeypatch.setattr(problem_module, "_KEPT_ROWS", 7)
    indices = torch.tensor([[3, 9, 17, 30, 39], [0, 12, 25, 44, -1]])
    blocks = problem.kept_blocks(indices)
    if positions == "sorted":  # the early blocks reach fewer columns
        assert min(reach for _, reach in blocks) < max(reach for _, reach in blocks)
    design = (problem.logits(indices) - problem.shift[..., None]).exp()
    kept = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2))
    targets = torch.randn(2, QUERIES, 3, generator=torch.Generator().manual_seed(3))
    gram, product = normal_equations(problem, indices, design, targets, kept)
    x = design.double()
    torch.testing.assert_close(gram, (x.mT @ x).float(), rtol=1e-5, atol=1e-5)
    expected = x.mT @ (targets.double() - x @ kept.double())
    torch.testing.assert_close(product, expected.float(), rtol=1e-5, atol=1e-5)


def test_native_statistics_do_not_depend_on_the_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            native = _layer("shuffled", biased=True)._native_statistics()
            assert native is not None
            outputs.append(native)
    finally:
        torch.set_num_threads(threads)
    for other in outputs[1:]:
        for a, b in zip(vars(outputs[0]).values(), vars(other).values(), strict=True):
            assert torch.equal(a, b)


def test_duplicates_match_unique_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 30, 6, generator=gen)
    keys[0, 7] = keys[0, 2]
    keys[0, 20] = keys[0, 2]
    keys[1, 9] = keys[0, 4]  # the same row in another head is no copy
    keys[1, 11] = keys[1, 25]  # the later position is the copy, the earlier is kept
    keys[1, 3] = 0.0
    keys[1, 14] = -0.0  # equal as floats
    # A row whose hash equals row 5's without being equal: only a real copy may be dropped.
    gen = torch.Generator().manual_seed(0)
    mix = torch.randint(1, 1 << 20, (6,), generator=gen)
    bits = keys[0, 5].view(torch.int32).clone()
    bits[0] += int(mix[1])
    bits[1] -= int(mix[0])
    keys[0, 16] = bits.view(torch.float32)
    hashed = _row_hash(keys)
    assert hashed[0, 16] == hashed[0, 5] and not torch.equal(keys[0, 16], keys[0, 5])

    problem = Problem(
        keys=keys,
        values=keys,
        queries=keys,
        bias=torch.zeros(2, 30),
        query_positions=None,
        budgets=torch.full((2,), 10),
        scale=1.0,
    )
    expected = torch.zeros(2, 30, dtype=torch.bool)
    expected[0, [7, 20]] = expected[1, [25, 14]] = True
    assert torch.equal(problem.duplicates, expected)
