"""Worker extension (`--worker-extension-cls`): the RPCs the server calls on every worker."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from vllm_compaction import store
from vllm_compaction.core import compact_cache, log_mass
from vllm_compaction.engine import pages
from vllm_compaction.engine.rope import shift_positions
from vllm_compaction.engine.state import STATE, Capture, Handle

# One compaction at a time per worker: each already uses every core torch gives it.
_JOBS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compaction")


class CompactionWorkerExtension:
    """Mixed into vLLM's worker class; may only add methods (vLLM asserts on overrides)."""

    def compaction_bind(self) -> None:
        """Let the attention backend find this worker's batch (request ids in row order)."""
        # Tensor parallelism splits KV heads, which compact independently; pipeline stages
        # would each hold some layers, and handles index every layer.
        if self.parallel_config.pipeline_parallel_size > 1:
            raise NotImplementedError("compaction does not support pipeline parallelism")
        STATE.runner = self.model_runner

    def compaction_compact(self, key: str, options: dict[str, Any]) -> None:
        """Start compacting the rows captured under `key` into handle `key`, in the background:
        the engine keeps stepping meanwhile. Poll `compaction_ready`, then `compaction_finish`.

        options: budget (kept rows per head, verbatim included), keep_first, protected
        ([start, end) spans kept verbatim), method, causal (queries see only earlier keys);
        for an extension, previous (the handle the capture was prefilled after) and
        previous_rows (its rows before the padding, which the new handle keeps), and fold:
        compact those rows again together with the new ones (budget then counts both);
        pool_heads: per-head budgets (the layer's rows go where attention spreads, core
        ``pool_heads``), packed by page into the handle's blocks (engine/pages.py);
        max_queries: the core option (its default when absent).
        """
        capture = STATE.captures.pop(key, None)
        if capture is None or not capture.chunks:
            raise RuntimeError(
                "no rows were recorded for this context: the compaction attention backend runs "
                "on CPU platforms only so far"
            )
        previous = None
        if options.get("previous") is not None:
            previous = STATE.handles.get(options["previous"])
            if previous is None:
                raise RuntimeError(f"handle {options['previous']} is not held by this worker")
            previous = _rows(previous, options["previous_rows"])
        block_size = self.vllm_config.cache_config.block_size
        rotary = _rotary(self.model_runner)
        STATE.jobs[key] = _JOBS.submit(
            _compacted_handle, capture, options, block_size, rotary, previous
        )

    def compaction_ready(self, key: str) -> bool:
        return STATE.jobs[key].done()

    def compaction_finish(self, key: str) -> dict[str, Any]:
        """Install the finished handle (or raise the compaction's error)."""
        handle, reply = STATE.jobs.pop(key).result()
        STATE.handles[key] = handle
        return reply

    def compaction_save(self, key: str, folder: str) -> dict[str, str]:
        """Write this worker's part of handle `key` into `folder`; returns its file and sha256."""
        handle = STATE.handles[key]
        path = Path(folder) / f"rank{self.rank}.safetensors"
        layers = {part: getattr(handle, part) for part in store.PARTS}
        layers = {part: tensors for part, tensors in layers.items() if tensors is not None}
        return {"file": path.name, "sha256": store.save_layers(path, layers)}

    def compaction_load(self, key: str, folder: str, files: list[dict[str, str]]) -> None:
        """Bring a stored or imported handle into memory; refuses altered or unfitting files."""
        if len(files) != self.parallel_config.world_size:
            # Each file holds one rank's KV heads: only the same split can read them.
            raise store.CorruptHandle(
                f"it was made by {len(files)} workers (tensor-parallel ranks); this engine has "
                f"{self.parallel_config.world_size}"
            )
        entry = files[self.rank]
        handle = Handle(**store.load_layers(Path(folder) / entry["file"], entry["sha256"]))
        _check_fits(handle, self.vllm_config)
        STATE.handles[key] = handle

    def compaction_delete(self, key: str) -> bool:
        """Free a handle, or the rows of a capture or compaction that will not be used."""
        STATE.captures.pop(key, None)
        STATE.jobs.pop(key, None)  # a running one finishes unseen
        return STATE.handles.pop(key, None) is not None


def _compacted_handle(
    capture: Capture,
    options: dict[str, Any],
    block_size: int,
    rotary: Any,
    previous: Handle | None = None,
) -> tuple[Handle, dict[str, Any]]:
    """Compact every layer, re-rotate the keys to the handle's slot positions and pad them to
    whole blocks (padding bias -inf). An extension keeps the previous handle's rows first;
    with `fold`, they are compacted again together with the new ones."""
    began = time.perf_counter()
    keys, values, queries, positions = _stack(capture)
    biases = outside = None
    protected = [tuple(span) for span in options.get("protected", [])]
    if previous is not None and options.get("fold"):
        # The previous rows come first (keep_first counts them) and every new query sees all
        # of them.
        earlier = previous.slots
        keys = [torch.cat(pair, dim=1) for pair in zip(previous.keys, keys, strict=True)]
        values = [torch.cat(pair, dim=1) for pair in zip(previous.values, values, strict=True)]
        biases = [torch.nn.functional.pad(b, (0, capture.context_len)) for b in previous.bias]
        positions = [p + earlier for p in positions]
        protected = [(start + earlier, end + earlier) for start, end in protected]
        previous = None
    elif previous is not None:
        # The new part's queries also attend to the previous rows: the fit must weigh each
        # query by the share of its attention the new part gets.
        # Every new query comes after every previous row: no causal mask.
        outside = [
            log_mass(q, k, 1.0 / math.sqrt(k.shape[-1]), b)
            for q, k, b in zip(queries, previous.keys, previous.bias, strict=True)
        ]
    compacted = compact_cache(
        keys,
        values,
        queries,
        budget=options["budget"],
        query_positions=positions if options.get("causal") else None,
        biases=biases,
        outside_lse=outside,
        keep_first=options.get("keep_first", 4),
        protected=protected,
        method=options.get("method", "am-highest"),
        **({"pool_heads": True} if options.get("pool_heads") else {}),
        **({"max_queries": options["max_queries"]} if "max_queries" in options else {}),
    )
    pooled = bool(options.get("pool_heads"))
    if pooled and previous is not None:
        raise RuntimeError("per-head budgets cannot extend a handle")
    if pooled:
        blocks = max(pages.packed_blocks(part.lengths, block_size) for part in compacted)
    else:
        rows = options["budget"] + (previous.slots if previous is not None else 0)
        blocks = math.ceil(rows / block_size)
    slots = blocks * block_size
    # Every key carries the rotation of its slot: logical position + slots - context tokens.
    # The previous rows carry that of the previous slots; the new keys, prefilled right after
    # those slots, carry it too. So both move by the same amount.
    delta = slots - capture.offset - capture.context_len
    dtype = keys[0].dtype
    handle = Handle(keys=[], values=[], bias=[], pages=[] if pooled else None)
    for layer, part in enumerate(compacted):
        layer_keys, layer_values, bias = part.keys.to(dtype), part.values.to(dtype), part.bias
        if previous is not None:
            layer_keys = torch.cat([previous.keys[layer], layer_keys], dim=1)
            layer_values = torch.cat([previous.values[layer], layer_values], dim=1)
            bias = torch.cat([previous.bias[layer], bias.float()], dim=1)
        layer_keys = shift_positions(layer_keys, delta, rotary).to(dtype)
        if pooled:
            layer_keys, layer_values, bias, table = pages.pack(
                layer_keys, layer_values, bias, part.lengths, blocks, block_size
            )
            handle.pages.append(table)
        else:
            pad = slots - layer_keys.shape[1]
            layer_keys, layer_values = _pad(layer_keys, pad), _pad(layer_values, pad)
            bias = _pad(bias.float(), pad, -math.inf)
        handle.keys.append(layer_keys)
        handle.values.append(layer_values)
        handle.bias.append(bias)
    parts = (handle.keys, handle.values, handle.bias, handle.pages or [])
    size = sum(t.nbytes for part in parts for t in part)
    return handle, {"slots": slots, "bytes": size, "compact_s": time.perf_counter() - began}


def _rows(handle: Handle, count: int) -> Handle:
    """The handle's first `count` rows: its compacted rows without the padding to blocks."""
    if handle.pages is not None:
        raise RuntimeError("a handle with per-head budgets cannot be extended")
    if not 0 < count <= handle.slots:
        raise RuntimeError(f"the previous handle has {handle.slots} slots, not {count} rows")
    parts = (handle.keys, handle.values, handle.bias)
    return Handle(*([t[:, :count] for t in part] for part in parts))


def _stack(capture: Capture) -> tuple[list, list, list, list]:
    """Per layer: keys/values [Hkv, T, D], queries pooled per KV head [Hkv, m*g, D] and their
    positions [Hkv, m*g]."""
    keys, values, queries, positions = [], [], [], []
    span = torch.arange(capture.query_start, capture.query_end)
    for layer in capture.layers():
        k, v, q = capture.rows(layer)
        heads, group = k.shape[1], q.shape[1] // k.shape[1]
        keys.append(k.transpose(0, 1))
        values.append(v.transpose(0, 1))
        # Query head h reads KV head h // group: pool a group's heads along the query axis.
        pooled = q.reshape(q.shape[0], heads, group, -1).permute(1, 2, 0, 3)
        queries.append(pooled.reshape(heads, group * q.shape[0], -1))
        positions.append(span.repeat(group)[None].expand(heads, -1))
    return keys, values, queries, positions


def _check_fits(handle: Handle, vllm_config: Any) -> None:
    """Refuse tensors this worker's model cannot attend: wrong layers, shapes, dtype, values."""
    heads = vllm_config.model_config.get_num_kv_heads(vllm_config.parallel_config)
    size = (heads, handle.slots, vllm_config.model_config.get_head_size())
    layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
    dtype = vllm_config.model_config.dtype
    if handle.slots % vllm_config.cache_config.block_size or not handle.slots:
        raise store.CorruptHandle(f"{handle.slots} slots do not fill whole blocks")
    if not len(handle.keys) == len(handle.values) == len(handle.bias) == layers:
        raise store.CorruptHandle(f"it has {len(handle.keys)} layers; the model has {layers}")
    if handle.pages is not None and len(handle.pages) != layers:
        raise store.CorruptHandle(f"it has {len(handle.pages)} page tables; the model {layers}")
    block_size = vllm_config.cache_config.block_size
    for layer, (keys, values, bias) in enumerate(
        zip(handle.keys, handle.values, handle.bias, strict=True)
    ):
        # Packed heads: each head's bias runs over its pages' rows (engine/pages.py).
        table = handle.layer_pages(layer)
        if table is not None and not (
            table.dtype == torch.int64
            and table.ndim == 2
            and table.shape[0] == heads
            and ((table >= -1) & (table < handle.slots // block_size * heads)).all()
        ):
            raise store.CorruptHandle("its page tables point outside its blocks")
        width = size[1] if table is None else table.shape[1] * block_size
        if keys.shape != size or values.shape != size or bias.shape != (heads, width):
            raise store.CorruptHandle(f"its tensors do not fit the model's {size} KV heads")
        if keys.dtype != dtype or values.dtype != dtype or bias.dtype != torch.float32:
            raise store.CorruptHandle(f"its tensors are not {dtype} (bias float32)")
        if not (keys.isfinite().all() and values.isfinite().all()):
            raise store.CorruptHandle("its keys or values are not finite")
        if bias.isnan().any() or (bias == math.inf).any():
            raise store.CorruptHandle("its bias holds NaN or +inf")


def _rotary(runner):
    return runner.model.model.layers[0].self_attn.rotary_emb


def _pad(x: torch.Tensor, count: int, value: float = 0.0) -> torch.Tensor:
    if count == 0:
        return x
    shape = (*x.shape[:1], count, *x.shape[2:])
    return torch.cat([x, x.new_full(shape, value)], dim=1)
