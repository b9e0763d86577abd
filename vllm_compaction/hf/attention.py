"""The attention function this package registers with transformers' `AttentionInterface`.

One function serves both jobs of the reference path, chosen by extra keyword arguments that
transformers forwards from `model(...)` down to every attention call:

- `compaction_prefix`: a compact cache per layer, attended before the current tokens with its
  bias beta added to the logits (the current tokens sit at their original positions);
- `compaction_recorder`: a callback that receives every layer's post-RoPE queries, keys, values.
  It runs before the layer's prefix is looked up, so a prefix may be built from the queries
  just recorded (on-policy fitting).

Without either, it is plain causal attention, so a model can keep this implementation set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel

ATTN_IMPLEMENTATION = "vllm_compaction"

# Called as recorder(layer_idx, query [Hq, L, d], key [H_kv, L, d], value [H_kv, L, d], scaling).
Recorder = Callable[[int, Tensor, Tensor, Tensor, float], None]


class PrefixLayer(Protocol):
    """A compact cache for one layer (`vllm_compaction.core.Compacted` satisfies it).

    keys [H_kv, t, d] post-RoPE at their original positions, bias [H_kv, t] added to the logits
    (-inf hides a row, e.g. padding), values [H_kv, t, d].
    """

    @property
    def keys(self) -> Tensor: ...

    @property
    def bias(self) -> Tensor: ...

    @property
    def values(self) -> Tensor: ...


@dataclass(frozen=True)
class Prefix:
    """A plain `PrefixLayer`: keys [H_kv, t, d], bias [H_kv, t], values [H_kv, t, d]."""

    keys: Tensor
    bias: Tensor
    values: Tensor


def _prefix_mask(bias: Tensor, groups: int, length: int, dtype: torch.dtype) -> Tensor:
    """Additive mask [1, Hq, L, t + L]: the prefix bias per query head, then causal over L."""
    prefix = bias.to(dtype).repeat_interleave(groups, dim=0)[:, None, :].expand(-1, length, -1)
    causal = torch.full((length, length), -math.inf, dtype=dtype, device=bias.device).triu_(1)
    causal = causal.expand(prefix.shape[0], -1, -1)
    return torch.cat([prefix, causal], dim=-1)[None]


def compaction_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    compaction_prefix: Sequence[PrefixLayer] | None = None,
    compaction_recorder: Recorder | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """Causal attention of query [1, Hq, L, d] over [prefix ; key, value [1, H_kv, L, d]].

    Returns the output [1, L, Hq, d] as transformers expects. `attention_mask` is ignored: the
    masking utilities build none for an implementation they do not know, and batches are size 1.
    """
    if query.shape[0] != 1:
        raise ValueError("the reference attention takes one sequence at a time")
    if getattr(module, "sliding_window", None):
        raise NotImplementedError("sliding-window layers are not supported by the reference path")
    layer = module.layer_idx
    if compaction_recorder is not None:
        compaction_recorder(layer, query[0], key[0], value[0], scaling)
    groups = query.shape[1] // key.shape[1]
    if compaction_prefix is None:
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
    else:
        prefix = compaction_prefix[layer]
        keys = torch.cat([prefix.keys[None].to(key.dtype), key], dim=2)
        values = torch.cat([prefix.values[None].to(value.dtype), value], dim=2)
        mask = _prefix_mask(prefix.bias, groups, query.shape[2], query.dtype)
        out = nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True
        )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, compaction_attention)


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[PreTrainedModel]:
    """Run `model` with attention implementation `name` inside the block, then restore it."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
