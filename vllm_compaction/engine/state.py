"""What one worker process knows about compaction: handles, captures, and this step's roles.

The attention backend, the KV connector and the worker extension live in the same worker
process and meet here. Requests say what they are through their signed parameters
(`params.py`): {"capture": key, ...} or {"handle": key, "slots": S}.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vllm_compaction.engine.params import request_params


@dataclass
class Handle:
    """A compacted context as the engine places it: S slots at positions 0..S-1.

    Per layer: keys [H_kv, S, D] (RoPE shifted to the slot positions), values [H_kv, S, D]
    (both in the KV cache dtype), bias [H_kv, S] float32 with -inf on padding slots.
    With per-head budgets, `pages` holds per layer the page table [H_kv, P] of heads packed
    into those slots (engine/pages.py), and bias is then per head over its pages' rows
    [H_kv, P * block_size]; None: head h reads column h of the slots.
    """

    keys: list[Tensor]
    values: list[Tensor]
    bias: list[Tensor]
    pages: list[Tensor] | None = None

    @property
    def slots(self) -> int:
        return self.keys[0].shape[1]

    def layer_pages(self, layer: int) -> Tensor | None:
        return None if self.pages is None else self.pages[layer]


@dataclass
class Capture:
    """Rows recorded while a capture request is prefilled, per layer index.

    Keys and values of positions [0, context_len); queries of [query_start, query_end).
    Positions count from `offset`: an extension is prefilled after its previous handle's
    slots, which the engine never computes. Chunks arrive in step order; a preempted and
    recomputed request sends positions again.
    """

    context_len: int
    query_start: int
    query_end: int
    offset: int = 0
    chunks: dict[int, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = field(default_factory=dict)

    def record(self, layer: int, positions: Tensor, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Keep this chunk's rows (positions [n], q [n, Hq, D], k/v [n, Hkv, D])."""
        positions = positions - self.offset
        needed = (positions >= 0) & (positions < self.context_len) | (positions >= self.query_start)
        needed &= positions < max(self.context_len, self.query_end)
        rows = (positions[needed], q[needed], k[needed], v[needed])
        if rows[0].numel():
            self.chunks.setdefault(layer, []).append(rows)

    def layers(self) -> list[int]:
        return sorted(self.chunks)

    def rows(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values [T, Hkv, D] of the context and queries [m, Hq, D] of the query range,
        by position (a position recorded twice keeps its last rows)."""
        chunks = self.chunks[layer]
        _, q0, k0, _ = chunks[0]
        keys = k0.new_empty((self.context_len, *k0.shape[1:]))
        values = torch.empty_like(keys)
        queries = q0.new_empty((self.query_end - self.query_start, *q0.shape[1:]))
        seen_kv = torch.zeros(self.context_len, dtype=torch.bool)
        seen_q = torch.zeros(queries.shape[0], dtype=torch.bool)
        for positions, q, k, v in chunks:
            context = positions < self.context_len
            keys[positions[context]] = k[context]
            values[positions[context]] = v[context]
            seen_kv[positions[context]] = True
            wanted = (positions >= self.query_start) & (positions < self.query_end)
            queries[positions[wanted] - self.query_start] = q[wanted]
            seen_q[positions[wanted] - self.query_start] = True
        if not (seen_kv.all() and seen_q.all()):
            raise RuntimeError("the capture is missing positions (was the prefill cut short?)")
        return keys, values, queries


@dataclass
class Row:
    """A request of the current batch that takes part in compaction."""

    index: int  # its segment in query_start_loc
    capture: Capture | None = None
    handle: Handle | None = None


class WorkerState:
    """Process-wide registry; `STATE` is the one instance."""

    def __init__(self) -> None:
        self.runner: Any = None  # the model runner, bound once by the worker extension
        self.handles: dict[str, Handle] = {}
        self.captures: dict[str, Capture] = {}
        self.jobs: dict[str, Future[tuple[Handle, dict[str, Any]]]] = {}  # compactions running
        self.failed_blocks: set[int] = set()  # the connector reports them; the engine fails
        self._rows: list[Row] | None = None

    def begin_step(self) -> None:
        self._rows = None

    def rows(self, num_reqs: int) -> list[Row]:
        """This step's compaction rows, worked out once per step from the runner's batch."""
        if self._rows is None:
            self._rows = self._collect_rows(num_reqs)
        return self._rows

    def _collect_rows(self, num_reqs: int) -> list[Row]:
        if self.runner is None:
            return []
        rows = []
        for index, req_id in enumerate(self.runner.input_batch.req_ids[:num_reqs]):
            params = request_params(self.runner.requests[req_id].sampling_params)
            if params is None:
                continue
            row = Row(index)
            # An extension is both: it reads its previous handle and is captured.
            if "handle" in params:
                row.handle = self.handles.get(params["handle"])
                if row.handle is None:
                    # Its bias is not here: fail the request rather than attend without it.
                    block_size = self.runner.cache_config.block_size
                    blocks = self.runner.requests[req_id].block_ids[0]
                    self.failed_blocks.update(blocks[: -(-params["slots"] // block_size)])
                    continue
            if "capture" in params:
                key = params["capture"]
                if key not in self.captures:
                    self.captures[key] = Capture(
                        params["context_len"],
                        params["query_start"],
                        params["query_end"],
                        params.get("offset", 0),
                    )
                row.capture = self.captures[key]
            rows.append(row)
        return rows


def paged_rows(cache: Tensor, blocks: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Keys and values [H, length, D] of one sequence from a CPU paged layer cache.

    The CPU layout of a [num_blocks, H, block_size, 2D] cache is physically
    [num_blocks, H, 2 * block_size, D]: per block and head, keys stored transposed as
    [D, block_size], then values as [block_size, D].
    """
    num_blocks, heads, block_size, twice_d = cache.shape
    d = twice_d // 2
    view = cache.view(num_blocks, heads, 2 * block_size, d)[blocks]
    n = blocks.numel()
    keys = view[:, :, :block_size].reshape(n, heads, d, block_size).permute(1, 0, 3, 2)
    values = view[:, :, block_size:].permute(1, 0, 2, 3)
    return (
        keys.reshape(heads, n * block_size, d)[:, :length],
        values.reshape(heads, n * block_size, d)[:, :length],
    )


STATE = WorkerState()
