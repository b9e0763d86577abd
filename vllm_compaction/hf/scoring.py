"""Score tokens that follow a (compacted) cache: the transformers reference of serving."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel

from .attention import ATTN_IMPLEMENTATION, PrefixLayer, attention_implementation


@torch.inference_mode()
def continuation_logits(
    model: PreTrainedModel,
    prefix: Sequence[PrefixLayer] | None,
    context_len: int,
    continuation_ids: Tensor,
) -> Tensor:
    """Logits [L, vocab] (fp32) of continuation_ids [L] read after a per-layer compact cache.

    The continuation sits at its original positions context_len .. context_len + L - 1 and is
    causal over itself; each layer's prefix is attended with its bias added to the logits.
    With prefix = the full cache and zero bias this is the model's forward over context +
    continuation; with prefix None (and context_len 0) it is the model's plain forward.
    """
    if prefix is not None and len(prefix) != model.config.num_hidden_layers:
        raise ValueError(f"{len(prefix)} prefix layers for {model.config.num_hidden_layers}")
    length = continuation_ids.shape[0]
    positions = torch.arange(context_len, context_len + length, device=model.device)
    with attention_implementation(model, ATTN_IMPLEMENTATION):
        out = model(
            input_ids=continuation_ids[None].to(model.device),
            position_ids=positions[None],
            use_cache=False,
            compaction_prefix=prefix,
        )
    return out.logits[0].float()


def next_token_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """[L - 1] log p(ids[j + 1] | ..., ids[j]) from logits [L, vocab] of ids [L]."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    return logprobs.gather(1, ids[1:, None].to(logits.device)).squeeze(1)


def score_with_compacted(
    model: PreTrainedModel,
    prefix: Sequence[PrefixLayer] | None,
    context_len: int,
    continuation_ids: Tensor,
) -> Tensor:
    """[L - 1] log-probabilities of continuation_ids[1:] after the compact cache `prefix`.

    The first continuation token has no score: its logit comes from the last context token,
    which a compact cache no longer runs.
    """
    logits = continuation_logits(model, prefix, context_len, continuation_ids)
    return next_token_logprobs(logits, continuation_ids)
