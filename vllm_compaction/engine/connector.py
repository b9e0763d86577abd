"""KV connector that places a handle's compacted KV into a request's first S slots.

A request that reads handle h is sent as S placeholder tokens (plus its own tokens) with a
cache salt unique to h. The scheduler side reports those S tokens as external, so the engine
never computes them; the worker side writes the handle's keys and values into the blocks the
scheduler gave them. Once written they are ordinary prefix-cache blocks under h's salt, so later
requests on h hit them without another copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from vllm import _custom_ops as ops
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
)
from vllm.model_executor.models.utils import extract_layer_index

from vllm_compaction.engine.params import PARAMS_KEY, request_params
from vllm_compaction.engine.state import STATE


@dataclass
class Load:
    """Write slots [start, start + count) of `handle` into the request's `block_ids`."""

    handle: str
    block_ids: list[int]
    start: int
    count: int


@dataclass
class CompactionMetadata(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)


class CompactionConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._pending: list[Load] = []  # scheduler side, until the next metadata
        self._layers: dict[int, tuple[torch.Tensor, Any]] = {}  # worker: index -> (cache, layer)

    # Scheduler side.

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        params = request_params(request.sampling_params)
        if params is None or "handle" not in params:
            return 0, False
        return max(params["slots"] - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        params = request_params(request.sampling_params)
        slots = params["slots"]
        self._pending.append(
            Load(
                handle=params["handle"],
                block_ids=list(blocks.get_block_ids()[0]),
                start=slots - num_external_tokens,
                count=num_external_tokens,
            )
        )

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Report which blocks a handle request held (returned in its output)."""
        params = request_params(request.sampling_params)
        if params is None or "handle" not in params:
            return False, None
        return False, {PARAMS_KEY: {"handle": params["handle"], "blocks": list(block_ids)}}

    def build_connector_meta(self, scheduler_output) -> CompactionMetadata:
        metadata = CompactionMetadata(loads=self._pending)
        self._pending = []
        return metadata

    # Worker side.

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = self._vllm_config.compilation_config.static_forward_context
        self._layers = {
            extract_layer_index(name): (cache, layers[name]) for name, cache in kv_caches.items()
        }

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        STATE.begin_step()

    def start_load_kv(self, forward_context, **kwargs) -> None:
        metadata = self._get_connector_metadata()
        for load in metadata.loads:
            self._write(load)

    def get_block_ids_with_load_errors(self) -> set[int]:
        # The engine fails the requests that own these blocks (kv_load_failure_policy "fail").
        failed, STATE.failed_blocks = STATE.failed_blocks, set()
        return failed

    def _write(self, load: Load) -> None:
        handle = STATE.handles.get(load.handle)
        if handle is None:
            first = load.start // self._block_size
            last = (load.start + load.count - 1) // self._block_size
            STATE.failed_blocks.update(load.block_ids[first : last + 1])
            return
        positions = torch.arange(load.start, load.start + load.count)
        blocks = torch.tensor(load.block_ids)[positions // self._block_size]
        slot_mapping = blocks * self._block_size + positions % self._block_size
        for index, (cache, layer) in self._layers.items():
            num_blocks, heads, block_size, twice_d = cache.shape
            key_cache, value_cache = cache.view(
                num_blocks, heads, 2 * block_size, twice_d // 2
            ).chunk(2, dim=2)
            keys = handle.keys[index][:, load.start : load.start + load.count].transpose(0, 1)
            values = handle.values[index][:, load.start : load.start + load.count].transpose(0, 1)
            ops.cpu_attn_reshape_and_cache(
                keys.contiguous(),
                values.contiguous(),
                key_cache,
                value_cache,
                slot_mapping,
                layer.isa,
            )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        return
