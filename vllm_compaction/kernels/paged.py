"""Triton kernels for compacted handles in vLLM's paged GPU KV cache.

Never run on a GPU: tested only on the CPU under TRITON_INTERPRET=1 (docs/kernels.md).

vLLM 0.32 has no `get_kv_cache_shape` on its FlashAttention backend and no [2, num_blocks, ...]
tensor any more: every attention layer gets one tensor `kv_cache` with the logical shape
[num_blocks, num_kv_heads, block_size, 2 * head_size], keys in content [0, D) and values in
[D, 2D) (v1/attention/backends/flash_attn.py:1196-1197; FlashAttention splits it with
`kv_cache.transpose(1, 2).split(head_size, dim=-1)` at line 1251). Its strides follow the
resolved `KVCacheLayout` (v1/kv_cache_layout.py): FlashAttention states no preference
(`supported_kv_cache_layouts` is None, v1/attention/backend.py:369-372), so the default is
LBNHC, per block [block_size, num_kv_heads, 2D] ("NHD", v1/attention/backends/utils.py:193-202),
unless VLLM_KV_CACHE_LAYOUT or another backend picks one of the other five. The kernels address
the cache through its strides and work for all six.

- `scatter_slots` / `gather_slots`: copy slots [start, start + count) of a handle's keys and
  values (C1, C2 [H_kv, S, D]) into / out of a request's blocks; the GPU counterparts of the
  connector's `_write` and of `engine.state.paged_rows`.
- `paged_attention`: causal attention of a batch of sequences over their paged keys and values,
  with a per-slot bias on the first S_i slots of sequence i (the handle's beta).

The bias is not in the KV cache: each layer keeps a float32 pool [H_kv, P] on the GPU holding
the biases of the handles resident on the worker side by side; sequence i reads columns
[bias_start[i], bias_start[i] + bias_len[i]), and bias_len[i] = 0 means no handle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _slot_pointers(
    kv_ptr,
    block_ids_ptr,
    positions,
    mask,
    head,
    dims,
    stride_kb: tl.int64,
    stride_kh: tl.int64,
    stride_kn: tl.int64,
    stride_kc: tl.int64,
    BLOCK_SIZE: tl.constexpr,
):
    """Pointers [len(positions), len(dims)] to the key content of `positions` in `head`."""
    # int64 block ids: block * stride overflows int32 on caches larger than 2^31 elements.
    block = tl.load(block_ids_ptr + positions // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    row = block * stride_kb + head * stride_kh + (positions % BLOCK_SIZE) * stride_kn
    return kv_ptr + row[:, None] + dims[None, :] * stride_kc


@triton.jit
def _copy_slots_kernel(
    kv_ptr,
    keys_ptr,
    values_ptr,
    block_ids_ptr,
    start,
    count,
    dense_start,
    stride_kb: tl.int64,
    stride_kh: tl.int64,
    stride_kn: tl.int64,
    stride_kc: tl.int64,
    stride_xh: tl.int64,
    stride_xs: tl.int64,
    stride_xd: tl.int64,
    TO_CACHE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program copies BLOCK_T slots of one KV head between the cache and dense [H, n, D]
    keys and values whose row 0 is position `dense_start`."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    slot = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    slot_ok = slot < count
    mask = slot_ok[:, None] & (dims < HEAD_DIM)[None, :]
    positions = start + slot
    keys_cache = _slot_pointers(
        kv_ptr,
        block_ids_ptr,
        positions,
        slot_ok,
        head,
        dims,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kc,
        BLOCK_SIZE,
    )
    values_cache = keys_cache + HEAD_DIM * stride_kc
    row = positions - dense_start
    dense = head * stride_xh + row[:, None] * stride_xs + dims[None, :] * stride_xd
    if TO_CACHE:
        tl.store(keys_cache, tl.load(keys_ptr + dense, mask=mask), mask=mask)
        tl.store(values_cache, tl.load(values_ptr + dense, mask=mask), mask=mask)
    else:
        tl.store(keys_ptr + dense, tl.load(keys_cache, mask=mask), mask=mask)
        tl.store(values_ptr + dense, tl.load(values_cache, mask=mask), mask=mask)


def _copy_slots(
    kv_cache: Tensor,
    dense: tuple[Tensor, Tensor],
    dense_start: int,
    block_ids: Tensor,
    start: int,
    count: int,
    to_cache: bool,
    block_t: int = 16,
) -> None:
    _, heads, block_size, twice_d = kv_cache.shape
    keys, values = dense
    if keys.shape != values.shape or keys.stride() != values.stride():
        raise ValueError("keys and values must have the same shape and strides")
    if keys.dtype != kv_cache.dtype or values.dtype != kv_cache.dtype:
        raise ValueError(f"keys and values must be in the cache dtype {kv_cache.dtype}")
    if keys.shape[0] != heads or 2 * keys.shape[2] != twice_d:
        raise ValueError(f"keys {tuple(keys.shape)} do not fit the cache {tuple(kv_cache.shape)}")
    if start < 0 or start + count > block_ids.numel() * block_size:
        raise ValueError(f"positions [{start}, {start + count}) exceed the request's blocks")
    if count == 0:
        return
    _copy_slots_kernel[(triton.cdiv(count, block_t), heads)](
        kv_cache,
        keys,
        values,
        block_ids,
        start,
        count,
        dense_start,
        *kv_cache.stride(),
        *keys.stride(),
        TO_CACHE=to_cache,
        BLOCK_SIZE=block_size,
        HEAD_DIM=twice_d // 2,
        HEAD_DIM_PADDED=triton.next_power_of_2(twice_d // 2),
        BLOCK_T=block_t,
    )


def scatter_slots(
    kv_cache: Tensor, keys: Tensor, values: Tensor, block_ids: Tensor, start: int, count: int
) -> None:
    """Write slots [start, start + count) of a handle into a request's blocks, in place.

    kv_cache: one layer [num_blocks, H_kv, block_size, 2D] (any stride order); keys, values:
    the handle's C1, C2 [H_kv, S, D] in the cache dtype; block_ids [n] int32: the
    request's blocks in order, so slot j lands in block_ids[j // block_size], offset
    j % block_size.
    """
    if start + count > keys.shape[1]:
        raise ValueError(f"slots [{start}, {start + count}) exceed the handle's {keys.shape[1]}")
    _copy_slots(kv_cache, (keys, values), 0, block_ids, start, count, to_cache=True)


def gather_slots(
    kv_cache: Tensor, block_ids: Tensor, start: int, count: int
) -> tuple[Tensor, Tensor]:
    """Keys and values [H_kv, count, D] of positions [start, start + count) of a request."""
    _, heads, _, twice_d = kv_cache.shape
    keys = kv_cache.new_empty((heads, count, twice_d // 2))
    values = torch.empty_like(keys)
    _copy_slots(kv_cache, (keys, values), start, block_ids, start, count, to_cache=False)
    return keys, values


@triton.jit
def _attention_kernel(
    out_ptr,
    q_ptr,
    kv_ptr,
    bias_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_table_ptr,
    bias_start_ptr,
    bias_len_ptr,
    scale,
    stride_qt: tl.int64,
    stride_qh: tl.int64,
    stride_qd: tl.int64,
    stride_ot: tl.int64,
    stride_oh: tl.int64,
    stride_od: tl.int64,
    stride_kb: tl.int64,
    stride_kh: tl.int64,
    stride_kn: tl.int64,
    stride_kc: tl.int64,
    stride_bt: tl.int64,
    stride_ph: tl.int64,
    stride_ps: tl.int64,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: one sequence, one KV head, BLOCK_M // GROUP of its query tokens.

    Rows are (token, query head of the group) pairs, so the GROUP query heads sharing a KV head
    read each key tile once and a decode step still fills the rows of a tensor-core tile.
    Tiles are converted to fp32 on load (the interpreter computes 16-bit dots on the raw bits,
    triton-lang/triton#11584); with 16-bit caches the dots run in TF32, which holds bf16 and
    fp16 values exactly, so products are exact and sums fp32 as in a native 16-bit dot; fp32
    caches use IEEE (TF32 would round them to 10 bits).
    """
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * TOKENS >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # the new tokens are the last q_len of the sequence

    rows = tl.arange(0, BLOCK_M)
    token = tile * TOKENS + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOKENS * GROUP) & (token < q_len)
    position = context + token
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(
        q_ptr
        + (q_start + token)[:, None] * stride_qt
        + head[:, None] * stride_qh
        + dims[None, :] * stride_qd,
        mask=q_mask,
        other=0.0,
    ).to(tl.float32)
    bias_start = tl.load(bias_start_ptr + seq)
    bias_len = tl.load(bias_len_ptr + seq)

    m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    denominator = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    # Keys past the last query of this tile are masked for every row: skip them.
    kv_end = tl.minimum(context + (tile + 1) * TOKENS, seq_len)
    for key_start in range(0, kv_end, BLOCK_N):
        key_pos = key_start + tl.arange(0, BLOCK_N)
        key_ok = key_pos < kv_end
        keys_at = _slot_pointers(
            kv_ptr,
            block_table_ptr + seq * stride_bt,
            key_pos,
            key_ok,
            kv_head,
            dims,
            stride_kb,
            stride_kh,
            stride_kn,
            stride_kc,
            BLOCK_SIZE,
        )
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(keys_at, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(keys_at + HEAD_DIM * stride_kc, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        beta = tl.load(
            bias_ptr + kv_head * stride_ph + (bias_start + key_pos) * stride_ps,
            mask=key_pos < bias_len,
            other=0.0,
        )
        s += beta[None, :]
        # Causal; also masks keys at or past seq_len since position < seq_len.
        s = tl.where(key_pos[None, :] <= position[:, None], s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row can see only -inf so far (padding slots carry beta = -inf): exponentiate
        # against 0 then, which gives p = 0 and alpha = 0 instead of nan.
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        denominator = denominator * alpha + tl.sum(p, 1)
        # P in the cache dtype, as FlashAttention feeds P @ V (a no-op for fp32 caches).
        p = p.to(kv_ptr.dtype.element_ty).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    acc = acc / denominator[:, None]
    tl.store(
        out_ptr
        + (q_start + token)[:, None] * stride_ot
        + head[:, None] * stride_oh
        + dims[None, :] * stride_od,
        acc.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


def paged_attention(
    query: Tensor,
    kv_cache: Tensor,
    query_start_loc: Tensor,
    seq_lens: Tensor,
    block_table: Tensor,
    max_query_len: int,
    scale: float,
    bias: Tensor,
    bias_start: Tensor,
    bias_len: Tensor,
    out: Tensor | None = None,
) -> Tensor:
    """Causal paged attention [T, Hq, D] with the handle's bias on each sequence's first slots.

    query [T, Hq, D] post-RoPE, packed by `query_start_loc` [num_seqs + 1] (int32); sequence i
    has seq_lens[i] tokens, the last q_len_i of which are its queries, all already written to
    `kv_cache` [num_blocks, H_kv, block_size, 2D] through `block_table` [num_seqs, max_blocks]
    (vLLM's metadata). Query head h reads KV head h // (Hq // H_kv). `bias` [H_kv, P] float32
    is added to the logits of key slots [0, bias_len[i]) of sequence i, read from columns
    bias_start[i] + slot. Rows of `out` outside the sequences are left untouched.
    """
    _, num_heads, head_dim = query.shape
    _, num_kv_heads, block_size, twice_d = kv_cache.shape
    if twice_d != 2 * head_dim or num_heads % num_kv_heads or query.dtype != kv_cache.dtype:
        raise ValueError(f"query {tuple(query.shape)} does not fit the cache {kv_cache.shape}")
    if bias.dtype != torch.float32 or bias.shape[0] != num_kv_heads:
        raise ValueError(f"bias must be float32 [H_kv, P], got {bias.dtype} {tuple(bias.shape)}")
    out = torch.empty_like(query) if out is None else out
    group = num_heads // num_kv_heads
    # Rows per tile: at least a tensor-core tile (16) and a whole group; prefill takes up to 64,
    # or 16 for fp32 caches, whose IEEE dots spill registers beyond that at head_dim 128
    # (ptxas for sm_90).
    max_rows = 16 if kv_cache.dtype == torch.float32 else 64
    block_m = max(
        16,
        triton.next_power_of_2(group),
        min(max_rows, triton.next_power_of_2(group * max_query_len)),
    )
    num_seqs = seq_lens.numel()
    grid = (num_seqs, triton.cdiv(max_query_len, block_m // group), num_kv_heads)
    _attention_kernel[grid](
        out,
        query,
        kv_cache,
        bias,
        query_start_loc,
        seq_lens,
        block_table,
        bias_start,
        bias_len,
        scale,
        *query.stride(),
        *out.stride(),
        *kv_cache.stride(),
        block_table.stride(0),
        *bias.stride(),
        GROUP=group,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=32,
        PRECISION="ieee" if kv_cache.dtype == torch.float32 else "tf32",
    )
    return out
