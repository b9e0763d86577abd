"""CPU attention backend that records capture requests and adds beta to compacted slots.

Batches with no compaction row take the stock kernel unchanged. A batch with a request that
reads a handle runs a plain-torch attention (fp32) in which the handle's slots carry their bias.
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
        if all(row.handle is None for row in rows):
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
            )
        self._check_supported()
        biased = {row.index: row for row in rows if row.handle is not None}
        for index in range(num_reqs):
            start, end = starts[index], starts[index + 1]
            output[start:end] = self._attend(
                query[start:end],
                kv_cache,
                attn_metadata,
                index,
                seq_lens[index],
                biased.get(index),
                layer_index,
            ).to(output.dtype)
        return output

    def _attend(
        self,
        query: Tensor,
        kv_cache: Tensor,
        metadata,
        index: int,
        length: int,
        row: Row | None,
        layer_index: int,
    ) -> Tensor:
        """Causal attention [n, Hq, D] of one sequence's new queries over its cached keys."""
        block_size = kv_cache.shape[2]
        blocks = metadata.block_table[index, : math.ceil(length / block_size)]
        keys, values = paged_rows(kv_cache, blocks, length)
        group = self.num_queries_per_kv
        keys = keys.float().repeat_interleave(group, dim=0)
        values = values.float().repeat_interleave(group, dim=0)
        q = query.float().transpose(0, 1)  # [Hq, n, D]
        scores = torch.matmul(q, keys.transpose(1, 2)).mul_(self.scale)  # [Hq, n, L]
        if row is not None:
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
