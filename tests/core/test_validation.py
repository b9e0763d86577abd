"""Bad input fails loudly; low precision and extreme queries stay finite."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_compaction.core import METHODS, compact_layer

H, T, D, N = 2, 32, 8, 16


def _inputs() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "keys": torch.randn(H, T, D, generator=gen),
        "values": torch.randn(H, T, D, generator=gen),
        "queries": torch.randn(H, N, D, generator=gen),
        "budget": 8,
    }


def _nan_keys(kw: dict) -> None:
    kw["keys"][0, 3, 1] = math.nan


def _inf_queries(kw: dict) -> None:
    kw["queries"][1, 0, 0] = math.inf


CASES = {
    "keys ndim": (lambda kw: kw.update(keys=kw["keys"][0]), "keys must be"),
    "values shape": (lambda kw: kw.update(values=kw["values"][:, :5]), "values"),
    "queries heads": (lambda kw: kw.update(queries=kw["queries"][:1]), "queries"),
    "queries dim": (lambda kw: kw.update(queries=kw["queries"][..., :4]), "queries"),
    "no queries": (lambda kw: kw.update(queries=kw["queries"][:, :0]), "n = 0"),
    "nan keys": (_nan_keys, "NaN or inf"),
    "inf queries": (_inf_queries, "NaN or inf"),
    "integer keys": (lambda kw: kw.update(keys=kw["keys"].long()), "floating-point"),
    "budget zero": (lambda kw: kw.update(budget=0), r"budget must be in \[1, T"),
    "budget too big": (lambda kw: kw.update(budget=T + 1), r"budget must be in \[1, T"),
    "budget float": (lambda kw: kw.update(budget=3.0), "budget must be an int"),
    "budget shape": (lambda kw: kw.update(budget=torch.tensor([4, 4, 4])), "budget tensor"),
    "budget head zero": (lambda kw: kw.update(budget=torch.tensor([4, 0])), "budget must be"),
    "unknown method": (lambda kw: kw.update(method="nope"), "known methods: am-highest"),
    "unknown option": (lambda kw: kw.update(ridge_of_doom=1), "unknown option"),
    "positions shape": (
        lambda kw: kw.update(query_positions=torch.zeros(H, N + 1, dtype=torch.long)),
        "query_positions must be",
    ),
    "positions float": (lambda kw: kw.update(query_positions=torch.zeros(H, N)), "integers"),
    "bias shape": (lambda kw: kw.update(bias=torch.zeros(H, T - 1)), "bias must be"),
    "bias nan": (lambda kw: kw.update(bias=torch.full((H, T), math.nan)), "bias must be"),
    "snapkv kernel": (lambda kw: kw.update(method="snapkv", kernel=4), "odd kernel"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises(case: str) -> None:
    mutate, message = CASES[case]
    kw = _inputs()
    mutate(kw)
    with pytest.raises(ValueError, match=message):
        compact_layer(**kw)


def test_method_list_names_every_method() -> None:
    with pytest.raises(ValueError) as err:
        compact_layer(**_inputs(), method="nope")
    assert all(name in str(err.value) for name in METHODS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["am-highest", "am-omp", "snapkv"])
@pytest.mark.parametrize("norm", [None, 1e3])
def test_low_precision_and_large_queries_stay_finite(dtype, method, norm) -> None:
    kw = _inputs()
    if norm is not None:
        q = kw["queries"]
        kw["queries"] = q / q.norm(dim=-1, keepdim=True) * norm
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out = compact_layer(**kw, method=method)
    assert out.keys.dtype == dtype and out.values.dtype == dtype
    assert out.bias.dtype == torch.float32 and out.indices.dtype == torch.long
    assert torch.isfinite(out.values).all() and torch.isfinite(out.bias).all()


def test_bias_may_hold_minus_inf() -> None:
    kw = _inputs()
    bias = torch.zeros(H, T)
    bias[:, -4:] = -math.inf  # padding rows of an earlier compaction
    out = compact_layer(**kw, bias=bias)
    assert (out.indices < T - 4).all()
    assert torch.isfinite(out.bias).all()
