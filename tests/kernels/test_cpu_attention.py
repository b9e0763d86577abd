"""The native CPU biased attention (csrc/biased_attention.cpp) against dense torch attention.

Keys and values are written into the paged cache by vLLM's own CPU writer
(`cpu_attn_reshape_and_cache`, the one the stock backend and our connector use), so the kernel
is checked against the layout vLLM really produces. The reference is a float64 dense attention
over the same (dtype-rounded) keys and values. Tolerances, measured on this suite: fp32 max abs
error ~1e-6 (asserted at 1e-5); bf16/fp16 outputs are within one output rounding of the reference.

The extension must build here: a missing compiler fails these tests (CI has one). The fallback
is tested by making the build fail.
"""

from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor
from vllm import _custom_ops as ops

from vllm_compaction.engine import pages as packing
from vllm_compaction.engine.attention import NO_PAGES, CompactionAttentionImpl, attend_torch
from vllm_compaction.engine.state import Handle, Row
from vllm_compaction.kernels import cpu

# Half an output ulp of the dtype relative to |out|, plus room for fp32 accumulation.
RELATIVE = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ABSOLUTE = 1e-5


@dataclass
class Sequence:
    """One sequence's new queries [n, Hq, D], keys/values [L, H_kv, D] and bias [H_kv, S]."""

    query: Tensor
    keys: Tensor
    values: Tensor
    bias: Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype


def random_sequence(
    length: int, n: int, heads: int, kv_heads: int, d: int, slots: int, dtype: torch.dtype
) -> Sequence:
    """Random rows; a third of the bias slots (at random) are padding (-inf) when S >= 3."""
    bias = torch.randn(kv_heads, slots)
    if slots >= 3:
        bias[:, torch.randperm(slots)[: slots // 3]] = -math.inf
    return Sequence(
        torch.randn(n, heads, d).to(dtype),
        torch.randn(length, kv_heads, d).to(dtype),
        torch.randn(length, kv_heads, d).to(dtype),
        bias,
    )


def paged_cache(seqs: list[Sequence], block_size: int) -> tuple[Tensor, Tensor]:
    """A layer cache [num_blocks, H_kv, block_size, 2D] holding the sequences in shuffled
    blocks (plus spare ones) and their block table [num_seqs, max_blocks] (int32)."""
    _, kv_heads, d = seqs[0].keys.shape
    counts = [math.ceil(len(seq.keys) / block_size) for seq in seqs]
    num_blocks = sum(counts) + 2
    # Garbage outside the sequences' slots: the kernel must never read it into a result.
    cache = torch.full((num_blocks, kv_heads, block_size, 2 * d), math.nan, dtype=seqs[0].dtype)
    key_cache, value_cache = cache.view(num_blocks, kv_heads, 2 * block_size, d).chunk(2, dim=2)
    order = torch.randperm(num_blocks).to(torch.int32)
    table = torch.zeros(len(seqs), max(counts), dtype=torch.int32)
    isa = "vec" if block_size % 32 == 0 else "vec16"  # what the stock backend picks on x86
    for i, seq in enumerate(seqs):
        table[i, : counts[i]] = order[sum(counts[:i]) : sum(counts[: i + 1])]
        positions = torch.arange(len(seq.keys))
        slots = table[i].long()[positions // block_size] * block_size + positions % block_size
        ops.cpu_attn_reshape_and_cache(seq.keys, seq.values, key_cache, value_cache, slots, isa)
    return cache, table


def dense_attention(seq: Sequence, scale: float) -> Tensor:
    """float64 causal attention [n, Hq, D]: queries at positions L - n .. L - 1."""
    n, heads, _ = seq.query.shape
    length, kv_heads, _ = seq.keys.shape
    group = heads // kv_heads
    keys = seq.keys.double().repeat_interleave(group, dim=1)
    values = seq.values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", seq.query.double(), keys) * scale
    bias = seq.bias.double().repeat_interleave(group, dim=0)
    scores[:, :, : bias.shape[1]] += bias[:, None, :]
    future = torch.arange(length)[None, :] > torch.arange(length - n, length)[:, None]
    scores.masked_fill_(future, -math.inf)
    return torch.einsum("hnl,lhd->nhd", scores.softmax(dim=-1), values)


def assert_close(out: Tensor, expected: Tensor) -> None:
    tolerance = ABSOLUTE + RELATIVE[out.dtype] * expected.abs()
    error = (out.double() - expected).abs()
    assert (error <= tolerance).all(), f"max error {error.max().item():.3g}"


@pytest.fixture(scope="module")
def kernel():
    module = cpu.load()
    assert module is not None, "the native CPU kernel did not build: see the warning above"
    return module


def run_native(
    kernel,
    seqs: list[Sequence],
    block_size: int,
    scale: float,
    pages: list[tuple[Tensor, int]] | None = None,
) -> list[Tensor]:
    """All sequences in one call; returns each one's output [n, Hq, D]. `pages`: per sequence
    its page table and packed region (an empty table: not packed)."""
    cache, table = paged_cache(seqs, block_size)
    pages = pages or [(NO_PAGES, 0)] * len(seqs)
    sizes = [len(seq.query) for seq in seqs]
    out = torch.empty(sum(sizes), *seqs[0].query.shape[1:], dtype=seqs[0].dtype)
    kernel.biased_attention(
        out,
        torch.cat([seq.query for seq in seqs]),
        cache,
        table,
        torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32),
        torch.tensor([len(seq.keys) for seq in seqs], dtype=torch.int32),
        list(range(len(seqs))),
        [seq.bias for seq in seqs],
        [table for table, _ in pages],
        [region for _, region in pages],
        scale,
    )
    return list(out.split(sizes))


# (L, n, Hq, H_kv, D, block size, S, dtype): S = -1 means S = L.
CASES = [
    (1, 1, 8, 8, 64, 16, 0, torch.float32),  # a single slot
    (5, 1, 9, 3, 64, 128, 3, torch.float32),  # L below one block
    (20, 20, 4, 2, 128, 32, -1, torch.float32),  # whole prefill, S = L
    (77, 1, 8, 1, 64, 16, 40, torch.float32),  # GQA 8
    (77, 13, 8, 2, 128, 16, 77, torch.bfloat16),
    (301, 1, 9, 3, 64, 32, 150, torch.float32),  # odd length, decode
    (301, 37, 9, 3, 64, 32, 150, torch.bfloat16),  # prefill chunk across blocks
    (301, 37, 8, 8, 128, 128, 0, torch.float32),  # S = 0: plain causal attention
    (1031, 1, 16, 4, 128, 128, -1, torch.bfloat16),  # decode, KV range split
    (1031, 130, 6, 2, 64, 128, 900, torch.float32),  # several query tiles and splits
    (1031, 130, 6, 2, 64, 32, 500, torch.float16),
    (600, 7, 8, 4, 64, 16, 599, torch.bfloat16),
]


@pytest.mark.parametrize("length,n,heads,kv_heads,d,block,slots,dtype", CASES)
def test_native_matches_dense_attention(kernel, length, n, heads, kv_heads, d, block, slots, dtype):
    torch.manual_seed(length * n + heads)
    seq = random_sequence(length, n, heads, kv_heads, d, length if slots < 0 else slots, dtype)
    scale = d**-0.5
    (out,) = run_native(kernel, [seq], block, scale)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert_close(out, dense_attention(seq, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropping_the_bias_fails(kernel, dtype):
    """Negative control: the comparison above notices a kernel that ignores the bias."""
    torch.manual_seed(0)
    seq = random_sequence(301, 5, 9, 3, 64, 200, dtype)
    unbiased = Sequence(seq.query, seq.keys, seq.values, seq.bias[:, :0])
    (out,) = run_native(kernel, [unbiased], 32, 0.125)
    with pytest.raises(AssertionError):
        assert_close(out, dense_attention(seq, 0.125))


def test_bad_inputs_raise_instead_of_reading_out_of_bounds(kernel):
    seq = random_sequence(40, 2, 4, 2, 64, 10, torch.float32)
    cache, table = paged_cache([seq], 16)
    starts = torch.tensor([0, 2], dtype=torch.int32)
    lengths = torch.tensor([40], dtype=torch.int32)
    out = torch.empty_like(seq.query)
    args = (out, seq.query, cache, table, starts, lengths)
    plain = ([NO_PAGES], [0], 0.125)
    kernel.biased_attention(*args, [0], [seq.bias], *plain)
    with pytest.raises(RuntimeError, match="float32"):
        kernel.biased_attention(*args, [0], [seq.bias.double()], *plain)
    with pytest.raises(RuntimeError, match="not in the batch"):
        kernel.biased_attention(*args, [1], [seq.bias], *plain)
    page_bias = torch.zeros(2, 16)
    with pytest.raises(RuntimeError, match="is not in the handle"):  # region of 1 block x 2
        kernel.biased_attention(*args, [0], [page_bias], [torch.tensor([[0], [2]])], [16], 0.125)
    with pytest.raises(RuntimeError, match="before its queries"):
        kernel.biased_attention(*args, [0], [page_bias], [torch.tensor([[0], [1]])], [48], 0.125)
    with pytest.raises(RuntimeError, match="P \\* block_size"):
        kernel.biased_attention(*args, [0], [seq.bias], [torch.tensor([[0], [1]])], [16], 0.125)
    table[0, 1] = cache.shape[0]
    with pytest.raises(RuntimeError, match="not in the cache"):
        kernel.biased_attention(*args, [0], [seq.bias], *plain)


def _batch(dtype: torch.dtype) -> tuple[list[Sequence], list[int]]:
    """Four sequences (decode and prefill); rows 0 and 2 read a handle, 1 and 3 do not."""
    shapes = [(400, 1, 150), (90, 30, 0), (257, 64, 257), (33, 1, 0)]
    seqs = [random_sequence(length, n, 9, 3, 64, s, dtype) for length, n, s in shapes]
    return seqs, [0, 2]


def _attend(seqs: list[Sequence], rows: list[int], block_size: int, scale: float) -> Tensor:
    """The backend's `_attend` on a batch, as the engine calls it: the rows' outputs are
    written in place; the other rows keep a sentinel."""
    cache, table = paged_cache(seqs, block_size)
    sizes = [len(seq.query) for seq in seqs]
    heads, d = seqs[0].query.shape[1:]
    # Queries as vLLM hands them over: a strided view of the fused qkv projection.
    qkv = torch.randn(sum(sizes), heads * d + 2 * 3 * d).to(seqs[0].dtype)
    query = qkv[:, : heads * d].view(-1, heads, d)
    query.copy_(torch.cat([seq.query for seq in seqs]))
    output = torch.full((sum(sizes), heads, d), 7.0, dtype=seqs[0].dtype)
    metadata = types.SimpleNamespace(
        block_table=table,
        query_start_loc=torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32),
        seq_lens=torch.tensor([len(seq.keys) for seq in seqs], dtype=torch.int32),
    )
    handle_rows = [Row(i, handle=Handle([], [], [seqs[i].bias])) for i in rows]
    impl = types.SimpleNamespace(scale=scale)  # `_attend` reads nothing else of the backend
    CompactionAttentionImpl._attend(impl, output, query, cache, metadata, handle_rows, 0)
    return output


def _check_batch(output: Tensor, seqs: list[Sequence], rows: list[int], scale: float) -> None:
    outs = output.split([len(seq.query) for seq in seqs])
    for i, (seq, out) in enumerate(zip(seqs, outs, strict=True)):
        if i in rows:
            assert_close(out, dense_attention(seq, scale))
        else:
            assert (out == 7.0).all(), f"row {i} has no handle and must be left alone"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_attend_uses_the_native_kernel_on_a_batch(kernel, dtype):
    torch.manual_seed(1)
    seqs, rows = _batch(dtype)
    _check_batch(_attend(seqs, rows, 32, 0.125), seqs, rows, 0.125)


@pytest.fixture
def failed_build(monkeypatch, caplog):
    """The loader as on a machine without a compiler; its records captured at its own logger
    (vLLM's logging may stop them from reaching the root logger)."""

    def no_compiler():
        raise RuntimeError("no C++ compiler ('c++' is not on PATH)")

    monkeypatch.setattr(cpu, "_compile", no_compiler)
    monkeypatch.setattr(cpu.logger, "propagate", False)
    cpu.load.cache_clear()
    cpu.logger.addHandler(caplog.handler)
    yield caplog
    cpu.logger.removeHandler(caplog.handler)
    cpu.load.cache_clear()  # later callers load the real extension again


def test_failed_build_warns_once_and_attend_uses_torch(failed_build):
    torch.manual_seed(2)
    seqs, rows = _batch(torch.float32)
    _check_batch(_attend(seqs, rows, 32, 0.125), seqs, rows, 0.125)
    _attend(seqs, rows, 32, 0.125)  # a second step: no second warning
    warnings = [r for r in failed_build.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "plain-torch" in message and "no C++ compiler" in message


def test_torch_path_matches_dense_attention():
    """The fallback alone, on a GQA prefill chunk with padding slots."""
    torch.manual_seed(3)
    seq = random_sequence(301, 37, 9, 3, 64, 150, torch.float32)
    cache, table = paged_cache([seq], 32)
    out = attend_torch(seq.query, cache, table[0], 301, seq.bias, 0.125)
    assert_close(out, dense_attention(seq, 0.125))


def packed_sequence(
    lengths: list[int], own: int, n: int, heads: int, d: int, block_size: int, dtype: torch.dtype
) -> tuple[Sequence, Sequence, Tensor, int]:
    """A handle whose KV heads keep `lengths` rows, packed by page (engine/pages.py), then `own`
    slots of the request. Returns the sequence as the cache holds it, the same attention as
    each head sees it (its rows, biased, then the own slots), the page table and the region."""
    kv_heads = len(lengths)
    counts = torch.tensor(lengths)
    rows = torch.randn(kv_heads, max(lengths), d).to(dtype)
    row_values = torch.randn(kv_heads, max(lengths), d).to(dtype)
    bias = torch.randn(kv_heads, max(lengths))
    blocks = packing.packed_blocks(counts, block_size)
    keys, values, head_bias, table = packing.pack(
        rows, row_values, bias, counts, blocks, block_size
    )
    own_keys, own_values = (torch.randn(own, kv_heads, d).to(dtype) for _ in range(2))
    query = torch.randn(n, heads, d).to(dtype)
    stored = Sequence(
        query,
        torch.cat([keys.transpose(0, 1), own_keys]),
        torch.cat([values.transpose(0, 1), own_values]),
        head_bias,
    )
    seen = Sequence(
        query,
        torch.cat([packing.unpack(keys, table, block_size).transpose(0, 1), own_keys]),
        torch.cat([packing.unpack(values, table, block_size).transpose(0, 1), own_values]),
        head_bias,
    )
    return stored, seen, table, keys.shape[1]


# (rows per KV head, own slots, n, Hq, D, block size, dtype)
PACKED = [
    ([5, 40, 20], 10, 10, 6, 64, 16, torch.float32),  # 6 pages in 2 blocks, not 3
    ([5, 40, 20], 10, 1, 6, 64, 16, torch.float32),  # decode
    ([1, 1, 130, 64], 300, 37, 8, 128, 32, torch.bfloat16),  # empty pages, KV range split
    ([200, 3], 1, 1, 2, 64, 128, torch.float16),
]


@pytest.mark.parametrize("lengths,own,n,heads,d,block,dtype", PACKED)
def test_packed_heads_read_their_pages(kernel, lengths, own, n, heads, d, block, dtype):
    torch.manual_seed(sum(lengths) + own)
    stored, seen, table, region = packed_sequence(lengths, own, n, heads, d, block, dtype)
    assert region < block * math.ceil(max(lengths) / block) or len(lengths) == 2
    expected = dense_attention(seen, d**-0.5)
    (native,) = run_native(kernel, [stored], block, d**-0.5, [(table, region)])
    assert_close(native, expected)
    cache, blocks = paged_cache([stored], block)
    length = len(stored.keys)
    fallback = attend_torch(
        stored.query, cache, blocks[0], length, stored.bias, d**-0.5, table, region
    )
    assert_close(fallback.to(dtype), expected)
    # Negative control: reading the region by column (as an unpacked handle) is not the same.
    (by_column,) = run_native(
        kernel,
        [Sequence(stored.query, stored.keys, stored.values, torch.zeros(len(lengths), region))],
        block,
        d**-0.5,
    )
    with pytest.raises(AssertionError):
        assert_close(by_column, expected)
