"""Capture a layer-by-layer view of one forward pass: the context's keys and values, and the
queries of chosen token ranges, all post-RoPE (and post q/k-norm where the model has one)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from vllm_compaction.core import log_mass

from .attention import ATTN_IMPLEMENTATION, Prefix, attention_implementation


@dataclass(frozen=True)
class Queries:
    """Reference queries of one layer, pooled per KV head.

    Attributes:
        vectors: [H_kv, n, d]; with grouped-query attention the query heads of a group are
            pooled along n, token-major (token 0's G heads, then token 1's, ...).
        positions: [H_kv, n] long position of each query's token (for causal fits).
        outside: [H_kv, n] log attention mass of each query on the tokens after the context
            (up to its own), -inf for queries inside the context (``compact_cache``'s
            ``outside_lse``).
    """

    vectors: Tensor
    positions: Tensor
    outside: Tensor

    @staticmethod
    def cat(parts: Sequence[Queries]) -> Queries:
        """Concatenate query sets along n."""
        return Queries(
            vectors=torch.cat([p.vectors for p in parts], dim=1),
            positions=torch.cat([p.positions for p in parts], dim=1),
            outside=torch.cat([p.outside for p in parts], dim=1),
        )


@dataclass(frozen=True)
class LayerCapture:
    """One layer: keys, values [H_kv, T, d] of the context, and named query sets."""

    keys: Tensor
    values: Tensor
    queries: dict[str, Queries]

    def select(self, sources: Sequence[str]) -> Queries:
        """The named query sets, concatenated in the given order."""
        return Queries.cat([self.queries[s] for s in sources])

    def full_prefix(self) -> Prefix:
        """The uncompacted cache as a prefix (bias 0): what a compaction is compared against."""
        return Prefix(self.keys, self.keys.new_zeros(self.keys.shape[:2]), self.values)


def pool_queries(
    query: Tensor,
    key: Tensor,
    start: int,
    end: int,
    context_len: int,
    scaling: float,
) -> Queries:
    """Tokens [start, end) of query [Hq, L, d] pooled into key [H_kv, L, d]'s KV heads:
    [H_kv, m*G, d], with their mass on the keys after the first `context_len`.

    Token-major: the G query heads of a token are adjacent, so the last rows are the last tokens.
    """
    heads, _, dim = query.shape
    kv_heads = key.shape[0]
    groups = heads // kv_heads
    tokens = end - start
    grouped = query[:, start:end].reshape(kv_heads, groups, tokens, dim).transpose(1, 2)
    vectors = grouped.reshape(kv_heads, tokens * groups, dim).clone()
    positions = torch.arange(start, end, device=query.device).repeat_interleave(groups)
    positions = positions.expand(kv_heads, -1).contiguous()
    after = torch.arange(context_len, max(context_len, end), device=key.device)
    outside = log_mass(vectors, key[:, after], scaling, None, positions, after.expand(kv_heads, -1))
    return Queries(vectors=vectors, positions=positions, outside=outside)


class _Recorder:
    """Keeps, per layer, keys/values of the first `context_len` tokens and the named queries."""

    def __init__(self, context_len: int, query_ranges: Mapping[str, tuple[int, int]]) -> None:
        self.context_len = context_len
        self.query_ranges = dict(query_ranges)
        self.layers: dict[int, LayerCapture] = {}

    def __call__(
        self, layer: int, query: Tensor, key: Tensor, value: Tensor, scaling: float
    ) -> None:
        self.layers[layer] = LayerCapture(
            keys=key[:, : self.context_len].clone(),
            values=value[:, : self.context_len].clone(),
            queries={
                name: pool_queries(query, key, start, end, self.context_len, scaling)
                for name, (start, end) in self.query_ranges.items()
            },
        )


@torch.inference_mode()
def capture(
    model: PreTrainedModel,
    input_ids: Tensor,
    context_len: int,
    query_ranges: Mapping[str, tuple[int, int]],
) -> list[LayerCapture]:
    """Run `model` once over input_ids [N] (positions 0..N-1) and capture every layer.

    `context_len` tokens at the start are the cache to compact; `query_ranges` names token
    ranges [start, end) whose queries to keep, e.g. {"context": (0, T), "repeat": (T, N)}.
    """
    length = input_ids.shape[0]
    for name, (start, end) in query_ranges.items():
        if not 0 <= start < end <= length:
            raise ValueError(f"query range {name!r} = [{start}, {end}) is outside [0, {length})")
    if not 0 < context_len <= length:
        raise ValueError(f"context_len {context_len} is outside (0, {length}]")
    recorder = _Recorder(context_len, query_ranges)
    with attention_implementation(model, ATTN_IMPLEMENTATION):
        model(
            input_ids=input_ids[None].to(model.device),
            use_cache=False,
            logits_to_keep=1,  # the [N, vocab] logits would dwarf everything captured
            compaction_recorder=recorder,
        )
    return [recorder.layers[i] for i in range(len(recorder.layers))]
