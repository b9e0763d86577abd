"""The worker's side of extending a handle, on synthetic rows: what the fit is given and how the
new handle is laid out (the served behaviour is in test_extending.py)."""

from __future__ import annotations

import math

import torch

from vllm_compaction.engine import worker
from vllm_compaction.engine.rope import shift_positions
from vllm_compaction.engine.state import Capture, Handle

BLOCK = 32
QUERY_HEADS, KV_HEADS, DIM = 4, 2, 64
SLOTS, ROWS, NEW, BUDGET = 64, 50, 40, 8  # previous handle: 50 rows padded to 64 slots


def _rotary():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        return get_rope(DIM, 4096, rope_parameters={"rope_theta": 1e4, "rope_type": "default"})


def test_an_extension_keeps_the_previous_rows_and_weighs_queries_by_their_mass(monkeypatch):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    bias = randn(KV_HEADS, SLOTS).clamp(-3, 3)
    bias[:, ROWS:] = -math.inf
    previous = Handle([randn(KV_HEADS, SLOTS, DIM)], [randn(KV_HEADS, SLOTS, DIM)], [bias])
    q, k, v = randn(NEW, QUERY_HEADS, DIM), randn(NEW, KV_HEADS, DIM), randn(NEW, KV_HEADS, DIM)
    # Prefilled after the previous handle's slots: positions SLOTS .. SLOTS + NEW - 1.
    capture = Capture(NEW, 0, NEW, offset=SLOTS)
    capture.record(0, torch.arange(SLOTS, SLOTS + NEW), q, k, v)

    given = {}
    compact_cache = worker.compact_cache

    def spy(*args, **kwargs):
        given.update(kwargs)
        return compact_cache(*args, **kwargs)

    monkeypatch.setattr(worker, "compact_cache", spy)
    options = {"budget": BUDGET, "causal": True, "previous": "p", "previous_rows": ROWS}
    rotary = _rotary()
    handle, reply = worker._compacted_handle(
        capture, options, BLOCK, rotary, worker._rows(previous, ROWS)
    )

    # Every query comes after every previous row: its mass there is a plain log-sum-exp.
    group = QUERY_HEADS // KV_HEADS
    keys = previous.keys[0][:, :ROWS].repeat_interleave(group, dim=0)
    scores = torch.einsum("nhd,htd->hnt", q, keys) / math.sqrt(DIM)
    scores += bias[:, :ROWS].repeat_interleave(group, dim=0)[:, None]
    expected = scores.logsumexp(dim=-1).reshape(KV_HEADS, group * NEW)
    torch.testing.assert_close(given["outside_lse"][0], expected, atol=1e-5, rtol=0)

    # The new handle: the previous rows (padding dropped), the new ones, then padding; every
    # key moved by the same amount so that later tokens start at the new slot count.
    slots = math.ceil((ROWS + BUDGET) / BLOCK) * BLOCK
    assert reply["slots"] == handle.slots == slots
    delta = slots - SLOTS - NEW
    torch.testing.assert_close(
        handle.keys[0][:, :ROWS], shift_positions(previous.keys[0][:, :ROWS], delta, rotary)
    )
    assert torch.equal(handle.values[0][:, :ROWS], previous.values[0][:, :ROWS])
    assert torch.equal(handle.bias[0][:, :ROWS], bias[:, :ROWS])
    assert handle.bias[0][:, ROWS : ROWS + BUDGET].isfinite().all()
    assert (handle.bias[0][:, ROWS + BUDGET :] == -math.inf).all()
