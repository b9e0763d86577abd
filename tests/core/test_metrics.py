"""The error metrics measure what they claim."""

from __future__ import annotations

import math

import torch

from vllm_compaction.core import compact_layer, compaction_errors
from vllm_compaction.core.metrics import log_mass, relative_error


def test_relative_error_and_log_mass() -> None:
    approx, exact = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 5.0])
    assert math.isclose(relative_error(approx, exact), math.sqrt(9 + 1) / 5, rel_tol=1e-6)
    keys, queries = torch.zeros(1, 3, 2), torch.ones(1, 1, 2)
    assert math.isclose(float(log_mass(queries, keys)[0, 0]), math.log(3), rel_tol=1e-6)
    bias = torch.tensor([[0.0, math.log(2), -math.inf]])
    assert math.isclose(float(log_mass(queries, keys, bias)[0, 0]), math.log(3), rel_tol=1e-6)


def test_errors_of_identity_loss_and_later_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 40, 8, generator=gen), torch.randn(2, 40, 8, generator=gen)
    queries = torch.randn(2, 30, 8, generator=gen)
    later_k, later_v = torch.zeros(2, 400, 8), torch.ones(2, 400, 8)

    whole = compact_layer(keys, values, queries, 40, method="recent")
    errors = compaction_errors(
        queries, keys, values, whole, later_keys=later_k, later_values=later_v
    )
    assert errors.output < 1e-6 and errors.log_mass < 1e-6

    half = compact_layer(keys, values, queries, 20, method="recent")
    alone = compaction_errors(queries, keys, values, half)
    assert alone.output > 0.1
    # Dropping half the keys loses about log 2 of mass per query.
    assert 0.3 < alone.log_mass < 2.0
    # Many later tokens hold most of the mass, so the block's error is diluted.
    later = compaction_errors(queries, keys, values, half, later_keys=later_k, later_values=later_v)
    assert later.output < alone.output / 3
    assert later.log_mass == alone.log_mass  # the mass error is the block's own
