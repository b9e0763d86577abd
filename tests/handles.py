"""What tests read of a served handle: its stored tensors, a greedy completion on it, and
transformers' logprobs of that completion after the handle's rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.server import TINY
from vllm_compaction import hf, store

GENERATED = 8


def stored(folder: Path, handle_id: str) -> dict[str, list[torch.Tensor]]:
    """The handle's tensors as the server stored them (one worker) under folder/handles."""
    path = folder / "handles" / handle_id
    (entry,) = store.read_manifest(path)["files"]
    return store.load_layers(path / entry["file"], entry["sha256"])


def greedy(client: Any, prompt: Any, handle_id: str | None = None) -> Any:
    """Logprobs (top 5, tokens as ids) of a short greedy completion of the tiny model, on
    `handle_id` when given (an `openai` client)."""
    extra: dict[str, Any] = {"return_tokens_as_token_ids": True}
    if handle_id:
        extra["compaction"] = handle_id
    out = client.completions.create(
        model=TINY,
        prompt=prompt,
        max_tokens=GENERATED,
        temperature=0,
        logprobs=5,
        extra_body=extra,
    )
    return out.choices[0].logprobs


def token_ids(logprobs: Any) -> list[int]:
    return [int(token.removeprefix("token_id:")) for token in logprobs.tokens]


def reference_logprobs(
    model: Any, prefix: list[hf.Prefix], slots: int, prompt: list[int], served: Any
) -> torch.Tensor:
    """Transformers' logprobs of the served tokens after `prefix` (per layer keys, bias,
    values per KV head), the prompt at positions slots, slots + 1, ..."""
    generated = token_ids(served)
    ids = torch.tensor(prompt + generated)
    logprobs = torch.log_softmax(hf.continuation_logits(model, prefix, slots, ids), dim=-1)
    steps = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(generated))
    return logprobs[steps, torch.tensor(generated)]
