"""The real vLLM engine in the test process (no engine subprocess), and greedy references."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# In-process engine core: the worker (and its KV cache) is reachable from the test.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_PLUGINS", "compaction")


def in_process_llm(model: Path, **overrides):
    from vllm import LLM

    kwargs = dict(
        model=str(model),
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
        distributed_executor_backend="uni",
        seed=0,
    )
    return LLM(**{**kwargs, **overrides})


@torch.inference_mode()
def transformers_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding with a KV cache and no stopping rule (like vLLM's ignore_eos)."""
    ids = torch.tensor([prompt_ids])
    out = model(ids, use_cache=True)
    generated: list[int] = []
    for _ in range(max_tokens):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return generated
