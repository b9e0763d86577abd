"""CPU attention backend that records capture requests and adds beta to compacted slots.

Every batch with a request that reads no handle runs the stock kernel; the rows of requests
that read a handle are then (re)computed with the handle's bias on its slots: by the native
kernel (csrc/biased_attention.cpp) when it builds, else by `attend_torch`, a plain-torch
attention (fp32) that is also its reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
)

from vllm_compaction.engine.pages import unpack
from vllm_compaction.engine.state import STATE, Row, paged_rows
from vllm_compaction.kernels import cpu

NO_PAGES = torch.empty(0, dtype=torch.long)  # the native kernel's "not packed"


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
        handle_rows = [row for row in rows if row.handle is not None]
        # The stock kernel runs the whole batch, so requests without a handle get exactly
        # what they would get without the plugin; handle rows are then recomputed with beta.
        # A batch of handle rows only skips it (it would compute what is overwritten).
        if len(handle_rows) < num_reqs:
            super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
            )
        if handle_rows:
            self._check_supported()
            self._attend(output, query, kv_cache, attn_metadata, handle_rows, layer_index)
        return output

    def _attend(
        self,
        output: Tensor,
        query: Tensor,
        kv_cache: Tensor,
        metadata: CPUAttentionMetadata,
        rows: list[Row],
        layer_index: int,
    ) -> None:
        """Overwrite the rows' outputs [n, Hq, D]: causal attention of each row's new queries
        over its cached keys, with its handle's bias on its slots."""
        indices = [row.index for row in rows]
        biases = [row.handle.bias[layer_index] for row in rows]
        pages = [row.handle.layer_pages(layer_index) for row in rows]
        regions = [0 if p is None else row.handle.slots for p, row in zip(pages, rows, strict=True)]
        kernel = cpu.load()
        if kernel is not None:  # all rows in one call, written into output in place
            kernel.biased_attention(
                output,
                query,
                kv_cache,
                metadata.block_table,
                metadata.query_start_loc,
                metadata.seq_lens,
                indices,
                biases,
                [NO_PAGES if p is None else p for p in pages],
                regions,
                self.scale,
            )
            return
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens.tolist()
        for i, index in enumerate(indices):
            start, end = starts[index], starts[index + 1]
            output[start:end] = attend_torch(
                query[start:end],
                kv_cache,
                metadata.block_table[index],
                seq_lens[index],
                biases[i],
                self.scale,
                pages[i],
                regions[i],
            ).to(output.dtype)

    def _check_supported(self) -> None:
        if self.alibi_slopes is not None or self.sliding_window != -1 or self.sinks is not None:
            raise NotImplementedError(
                "compacted contexts support plain causal attention only "
                "(no ALiBi, sliding window or attention sinks)"
            )
        if self.logits_soft_cap:
            raise NotImplementedError("compacted contexts do not support logit soft-capping")


def attend_torch(
    query: Tensor,
    kv_cache: Tensor,
    blocks: Tensor,
    length: int,
    bias: Tensor,
    scale: float,
    pages: Tensor | None = None,
    region: int = 0,
) -> Tensor:
    """Causal attention [n, Hq, D] (fp32) of one sequence's new queries (positions
    length - n .. length - 1) over its `length` cached slots in `blocks` (its block table row),
    with `bias` [H_kv, S] added to the logits of slots [0, S). With `pages` [H_kv, P], the
    first `region` slots hold heads packed by page (engine/pages.py): each head reads its
    pages' rows, biased, then the slots after the region."""
    block_size = kv_cache.shape[2]
    keys, values = paged_rows(kv_cache, blocks[: math.ceil(length / block_size)], length)
    if pages is not None:
        keys, values = (
            torch.cat([unpack(rows[:, :region], pages, block_size), rows[:, region:]], dim=1)
            for rows in (keys, values)
        )
        length = keys.shape[1]
    group = query.shape[1] // keys.shape[0]
    keys = keys.float().repeat_interleave(group, dim=0)
    values = values.float().repeat_interleave(group, dim=0)
    q = query.float().transpose(0, 1)  # [Hq, n, D]
    scores = torch.matmul(q, keys.transpose(1, 2)).mul_(scale)  # [Hq, n, L]
    bias = bias.repeat_interleave(group, dim=0)
    scores[:, :, : bias.shape[1]] += bias[:, None, :]
    n = q.shape[1]
    positions = torch.arange(length - n, length)
    future = torch.arange(length)[None, :] > positions[:, None]
    scores.masked_fill_(future, -math.inf)
    return torch.matmul(scores.softmax(dim=-1), values).transpose(0, 1)
