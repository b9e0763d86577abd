"""Paged Triton kernels on vLLM 0.32's GPU KV layout, against plain-torch references.

The kernels run under Triton's interpreter on CPU tensors; the caches are the per-layer views
vLLM itself builds (`create_kv_cache_views`) for each `KVCacheLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheTensor,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from tests.kernels.triton_ir import run_lowering
from vllm_compaction.kernels import paged

NHD = KVCacheLayout.LBNHC  # vLLM's default when no backend states a preference


def test_kernels_run_under_the_interpreter() -> None:
    for kernel in (paged._copy_slots_kernel, paged._attention_kernel):
        assert isinstance(kernel, InterpretedFunction)


# Both kernels lowered for bf16 and fp32 caches, head_dim 128 and a padded 80, both copy
# directions, decode (group 8, 16 rows) and prefill (64 rows) tiles.
_LOWER = """
from tests.kernels.triton_ir import lower
from vllm_compaction.kernels import paged

lowered = 0
for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
    for head_dim in (128, 80):
        dims = dict(BLOCK_SIZE=16, HEAD_DIM=head_dim, HEAD_DIM_PADDED=128)
        jobs = [(paged._copy_slots_kernel, dict(dims, TO_CACHE=to, BLOCK_T=16)) for to in (1, 0)]
        tiles = dict(dims, BLOCK_N=32, PRECISION=precision)
        for group, rows in ((8, 16), (1, 64)):
            jobs.append((paged._attention_kernel, dict(tiles, GROUP=group, BLOCK_M=rows)))
        for kernel, constants in jobs:
            signature = {}
            for name, param in zip(kernel.arg_names, kernel.params):
                if param.is_constexpr:
                    signature[name] = "constexpr"
                elif name.startswith("stride"):
                    signature[name] = "i64"
                elif name in ("kv_ptr", "keys_ptr", "values_ptr", "q_ptr", "out_ptr"):
                    signature[name] = "*" + dtype
                elif name.endswith("_ptr"):
                    signature[name] = "*fp32" if name == "bias_ptr" else "*i32"
                else:
                    signature[name] = "fp32" if name == "scale" else "i32"
            lower(kernel, signature, constants)
            lowered += 1
print(lowered)
"""


def test_kernels_lower_to_triton_ir() -> None:
    assert run_lowering(_LOWER).split() == ["16"]


def _caches(
    layout: KVCacheLayout,
    num_blocks: int,
    heads: int,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[Tensor, list[Tensor]]:
    """A random two-layer KV cache: its raw bytes and vLLM's per-layer
    [num_blocks, heads, block_size, 2 * head_dim] views for `layout`."""
    spec = FullAttentionSpec(
        block_size=block_size, num_kv_heads=heads, head_size=head_dim, dtype=dtype
    )
    layer_stride, block_stride, *_ = compute_layout_strides(spec, num_blocks, 2, layout)
    size = 2 * num_blocks * spec.page_size_bytes
    tensor = KVCacheTensor(
        size=size, layers=["0", "1"], layer_stride=layer_stride, block_stride=block_stride
    )
    raw = torch.empty(size, dtype=torch.int8)
    views = create_kv_cache_views(raw, spec, num_blocks, layout, tensor)
    gen = torch.Generator().manual_seed(seed)
    for view in views:
        view.copy_(torch.randn(view.shape, generator=gen))
    return raw, views


def _split(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    """Key and value caches [num_blocks, block_size, heads, D], split as FlashAttention does."""
    return kv_cache.transpose(1, 2).split(kv_cache.shape[-1] // 2, dim=-1)


def _slots(block_ids: Tensor, block_size: int, start: int, count: int) -> tuple[Tensor, Tensor]:
    """Block and in-block offset of positions [start, start + count)."""
    positions = torch.arange(start, start + count)
    return block_ids.long()[positions // block_size], positions % block_size


def _scatter_reference(
    kv_cache: Tensor, keys: Tensor, values: Tensor, block_ids: Tensor, start: int, count: int
) -> None:
    blocks, offsets = _slots(block_ids, kv_cache.shape[2], start, count)
    key_cache, value_cache = _split(kv_cache)
    key_cache[blocks, offsets] = keys[:, start : start + count].transpose(0, 1)
    value_cache[blocks, offsets] = values[:, start : start + count].transpose(0, 1)


def _gather_reference(
    kv_cache: Tensor, block_ids: Tensor, start: int, count: int
) -> tuple[Tensor, Tensor]:
    blocks, offsets = _slots(block_ids, kv_cache.shape[2], start, count)
    key_cache, value_cache = _split(kv_cache)
    return key_cache[blocks, offsets].transpose(0, 1), value_cache[blocks, offsets].transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("layout", "head_dim"),
    [(layout, 64) for layout in KVCacheLayout] + [(NHD, 128), (NHD, 80)],
    ids=lambda value: getattr(value, "name", f"d{value}"),
)
def test_scatter_and_gather_match_the_reference(
    layout: KVCacheLayout, head_dim: int, dtype: torch.dtype
) -> None:
    heads, block_size, slots, num_blocks = 2, 16, 37, 7
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(heads, slots, head_dim, generator=gen).to(dtype)
    values = torch.randn(heads, slots, head_dim, generator=gen).to(dtype)
    block_ids = torch.randperm(num_blocks, generator=gen)[:4].int()  # 3 for the handle, 1 more
    raw, views = _caches(layout, num_blocks, heads, block_size, head_dim, dtype, seed=2)
    raw_ref, views_ref = _caches(layout, num_blocks, heads, block_size, head_dim, dtype, seed=2)
    # The whole handle, a block-aligned rest (after a prefix-cache hit), a ragged middle, nothing.
    for start, count in ((0, slots), (16, slots - 16), (5, 19), (9, 0)):
        paged.scatter_slots(views[1], keys, values, block_ids, start, count)
        _scatter_reference(views_ref[1], keys, values, block_ids, start, count)
        # Bytes of both layers, so nothing outside the target slots moved either.
        assert torch.equal(raw, raw_ref), (start, count)

        got = paged.gather_slots(views[1], block_ids, start, count)
        want = _gather_reference(views_ref[1], block_ids, start, count)
        for out, ref, source in zip(got, want, (keys, values), strict=True):
            assert out.dtype == dtype and out.shape == (heads, count, head_dim)
            assert torch.equal(out, ref), (start, count)
            assert torch.equal(out, source[:, start : start + count]), (start, count)


def test_slot_ranges_are_checked() -> None:
    _, views = _caches(NHD, 3, 2, 16, 64, torch.float32, seed=0)
    keys = torch.zeros(2, 20, 64)
    two_blocks = torch.tensor([2, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="handle"):
        paged.scatter_slots(views[0], keys, keys, two_blocks, 10, 11)
    with pytest.raises(ValueError, match="blocks"):
        paged.gather_slots(views[0], two_blocks, 30, 3)


@dataclass(frozen=True)
class Batch:
    """One attention batch: sequence i has seq_lens[i] tokens, its last query_lens[i] new, and a
    handle on its first slots[i] positions (0: none)."""

    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    slots: tuple[int, ...]
    group: int
    head_dim: int
    dtype: torch.dtype
    kv_heads: int = 2
    block_size: int = 16
    layout: KVCacheLayout = NHD
    dead_prefix: int = 0  # leading handle slots with beta = -inf (a whole key tile of them)


BATCHES = {
    "decode-g1-d64-fp32": Batch((1, 1, 1), (5, 37, 70), (0, 16, 48), 1, 64, torch.float32),
    "decode-g1-dead-tile": Batch((1, 1), (70, 40), (48, 33), 1, 64, torch.float32, dead_prefix=32),
    "decode-g2-d128-bf16": Batch((1, 1), (17, 33), (16, 0), 2, 128, torch.bfloat16),
    "prefill-g3-d64-bf16": Batch((7, 20), (7, 53), (0, 32), 3, 64, torch.bfloat16),
    "mixed-g4-d64-fp32": Batch((1, 13, 1), (50, 45, 9), (48, 32, 0), 4, 64, torch.float32),
    "prefill-g5-d128-fp32": Batch((3, 9), (35, 9), (32, 0), 5, 128, torch.float32, kv_heads=1),
    "decode-g6-d64-bf16": Batch((1, 1, 1), (3, 64, 21), (0, 63, 20), 6, 64, torch.bfloat16),
    "prefill-g7-d64-fp32-hnd-bs64": Batch(
        (5, 11), (69, 11), (64, 0), 7, 64, torch.float32, kv_heads=1, block_size=64,
        layout=KVCacheLayout.LBHNC,
    ),
    "mixed-g8-d128-bf16-block-outer": Batch(
        (1, 6), (40, 38), (39, 32), 8, 128, torch.bfloat16, kv_heads=1,
        layout=KVCacheLayout.BLNHC,
    ),
    "mixed-g2-d80-fp32": Batch((2, 1), (19, 26), (17, 25), 2, 80, torch.float32),
}  # fmt: skip


@dataclass
class Inputs:
    query: Tensor
    kv_cache: Tensor
    query_start_loc: Tensor
    seq_lens: Tensor
    block_table: Tensor
    bias: Tensor
    bias_start: Tensor
    bias_len: Tensor
    scale: float


def _inputs(batch: Batch, seed: int) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    bs, kv_heads = batch.block_size, batch.kv_heads
    blocks_per_seq = [-(-n // bs) for n in batch.seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    # Shuffled, disjoint block ids; unused table entries point at a block of random junk.
    order = torch.randperm(num_blocks, generator=gen).int()
    table = torch.full((len(batch.seq_lens), max(blocks_per_seq) + 1), int(order[-1]))
    used = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = order[used : used + n]
        used += n
    _, views = _caches(
        batch.layout, num_blocks, kv_heads, bs, batch.head_dim, batch.dtype, seed=seed + 1
    )
    # The handles' biases side by side in a pool of junk, each at its own column offset.
    bias = 3 * torch.randn(kv_heads, sum(batch.slots) + 8, generator=gen)
    bias_start = []
    column = 5
    for slots in batch.slots:
        beta = 2 * torch.randn(kv_heads, slots, generator=gen)
        beta[:, slots - 3 :] = -torch.inf  # padding slots at the end of the handle
        beta[:, : batch.dead_prefix] = -torch.inf
        bias[:, column : column + slots] = beta
        bias_start.append(column)
        column += slots
    tokens = sum(batch.query_lens)
    query = torch.randn(tokens + 2, kv_heads * batch.group, batch.head_dim, generator=gen)
    starts = torch.tensor([0, *batch.query_lens]).cumsum(0)
    return Inputs(
        query=query.to(batch.dtype),  # two padding rows past the last sequence, as in vLLM
        kv_cache=views[1],
        query_start_loc=starts.int(),
        seq_lens=torch.tensor(batch.seq_lens, dtype=torch.int32),
        block_table=table.int(),
        bias=bias,
        bias_start=torch.tensor(bias_start, dtype=torch.int32),
        bias_len=torch.tensor(batch.slots, dtype=torch.int32),
        scale=batch.head_dim**-0.5,
    )


def _attention_reference(x: Inputs) -> Tensor:
    """Dense fp32 attention per sequence: gather its keys and values, add beta, causal mask,
    softmax. Rows outside the sequences are 0."""
    key_cache, value_cache = _split(x.kv_cache)
    group = x.query.shape[1] // key_cache.shape[2]
    out = torch.zeros(x.query.shape)
    starts = x.query_start_loc.tolist()
    for i, length in enumerate(x.seq_lens.tolist()):
        blocks, offsets = _slots(x.block_table[i], key_cache.shape[1], 0, length)
        keys = key_cache[blocks, offsets].float().transpose(0, 1).repeat_interleave(group, 0)
        values = value_cache[blocks, offsets].float().transpose(0, 1).repeat_interleave(group, 0)
        q = x.query[starts[i] : starts[i + 1]].float().transpose(0, 1)  # [Hq, n, D]
        scores = q @ keys.transpose(1, 2) * x.scale  # [Hq, n, length]
        slots, column = int(x.bias_len[i]), int(x.bias_start[i])
        beta = x.bias[:, column : column + slots].repeat_interleave(group, 0)
        scores[:, :, :slots] += beta[:, None, :]
        positions = torch.arange(length - q.shape[1], length)
        scores.masked_fill_(torch.arange(length)[None, :] > positions[:, None], -torch.inf)
        out[starts[i] : starts[i + 1]] = (scores.softmax(-1) @ values).transpose(0, 1)
    return out


# (atol, rtol). Measured over these batches and 4 seeds (interpreter): fp32 max error 1.2e-6,
# at most 0.42 of this tolerance; bf16 max error 1.6e-2 at |out| ~ 2.8, at most 0.58 of it:
# 5.5e-3 before the output cast (P is rounded to bf16 before P @ V, as in FlashAttention), the
# rest one bf16 ulp from the interpreter's fp32 -> bf16 cast, which truncates (a GPU rounds).
TOLERANCE = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (1e-2, 1e-2)}


def _excess(out: Tensor, ref: Tensor, dtype: torch.dtype) -> float:
    """Largest |out - ref| in units of the tolerance (<= 1 passes)."""
    atol, rtol = TOLERANCE[dtype]
    return ((out.float() - ref).abs() / (atol + rtol * ref.abs())).max().item()


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_attention_matches_the_dense_reference(name: str) -> None:
    batch = BATCHES[name]
    x = _inputs(batch, seed=sum(map(ord, name)))
    out = torch.full_like(x.query, torch.nan)
    paged.paged_attention(
        x.query,
        x.kv_cache,
        x.query_start_loc,
        x.seq_lens,
        x.block_table,
        max(batch.query_lens),
        x.scale,
        x.bias,
        x.bias_start,
        x.bias_len,
        out=out,
    )
    tokens = sum(batch.query_lens)
    assert out[tokens:].isnan().all()  # vLLM's padding rows are not written
    out = out[:tokens]
    excess = _excess(out, _attention_reference(x)[:tokens], batch.dtype)
    assert excess <= 1, f"error {excess:.2f} x the tolerance"

    # Negative controls: the comparison fails by far without the bias or the block order.
    controls = {"block order": {"block_table": x.block_table.sort(dim=1).values}}
    if any(batch.slots):
        controls["bias"] = {"bias_len": torch.zeros_like(x.bias_len)}
    for ignored, change in controls.items():
        control = _attention_reference(Inputs(**{**vars(x), **change}))[:tokens]
        assert _excess(out, control, batch.dtype) > 10, f"{ignored} ignored passes"
