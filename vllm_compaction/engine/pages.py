"""Per-head budgets in vLLM's paged layout: each head's rows packed into pages of the handle.

vLLM gives every KV head of a layer the same slots, so a handle whose heads keep different
numbers of rows would pad each head to the largest. Here the unit is a page: one KV-head column
of one of the handle's blocks (block_size rows; the CPU cache even stores it contiguously).
Head h's n_h rows fill ceil(n_h / block_size) pages taken in turn from the handle's
blocks x heads grid, so the handle needs ceil(sum of pages / H) blocks instead of
ceil(max n_h / block_size).

`pages[h, p] = b * H + c` names the page (block b of the handle, column c) that holds head h's
rows [p * block_size, (p + 1) * block_size); -1 where head h has fewer pages. Head h's bias
runs over the rows of its pages (-inf past its n_h rows). Heads keep their own RoPE'd keys:
the column a row is stored in does not change what it is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def page_counts(lengths: Tensor, block_size: int) -> Tensor:
    """[H] pages each head's rows need."""
    return (lengths + block_size - 1) // block_size


def packed_blocks(lengths: Tensor, block_size: int) -> int:
    """Blocks of a layer whose heads keep `lengths` [H] rows, packed."""
    return math.ceil(int(page_counts(lengths, block_size).sum()) / lengths.numel())


def pack(
    keys: Tensor, values: Tensor, bias: Tensor, lengths: Tensor, blocks: int, block_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Place heads' rows into a region of `blocks` blocks.

    keys, values: [H, t, D] per head, live rows [0, lengths[h]) first; bias [H, t] float32.
    Returns keys and values as the region [H, blocks * block_size, D] the paged cache holds
    (column c, slot s), each head's bias over its pages' rows [H, P * block_size] and the
    page table [H, P].
    """
    heads = keys.shape[0]
    counts = page_counts(lengths, block_size)
    if int(counts.sum()) > blocks * heads:
        raise ValueError(f"{int(counts.sum())} pages do not fit {blocks} blocks x {heads} heads")
    width = max(int(counts.max()), 1)
    first = torch.cumsum(counts, 0) - counts  # each head's first page in the grid
    slot = torch.arange(width)
    pages = torch.where(slot < counts[:, None], first[:, None] + slot, -1)
    padded = width * block_size
    live = torch.arange(padded) < lengths[:, None]
    take = min(padded, keys.shape[1])

    def place(rows: Tensor) -> Tensor:
        head_rows = rows.new_zeros((heads, padded, rows.shape[2]))
        head_rows[:, :take] = rows[:, :take]
        head_rows[~live] = 0
        grid = rows.new_zeros((blocks * heads, block_size, rows.shape[2]))
        chunks = head_rows.reshape(heads, width, block_size, rows.shape[2])
        grid[pages[pages >= 0]] = chunks[pages >= 0]
        return _as_region(grid, heads)

    head_bias = torch.full((heads, padded), -math.inf, dtype=torch.float32)
    head_bias[:, :take] = bias[:, :take]
    head_bias[~live] = -math.inf
    return place(keys), place(values), head_bias, pages


def unpack(region: Tensor, pages: Tensor, block_size: int) -> Tensor:
    """Each head's rows [H, P * block_size, ...] from a region [H, S, ...] (zeros on -1 pages)."""
    heads, slots = region.shape[:2]
    grid = region.reshape(heads, slots // block_size, block_size, *region.shape[2:])
    grid = grid.transpose(0, 1).reshape(-1, block_size, *region.shape[2:])  # page b * H + c
    out = grid[pages.clamp(min=0)]
    out[pages < 0] = 0
    return out.reshape(heads, pages.shape[1] * block_size, *region.shape[2:])


def _as_region(grid: Tensor, heads: int) -> Tensor:
    """Pages [B * H, block_size, ...] (page b * H + c) as the region [H, B * block_size, ...]."""
    blocks = grid.shape[0] // heads
    region = grid.reshape(blocks, heads, *grid.shape[1:]).transpose(0, 1)
    return region.reshape(heads, blocks * grid.shape[1], *grid.shape[2:]).contiguous()
