"""CPU attention backend that records capture requests and adds beta to compacted slots.

Every batch runs the stock kernel; the rows of requests that read a handle are then recomputed
by a plain-torch attention (fp32) in which the handle's slots carry their bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_compaction.engine.state import STATE, Row, paged_rows


class CompactionAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[CompactionAttentionImpl]:
        return CompactionAttentionImpl


class CompactionAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if attn_metadata is None:  # profiling run
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        num_reqs = attn_metadata.query_start_loc.numel() - 1
        rows = STATE.rows(num_reqs)
        if not rows:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
            )
        layer_index = extract_layer_index(layer.layer_name)
        starts = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        for row in rows:
            if row.capture is not None:
                start, end = starts[row.index], starts[row.index + 1]
                positions = torch.arange(seq_lens[row.index] - (end - start), seq_lens[row.index])
                row.capture.record(
                    layer_index, positions, query[start:end], key[start:end], value[start:end]
                )
        # The stock kernel runs the whole batch, so requests without a handle get exactly
        # what they would get without the plugin; handle rows are then recomputed with beta.
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        for row in rows:
            if row.handle is None:
                continue
            self._check_supported()
            start, end = starts[row.index], starts[row.index + 1]
            output[start:end] = self._attend(
                query[start:end], kv_cache, attn_metadata, row, seq_lens[row.index], layer_index
            ).to(output.dtype)
        return output

    def _attend(
        self, query: Tensor, kv_cache: Tensor, metadata, row: Row, length: int, layer_index: int
    ) -> Tensor:
        """Causal attention [n, Hq, D] of one sequence's new queries over its cached keys,
        with the handle's bias on its slots."""
        block_size = kv_cache.shape[2]
        blocks = metadata.block_table[row.index, : math.ceil(length / block_size)]
        keys, values = paged_rows(kv_cache, blocks, length)
        group = self.num_queries_per_kv
        keys = keys.float().repeat_interleave(group, dim=0)
        values = values.float().repeat_interleave(group, dim=0)
        q = query.float().transpose(0, 1)  # [Hq, n, D]
        scores = torch.matmul(q, keys.transpose(1, 2)).mul_(self.scale)  # [Hq, n, L]
        bias = row.handle.bias[layer_index].repeat_interleave(group, dim=0)
        scores[:, :, : bias.shape[1]] += bias[:, None, :]
        n = q.shape[1]
        positions = torch.arange(length - n, length)
        future = torch.arange(length)[None, :] > positions[:, None]
        scores.masked_fill_(future, -math.inf)
        return torch.matmul(scores.softmax(dim=-1), values).transpose(0, 1)

    def _check_supported(self) -> None:
        if self.alibi_slopes is not None or self.sliding_window != -1 or self.sinks is not None:
            raise NotImplementedError(
                "compacted contexts support plain causal attention only "
                "(no ALiBi, sliding window or attention sinks)"
            )
        if self.logits_soft_cap:
            raise NotImplementedError("compacted contexts do not support logit soft-capping")
