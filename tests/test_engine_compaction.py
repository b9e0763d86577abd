"""The real engine serves a compacted context: capture, compact on the worker, inject, attend."""

from __future__ import annotations

import gc
import threading
import time
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.compare import assert_same_greedy
from tests.engine import in_process_llm
from vllm_compaction import hf
from vllm_compaction.engine import CONNECTOR_CONFIG, WORKER_EXTENSION
from vllm_compaction.engine.params import signed
from vllm_compaction.engine.state import STATE

BLOCK = 32
GENERATED = 8


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    from vllm.config import KVTransferConfig

    engine = in_process_llm(
        tiny_llama_dir,
        block_size=BLOCK,
        worker_extension_cls=WORKER_EXTENSION,
        kv_transfer_config=KVTransferConfig(**CONNECTOR_CONFIG),
    )
    engine.collective_rpc("compaction_bind")
    yield engine
    # vLLM keeps the connector in a process-wide slot; later in-process engines have none.
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    del engine
    gc.collect()
    ensure_kv_transfer_shutdown()
    STATE.__init__()  # and our worker state, which points at this engine's runner


def _params(**kwargs):
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 0, "max_tokens": GENERATED, "logprobs": 3, **kwargs})


def _run(llm, ids, params, salt=None):
    from vllm import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=ids)
    if salt:
        prompt["cache_salt"] = salt
    return llm.generate(prompt, params, use_tqdm=False)[0]


def _compact(llm, key: str, context: list[int], budget: int) -> int:
    T = len(context)
    capture = {"capture": key, "context_len": T, "query_start": 0, "query_end": T}
    _run(llm, context, _params(max_tokens=1, extra_args=_transfer(capture)), salt=f"{key}-capture")
    llm.collective_rpc("compaction_compact", args=(key, {"budget": budget, "causal": True}))
    while not all(llm.collective_rpc("compaction_ready", args=(key,))):
        time.sleep(0.01)
    return llm.collective_rpc("compaction_finish", args=(key,))[0]["slots"]


def _transfer(params: dict) -> dict:
    return {"kv_transfer_params": signed(params)}


def _use(llm, key: str, slots: int, suffix: list[int]):
    params = _params(extra_args=_transfer({"handle": key, "slots": slots}))
    return _run(llm, [0] * slots + suffix, params, salt=key)


def _steps(output) -> tuple[list[int], list[dict[int, float]]]:
    completion = output.outputs[0]
    tops = [{t: lp.logprob for t, lp in step.items()} for step in completion.logprobs]
    return list(completion.token_ids), tops


def _sampled_logprobs(output) -> list[float]:
    completion = output.outputs[0]
    return [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)]


def test_ratio_one_equals_the_full_prompt(llm, texts):
    context, suffix = texts
    slots = _compact(llm, "cmp_full", context, budget=len(context))
    assert slots == 320 and slots != len(context)  # padded slots and a RoPE shift of +20

    used = _use(llm, "cmp_full", slots, suffix)
    assert used.num_cached_tokens == slots  # the handle's slots were injected, not computed
    full = _run(llm, context + suffix, _params())
    assert_same_greedy(*_steps(used), *_steps(full), atol=1e-4)


def test_ten_x_equals_transformers_with_additive_bias(llm, texts, tiny_llama_dir):
    context, suffix = texts
    slots = _compact(llm, "cmp_tenth", context, budget=len(context) // 10)
    assert slots == BLOCK
    handle = STATE.handles["cmp_tenth"]
    assert all(b[b.isfinite()].abs().max() > 0.01 for b in handle.bias)  # beta really non-zero

    used = _use(llm, "cmp_tenth", slots, suffix)
    generated = list(used.outputs[0].token_ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    prefix = [
        types.SimpleNamespace(keys=k.float(), bias=b, values=v.float())
        for k, b, v in zip(handle.keys, handle.bias, handle.values, strict=True)
    ]
    ids = torch.tensor(suffix + generated)
    logits = hf.continuation_logits(model, prefix, slots, ids)
    logprobs = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(suffix) - 1, len(suffix) - 1 + GENERATED)
    reference = logprobs[rows, torch.tensor(generated)]
    torch.testing.assert_close(torch.tensor(_sampled_logprobs(used)), reference, atol=1e-4, rtol=0)

    # Negative control: the same blocks attended without beta must miss the reference.
    saved = handle.bias
    handle.bias = [torch.where(b.isfinite(), 0.0, b) for b in saved]
    try:
        unbiased = _use(llm, "cmp_tenth", slots, suffix)
    finally:
        handle.bias = saved
    assert unbiased.num_cached_tokens >= slots  # same handle blocks, from the prefix cache
    gap = (torch.tensor(_sampled_logprobs(unbiased)) - reference).abs().max()
    assert gap > 1e-3 or list(unbiased.outputs[0].token_ids) != generated


def test_a_handle_request_holds_its_slots_not_the_context(llm, texts):
    context, suffix = texts
    slots = _compact(llm, "cmp_blocks", context, budget=len(context) // 10)
    first = _use(llm, "cmp_blocks", slots, suffix)
    blocks = first.kv_transfer_params["compaction"]["blocks"]
    computed = slots + len(suffix) + GENERATED - 1  # the last sampled token is never computed
    assert len(blocks) == -(-computed // BLOCK)
    assert len(blocks) < -(-(len(context) + len(suffix)) // BLOCK)

    # A second session on the handle reuses its blocks; an equal-sized handle of another
    # document gets blocks of its own.
    again = _use(llm, "cmp_blocks", slots, suffix[1:])
    assert again.num_cached_tokens == slots
    handle_blocks = blocks[: slots // BLOCK]
    assert again.kv_transfer_params["compaction"]["blocks"][: slots // BLOCK] == handle_blocks
    other_context = list(reversed(context))
    other_slots = _compact(llm, "cmp_other", other_context, budget=len(context) // 10)
    assert other_slots == slots
    other = _use(llm, "cmp_other", slots, suffix)
    assert other.num_cached_tokens == slots
    other_blocks = other.kv_transfer_params["compaction"]["blocks"][: slots // BLOCK]
    assert not set(other_blocks) & set(handle_blocks)


def test_plain_requests_report_nothing(llm, texts):
    context, suffix = texts
    assert _run(llm, context + suffix, _params()).kv_transfer_params is None


def test_unsigned_parameters_make_a_plain_request(llm, texts):
    context, suffix = texts
    slots = _compact(llm, "cmp_forged", context, budget=len(context) // 10)
    ids = [0] * slots + suffix
    plain = _run(llm, ids, _params(), salt="plain")
    unsigned = {"kv_transfer_params": {"compaction": {"handle": "cmp_forged", "slots": slots}}}
    tampered = _transfer({"handle": "cmp_forged", "slots": slots})
    tampered["kv_transfer_params"]["compaction"]["slots"] = slots - BLOCK
    capture = {"capture": "cmp_sneak", "context_len": 8, "query_start": 0, "query_end": 8}
    sneak = {"kv_transfer_params": {"compaction": capture}}
    for i, extra in enumerate((unsigned, tampered, sneak)):
        forged = _run(llm, ids, _params(extra_args=extra), salt=f"forged-{i}")
        assert forged.kv_transfer_params is None and forged.num_cached_tokens == 0
        assert _sampled_logprobs(forged) == _sampled_logprobs(plain)
    assert "cmp_sneak" not in STATE.captures


def test_a_signed_request_for_a_missing_handle_fails_alone(llm, texts):
    context, suffix = texts
    missing = _use(llm, "cmp_never_made", BLOCK, suffix)
    assert missing.outputs[0].finish_reason == "error" and not missing.outputs[0].token_ids
    assert _run(llm, context + suffix, _params()).outputs[0].token_ids  # the engine still serves


def test_cached_handle_blocks_without_the_handle_fail_rather_than_lose_beta(llm, texts):
    context, suffix = texts
    slots = _compact(llm, "cmp_spilled", context, budget=len(context) // 10)
    assert _use(llm, "cmp_spilled", slots, suffix).outputs[0].token_ids  # its blocks are cached
    llm.collective_rpc("compaction_delete", args=("cmp_spilled",))  # as a spill does
    stale = _use(llm, "cmp_spilled", slots, suffix)
    assert stale.outputs[0].finish_reason == "error" and not stale.outputs[0].token_ids


def test_the_engine_serves_other_requests_while_a_compaction_runs(llm, texts, monkeypatch):
    from vllm_compaction.engine import worker

    context, suffix = texts
    T = len(context)
    capture = {"capture": "cmp_slow", "context_len": T, "query_start": 0, "query_end": T}
    _run(llm, context, _params(max_tokens=1, extra_args=_transfer(capture)), salt="slow")
    release, compact_cache = threading.Event(), worker.compact_cache

    def held_back(*args, **kwargs):
        assert release.wait(timeout=120)
        return compact_cache(*args, **kwargs)

    # The in-process engine runs the worker here: hold its compaction until we let it go.
    monkeypatch.setattr(worker, "compact_cache", held_back)
    llm.collective_rpc("compaction_compact", args=("cmp_slow", {"budget": T // 10}))
    plain = _run(llm, context[:50] + suffix, _params())
    assert len(plain.outputs[0].token_ids) == GENERATED  # served while the compaction waits
    assert llm.collective_rpc("compaction_ready", args=("cmp_slow",)) == [False]
    release.set()
    while not all(llm.collective_rpc("compaction_ready", args=("cmp_slow",))):
        time.sleep(0.01)
    slots = llm.collective_rpc("compaction_finish", args=("cmp_slow",))[0]["slots"]
    assert _use(llm, "cmp_slow", slots, suffix).outputs[0].token_ids


def test_reclaimed_blocks_are_refilled_from_the_host_copy(llm, texts):
    context, suffix = texts
    slots = _compact(llm, "cmp_refill", context, budget=len(context) // 5)
    before = _use(llm, "cmp_refill", slots, suffix)
    assert llm.reset_prefix_cache()
    after = _use(llm, "cmp_refill", slots, suffix)
    assert after.num_cached_tokens == slots
    assert after.outputs[0].token_ids == before.outputs[0].token_ids
    assert _sampled_logprobs(after) == _sampled_logprobs(before)


def test_plain_requests_batched_with_handle_requests_stay_within_1e5(llm, texts):
    from vllm import TokensPrompt

    context, suffix = texts
    slots = _compact(llm, "cmp_batch", context, budget=len(context) // 10)
    plain_ids = context[:120] + suffix
    alone = _run(llm, plain_ids, _params())
    handle = TokensPrompt(prompt_token_ids=[0] * slots + suffix, cache_salt="cmp_batch")
    params = [_params(extra_args=_transfer({"handle": "cmp_batch", "slots": slots})), _params()]
    batched = llm.generate(
        [handle, TokensPrompt(prompt_token_ids=plain_ids)], params, use_tqdm=False
    )
    assert batched[0].kv_transfer_params is not None  # the batch really had a handle request
    # Batching changes the rounding of every matmul, not what the request computes.
    assert_same_greedy(*_steps(batched[1]), *_steps(alone), atol=1e-5)
