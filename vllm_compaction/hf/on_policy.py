"""On-policy fitting: compact layer by layer inside one forward pass over reference tokens.

Queries captured from the full cache describe a model that reads the full cache; after
compaction, layer l sees hidden states shaped by the already compacted layers below it. Here the
reference tokens (e.g. the repeat-prefill turns) run once after the context, and each layer is
compacted from the queries it receives in that very pass, before its own attention uses the
result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import PreTrainedModel

from .attention import ATTN_IMPLEMENTATION, PrefixLayer, attention_implementation
from .capture import Queries, pool_queries

# compact(layer_idx, on-policy queries of that layer) -> the layer's compact cache
CompactFn = Callable[[int, Queries], PrefixLayer]


class _LayerByLayer:
    """Recorder and prefix sequence at once: the attention function records a layer's queries,
    then looks its prefix up, which compacts that layer from the queries just recorded."""

    def __init__(self, compact: CompactFn, context_len: int, layers: int) -> None:
        self.compact = compact
        self.context_len = context_len
        self.layers = layers
        self.queries: dict[int, Queries] = {}
        self.compacted: dict[int, PrefixLayer] = {}

    def __call__(
        self, layer: int, query: Tensor, key: Tensor, value: Tensor, scaling: float
    ) -> None:
        # Here the reference tokens are all there is: every key passed in is after the context.
        pooled = pool_queries(query, key, 0, query.shape[1], 0, scaling)
        self.queries[layer] = Queries(
            pooled.vectors, pooled.positions + self.context_len, pooled.outside
        )

    def __len__(self) -> int:
        return self.layers

    def __getitem__(self, layer: int) -> PrefixLayer:
        if layer not in self.compacted:
            self.compacted[layer] = self.compact(layer, self.queries.pop(layer))
        return self.compacted[layer]


@torch.inference_mode()
def compact_on_policy(
    model: PreTrainedModel, context_len: int, reference_ids: Tensor, compact: CompactFn
) -> list[PrefixLayer]:
    """Every layer's compact cache, fitted on the queries of reference_ids [L] (placed at
    positions context_len ..) as they arise when every lower layer is already compacted."""
    layers = model.config.num_hidden_layers
    state = _LayerByLayer(compact, context_len, layers)
    positions = torch.arange(context_len, context_len + reference_ids.shape[0])
    with attention_implementation(model, ATTN_IMPLEMENTATION):
        model(
            input_ids=reference_ids[None].to(model.device),
            position_ids=positions[None].to(model.device),
            use_cache=False,
            logits_to_keep=1,
            compaction_prefix=state,
            compaction_recorder=state,
        )
    return [state.compacted[i] for i in range(layers)]
