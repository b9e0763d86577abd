"""One layer's compaction inputs and the attention statistics every method reads."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import exp_shifted_, logits, safe_reciprocal

# Query rows per block of E: a block [H, rows, T] stays in cache while exp, the value product
# and the column sums read it (the whole [H, n, T] would stream through memory each time), and
# with causal queries it forms about rows / T more scores than needed. 64..192 rows were
# equally fast on SmolLM2-sized layers at T = 1k..4k.
_BLOCK_ROWS = 128
# Query rows per block of the kept columns (``Problem.kept_blocks``): the zero part a block
# skips grows as blocks shrink, and MKL's products stay efficient down to a few hundred rows.
_KEPT_ROWS = 256


@dataclass(frozen=True)
class _Statistics:
    """What one pass over the row blocks of E yields (see ``Problem._statistics``)."""

    shift: Tensor
    mass: Tensor
    inverse_total: Tensor
    targets: Tensor
    squares: Tensor


@dataclass
class Problem:
    """Inputs of one layer, with the attention statistics computed once and shared.

    E = exp(S - row max) [H, n, T] is formed block by block of query rows and never kept
    whole unless a method reads ``weights``.

    Attributes:
        keys: [H, T, d] post-RoPE keys (input dtype).
        values: [H, T, d_v] values (input dtype).
        queries: [H, n, d] reference queries (already subsampled).
        bias: [H, T] float32 bias already on the keys (zeros for a fresh cache; -inf allowed).
        query_positions: [H, n] long position of each query, or None (queries see every key).
        budgets: [H] long number of keys to keep per head.
        scale: softmax scale.
        outside: [H, n] log of the attention mass each query spends on keys outside this
            problem (sinks and template tokens kept verbatim, tokens after the context), or
            None (these keys are all it sees). Softmax weights are normalised over
            everything a query sees, so a query that mostly looks elsewhere counts little.
    """

    keys: Tensor
    values: Tensor
    queries: Tensor
    bias: Tensor
    query_positions: Tensor | None
    budgets: Tensor
    scale: float
    outside: Tensor | None = None

    def logits(self, indices: Tensor) -> Tensor:
        """fp32 logits [H, n, t] of the queries against the keys at ``indices`` [H, t].

        Padding slots (index -1) get -inf, so they drop out of every exponential. Causal
        masking uses the keys' original positions; only the columns of ``kept_blocks`` are
        computed, the rest is -inf.
        """
        index = indices.clamp(min=0)
        keys = self.keys.gather(1, index[..., None].expand(-1, -1, self.keys.shape[-1]))
        bias = self.bias.gather(1, index).masked_fill(indices < 0, -math.inf)
        positions = self.query_positions
        if positions is None:
            return logits(self.queries, keys, self.scale, bias)
        out = torch.full(
            (*self.queries.shape[:2], indices.shape[1]), -math.inf, device=self.queries.device
        )
        for rows, reach in self.kept_blocks(indices):
            out[:, rows, :reach] = logits(
                self.queries[:, rows],
                keys[:, :reach],
                self.scale,
                bias[:, :reach],
                positions[:, rows],
                index[:, :reach],
            )
        return out

    def kept_blocks(self, indices: Tensor) -> list[tuple[slice, int]]:
        """Blocks of query rows, each with how many leading columns of ``indices`` [H, t] any
        of its queries sees (0: none; skipped). Past them every column is a key after every
        query of the block, so logits, designs and their products are -inf or 0 there: with
        causal queries in position order and ascending kept keys (as selected) the
        kept-column matrices are block lower triangular, and context queries skip about two
        thirds of them. Without positions, one block of all rows and columns.
        """
        n, t = self.queries.shape[1], indices.shape[1]
        if self.query_positions is None:
            return [(slice(0, n), t)]
        blocks = -(-n // _KEPT_ROWS)
        padded = F.pad(self.query_positions, (0, blocks * _KEPT_ROWS - n), value=-1)
        last = padded.view(padded.shape[0], blocks, _KEPT_ROWS).amax(dim=2)  # [H, blocks]
        seen = (indices[:, None, :] >= 0) & (indices[:, None, :] <= last[..., None])
        column = torch.arange(1, t + 1, device=indices.device)
        reach = (seen * column).amax(dim=2).amax(dim=0).tolist()  # any kept-key order
        starts = range(0, n, _KEPT_ROWS)
        return [(slice(a, a + _KEPT_ROWS), r) for a, r in zip(starts, reach, strict=True) if r]

    @cached_property
    def _bias(self) -> Tensor | None:
        """``bias``, or None when it is all zero (a fresh cache): adding zeros costs a pass."""
        return self.bias if bool(self.bias.any()) else None

    def _blocks(self) -> Iterator[tuple[slice, int, Tensor, Tensor, Tensor]]:
        """Row blocks of E: (rows, seen, E [H, rows, seen], sums [H, rows], shifts [H, rows]).

        A block holds only the first ``seen`` keys, the ones some of its queries can see: with
        causal positions E is 0 past them, so about half of the score matrix is never formed
        when the queries come in position order (as captured, GQA heads pooled or not).
        Blocks of queries that see no key at all are skipped (E, sums and shifts are 0).
        """
        length = self.keys.shape[1]
        for start in range(0, self.queries.shape[1], _BLOCK_ROWS):
            rows = slice(start, start + _BLOCK_ROWS)
            positions = None if self.query_positions is None else self.query_positions[:, rows]
            seen = length if positions is None else min(length, int(positions.max()) + 1)
            if seen > 0:
                scores = logits(
                    self.queries[:, rows],
                    self.keys[:, :seen],
                    self.scale,
                    None if self._bias is None else self._bias[:, :seen],
                    positions,
                )
                yield rows, seen, *exp_shifted_(scores)

    @cached_property
    def _statistics(self) -> _Statistics:
        """Shifts, masses, value targets and squared softmax weights in one pass over E.

        The pass serves every method: those that read only scores (kvzip, h2o) pay for the
        value product too, about a third of its time. On CPU the native kernel computes it
        when it can (``_native_statistics``), else torch does, block by block.
        """
        native = self._native_statistics()
        if native is not None:
            return native
        heads, n, _ = self.queries.shape
        values = self.values.float()
        shift = self.queries.new_zeros(heads, n, dtype=torch.float32)
        mass = torch.zeros_like(shift)
        inverse_total = torch.zeros_like(shift)
        targets = values.new_zeros(heads, n, values.shape[-1])
        squares = torch.zeros_like(self.bias)
        for rows, seen, block, sums, shifts in self._blocks():
            shift[:, rows], mass[:, rows] = shifts, sums
            inv = safe_reciprocal(sums)
            total = inv
            if self.outside is not None:
                elsewhere = (self.outside[:, rows] - shifts).exp_()
                total = safe_reciprocal(sums + elsewhere).masked_fill_(sums == 0, 0.0)
            inverse_total[:, rows] = total
            targets[:, rows] = torch.bmm(block, values[:, :seen]).mul_(inv[..., None])
            # sum_i (E_ij / total_i)^2 as one product, squaring E in place (its last use).
            squares[:, :seen] += torch.bmm(total.square()[:, None, :], block.square_()).squeeze(1)
        return _Statistics(shift, mass, inverse_total, targets, squares)

    def _native_statistics(self) -> _Statistics | None:
        """The pass of csrc/attention_statistics.cpp, about twice as fast as torch's on two cores
        (a tile of score rows stays in cache through every step), or None when it does not
        apply: tensors not on the CPU, head sizes not a multiple of 16 (one AVX-512 vector),
        or no native kernels on this install (they need a C++ compiler; core itself needs
        only torch, so they are imported here, on first use)."""
        if self.keys.device.type != "cpu" or self.keys.shape[-1] % 16 or self.values.shape[-1] % 16:
            return None
        from vllm_compaction.kernels import cpu

        kernels = cpu.load()
        if kernels is None:
            return None
        none = self.bias.new_empty(0)
        positions = self.query_positions
        return _Statistics(
            *kernels.attention_statistics(
                self.queries.float(),
                self.keys.float(),
                self.values.float(),
                none if self._bias is None else self._bias,
                none.long() if positions is None else positions,
                none if self.outside is None else self.outside,
                self.scale,
            )
        )

    @cached_property
    def weights(self) -> Tensor:
        """E [H, n, T] = exp(S - row max) in fp32; the softmax weights are E / mass.

        Formed on first use only, by the methods that read E itself (am-omp, h2o, snapkv).
        """
        heads, n, _ = self.queries.shape
        out = self.queries.new_zeros(heads, n, self.keys.shape[1], dtype=torch.float32)
        for rows, seen, block, _, _ in self._blocks():
            out[:, rows, :seen] = block
        return out

    @property
    def shift(self) -> Tensor:
        """[H, n] the row max subtracted in E (0 for queries that see no key)."""
        return self._statistics.shift

    @property
    def mass(self) -> Tensor:
        """y [H, n] = row sums of E: each query's attention mass, the target of the beta fit."""
        return self._statistics.mass

    @cached_property
    def inverse_mass(self) -> Tensor:
        """[H, n] 1/y, 0 for queries that see no key (those rows drop out of every fit)."""
        return safe_reciprocal(self.mass)

    @property
    def inverse_total(self) -> Tensor:
        """[H, n] 1 / (y + mass outside, in the units of E): softmax weights are E times this.
        Equal to ``inverse_mass`` without ``outside``; 0 for queries that see no key here."""
        return self._statistics.inverse_total

    @property
    def share(self) -> Tensor:
        """[H, n] the fraction of each query's attention that falls on these keys (1 without
        ``outside``): how much of its output the compacted block decides."""
        return self.mass * self.inverse_total

    @property
    def targets(self) -> Tensor:
        """Y [H, n, d_v] = softmax(S) V in fp32 (zero rows for queries that see no key)."""
        return self._statistics.targets

    def mean_attention(self, rows: slice = slice(None)) -> Tensor:
        """[H, T] mean softmax weight of each key over the query ``rows`` that see any key."""
        inv = self.inverse_total[:, rows]
        total = torch.bmm(inv[:, None, :], self.weights[:, rows]).squeeze(1)
        return total / (inv > 0).sum(dim=1, keepdim=True).clamp_min(1)

    def rms_attention(self) -> Tensor:
        """[H, T] root-mean-square softmax weight of each key over the queries that see any key."""
        count = (self.inverse_total > 0).sum(dim=1, keepdim=True).clamp_min(1)
        return (self._statistics.squares / count).sqrt_()

    @cached_property
    def duplicates(self) -> Tensor:
        """[H, T] bool: True for every exact copy of a key row after its first occurrence.

        Copies score alike under every method, so score ties would keep several of them
        although one copy with beta = log(count) carries them all.
        """
        device = self.keys.device
        # torch.unique over rows is slow (it compares row by row): a hash first finds the few
        # rows that can have a copy, and only those go through it.
        hashed, order = _row_hash(self.keys).sort(dim=1)
        tie = hashed[:, 1:] == hashed[:, :-1]
        tied = F.pad(tie, (1, 0)) | F.pad(tie, (0, 1))
        head, pos = torch.zeros_like(tied).scatter_(1, order, tied).nonzero(as_tuple=True)
        out = torch.zeros_like(tied)
        if head.numel() == 0:
            return out
        # Candidates in (head, position) order: the first of each group is the earliest copy.
        rows = torch.cat([head[:, None].float(), self.keys[head, pos].float()], dim=1)
        _, group = torch.unique(rows, dim=0, return_inverse=True)
        index = torch.arange(head.numel(), device=device)
        first = torch.full((int(group.max()) + 1,), head.numel(), device=device)
        first = first.scatter_reduce(0, group, index, reduce="amin")
        copy = first[group] != index
        out[head[copy], pos[copy]] = True
        return out


def _row_hash(rows: Tensor) -> Tensor:
    """[H, T] int64 hash of each row of ``rows`` [H, T, d]; rows equal as floats hash alike.

    Exact integer arithmetic on the bits: + 0.0 turns -0.0 into 0.0, and |bits| < 2^31 times
    multipliers < 2^20, summed over d < 2^12 terms, cannot overflow.
    """
    bits = (rows.float() + 0.0).view(torch.int32).long()
    gen = torch.Generator().manual_seed(0)
    mix = torch.randint(1, 1 << 20, (rows.shape[-1],), generator=gen).to(rows.device)
    return (bits * mix).sum(dim=-1)
