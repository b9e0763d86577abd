"""Triton kernels for the two heavy passes of Attention Matching, with their torch references.

Never run on a GPU: tested only on the CPU under TRITON_INTERPRET=1 (docs/kernels.md).

- ``attention_statistics``: two streaming passes over a layer's keys for the row shifts, the
  attention masses y, the targets Y = softmax(S) V and the am-highest key score (RMS softmax
  weight): ``Problem.shift``, ``.mass``, ``.targets`` and ``.rms_attention()`` in
  vllm_compaction.core.problem.
- ``mass_products`` / ``value_products``: the normal equations that ``fit_beta`` and
  ``fit_values`` (vllm_compaction.core.fit) hand to ``ridge_solve``.

All three are built on one design matrix D_ij = c_i exp(s_ij - a_i), with logits
s = scale Q K^T + bias + extra (-inf for padding and, with query positions, future keys), a
row shift a [H, n] and a row coefficient c [H, n]; three kernels stream it tile by tile and
never hold more than one [BLOCK_N, BLOCK_T] tile of it:

- rows: online softmax of each query tile over every key tile (max, sum, softmax output),
- columns: per key tile, sum_i D_ij^2 or D^T R over every query tile,
- gram: per pair of key tiles, D^T D over every query tile.

Every tile is converted to fp32 as it is loaded (core computes in fp32, and the interpreter
computes bf16 dots on the raw bits, triton-lang/triton#11584). Logit dots of 16-bit inputs use
TF32, which holds bf16 and fp16 values exactly, so their products are exact as in core; fp32
inputs and every product of exponentials use IEEE fp32 (TF32 would round them to 10 bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from vllm_compaction.core.attention import exp_shifted_, logits, safe_reciprocal
from vllm_compaction.core.indexing import gather_rows

# The smallest tile tl.dot accepts; also the width the mass residual [n, 1] is padded to.
_MIN_DOT = 16


@dataclass(frozen=True)
class Statistics:
    """One layer's attention statistics (the fields of core's ``Problem`` of the same names).

    shift: [H, n] row max of the logits (0 for a query that sees no key);
    mass: [H, n] y = sum_j exp(s_ij - shift_i); targets: [H, n, d_v] Y = softmax(S) V (zero
    rows for queries that see no key); rms: [H, T] sqrt(mean_i A_ij^2) with A = softmax(S),
    the mean over the queries that see any key (``Problem.rms_attention()``).
    """

    shift: Tensor
    mass: Tensor
    targets: Tensor
    rms: Tensor


@dataclass(frozen=True)
class Products:
    """Normal equations of one least-squares fit: gram [H, t, t] and rhs [H, t] or [H, t, d_v]."""

    gram: Tensor
    rhs: Tensor


@triton.jit
def _key_rows(idx_ptr, cols, length, GATHER: tl.constexpr):
    """Rows of K (= key positions) under the key-tile columns ``cols``, and which are real keys."""
    valid = cols < length
    if GATHER:
        rows = tl.load(idx_ptr + cols, mask=valid, other=-1)
        valid = valid & (rows >= 0)
    else:
        rows = cols
    return rows, valid


@triton.jit
def _load_tile(ptr, rows, valid, offs, width):
    """fp32 tile [len(rows), len(offs)] of a row-major matrix [*, width], zero where masked."""
    mask = valid[:, None] & (offs[None, :] < width)
    return tl.load(ptr + rows[:, None] * width + offs[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _positions(qpos_ptr, qrows, qvalid, CAUSAL: tl.constexpr):
    """Positions of a query tile (-1 on rows past n, so they raise no maximum), or zeros."""
    return tl.load(qpos_ptr + qrows, mask=qvalid, other=-1) if CAUSAL else tl.zeros_like(qrows)


@triton.jit
def _visible(qpos, rows, valid, CAUSAL: tl.constexpr):
    """Whether any query of a tile sees any key of a tile; False tiles are skipped (all -inf)."""
    seen = True
    if CAUSAL:
        seen = tl.min(tl.where(valid, rows, tl.max(qpos) + 1)) <= tl.max(qpos)
    return seen


@triton.jit
def _logits(
    q,
    k,
    qpos,
    rows,
    cols,
    valid,
    bias_ptr,
    extra_ptr,
    scale,
    HAS_BIAS: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(scale q k^T + bias) + extra [BLOCK_N, BLOCK_T], in core's order; -inf where masked."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if HAS_BIAS:
        s = s + tl.load(bias_ptr + rows, mask=valid, other=0.0)[None, :]
    if HAS_EXTRA:
        s = s + tl.load(extra_ptr + cols, mask=valid, other=0.0)[None, :]
    keep = valid[None, :]
    if CAUSAL:
        keep = keep & (rows[None, :] <= qpos[:, None])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _design(s, shift_ptr, coef_ptr, qrows, qvalid):
    """D = c exp(s - a) for one tile; rows past n are zeroed (their logits may be anything)."""
    a = tl.load(shift_ptr + qrows, mask=qvalid, other=0.0)
    c = tl.load(coef_ptr + qrows, mask=qvalid, other=0.0)
    return tl.where(qvalid[:, None], c[:, None] * tl.exp(s - a[:, None]), 0.0)


@triton.jit
def _rows_kernel(
    q_ptr,
    k_ptr,
    bias_ptr,
    extra_ptr,
    idx_ptr,
    qpos_ptr,
    v_ptr,
    max_ptr,
    sum_ptr,
    out_ptr,
    n,
    length,
    keys,
    dim,
    dim_v,
    scale,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_V: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    VALUES: tl.constexpr,
):
    """Online softmax of one query tile over all key columns.

    Stores the row max (0 for a row that sees no key), the row sum of exp(s - max) and, with
    VALUES, the softmax output sum_j softmax(s)_ij V_j (zero for a row that sees no key).
    """
    head = tl.program_id(0).to(tl.int64)
    qrows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    qvalid = qrows < n
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_V)
    q = _load_tile(q_ptr + head * n * dim, qrows, qvalid, offs_d, dim)
    qpos = _positions(qpos_ptr + head * n, qrows, qvalid, CAUSAL)
    row_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for start in range(0, length, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        rows, valid = _key_rows(idx_ptr + head * length, cols, length, GATHER)
        if _visible(qpos, rows, valid, CAUSAL):
            k = _load_tile(k_ptr + head * keys * dim, rows, valid, offs_d, dim)
            s = _logits(
                q,
                k,
                qpos,
                rows,
                cols,
                valid,
                bias_ptr + head * keys,
                extra_ptr + head * length,
                scale,
                HAS_BIAS,
                HAS_EXTRA,
                CAUSAL,
                PRECISION,
            )
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            # A row that has seen no key yet shifts by 0: exp(-inf - 0) = 0 where -inf - -inf
            # would be NaN.
            base = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(s - base[:, None])
            rescale = tl.exp(row_max - base)
            total = total * rescale + tl.sum(p, axis=1)
            if VALUES:
                v = _load_tile(v_ptr + head * keys * dim_v, rows, valid, offs_v, dim_v)
                acc = acc * rescale[:, None] + tl.dot(p, v, input_precision="ieee")
            row_max = new_max
    out_rows = head * n + qrows
    tl.store(max_ptr + out_rows, tl.where(row_max == float("-inf"), 0.0, row_max), mask=qvalid)
    tl.store(sum_ptr + out_rows, total, mask=qvalid)
    if VALUES:
        # acc is 0 on rows that see no key: dividing them by 1 keeps them 0 (and warning-free).
        out = acc * (1.0 / tl.where(total > 0, total, 1.0))[:, None]
        mask = qvalid[:, None] & (offs_v[None, :] < dim_v)
        tl.store(out_ptr + out_rows[:, None] * dim_v + offs_v[None, :], out, mask=mask)


@triton.jit
def _columns_kernel(
    q_ptr,
    k_ptr,
    bias_ptr,
    extra_ptr,
    idx_ptr,
    qpos_ptr,
    shift_ptr,
    coef_ptr,
    res_ptr,
    out_ptr,
    n,
    length,
    keys,
    dim,
    width,
    scale,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    SQUARES: tl.constexpr,
):
    """One key tile of sum_i D_ij^2 [length] (SQUARES), or of D^T R [length, width] for the
    residual R [n, width]."""
    head = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows, valid = _key_rows(idx_ptr + head * length, cols, length, GATHER)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    k = _load_tile(k_ptr + head * keys * dim, rows, valid, offs_d, dim)
    acc = tl.zeros([BLOCK_T], tl.float32) if SQUARES else tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    for start in range(0, n, BLOCK_N):
        qrows = start + tl.arange(0, BLOCK_N)
        qvalid = qrows < n
        qpos = _positions(qpos_ptr + head * n, qrows, qvalid, CAUSAL)
        if _visible(qpos, rows, valid, CAUSAL):
            q = _load_tile(q_ptr + head * n * dim, qrows, qvalid, offs_d, dim)
            s = _logits(
                q,
                k,
                qpos,
                rows,
                cols,
                valid,
                bias_ptr + head * keys,
                extra_ptr + head * length,
                scale,
                HAS_BIAS,
                HAS_EXTRA,
                CAUSAL,
                PRECISION,
            )
            d = _design(s, shift_ptr + head * n, coef_ptr + head * n, qrows, qvalid)
            if SQUARES:
                acc += tl.sum(d * d, axis=0)
            else:
                r = _load_tile(res_ptr + head * n * width, qrows, qvalid, offs_r, width)
                acc += tl.dot(tl.trans(d), r, input_precision="ieee")
    out_cols = head * length + cols
    if SQUARES:
        tl.store(out_ptr + out_cols, acc, mask=cols < length)
    else:
        mask = (cols < length)[:, None] & (offs_r[None, :] < width)
        tl.store(out_ptr + out_cols[:, None] * width + offs_r[None, :], acc, mask=mask)


@triton.jit
def _gram_kernel(
    q_ptr,
    k_ptr,
    bias_ptr,
    extra_ptr,
    idx_ptr,
    qpos_ptr,
    shift_ptr,
    coef_ptr,
    out_ptr,
    n,
    length,
    keys,
    dim,
    scale,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Tile (a, b) of D^T D [length, length] over every query tile, for b >= a only.

    D^T D is symmetric: tiles below the diagonal are left unwritten for the caller to mirror,
    which halves the work (each program recomputes both of its D tiles from the logits).
    """
    head = tl.program_id(0).to(tl.int64)
    tile_a = tl.program_id(1)
    tile_b = tl.program_id(2)
    if tile_b >= tile_a:
        cols_a = tile_a * BLOCK_T + tl.arange(0, BLOCK_T)
        cols_b = tile_b * BLOCK_T + tl.arange(0, BLOCK_T)
        rows_a, valid_a = _key_rows(idx_ptr + head * length, cols_a, length, GATHER)
        rows_b, valid_b = _key_rows(idx_ptr + head * length, cols_b, length, GATHER)
        offs_d = tl.arange(0, BLOCK_D)
        k_a = _load_tile(k_ptr + head * keys * dim, rows_a, valid_a, offs_d, dim)
        k_b = _load_tile(k_ptr + head * keys * dim, rows_b, valid_b, offs_d, dim)
        acc = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
        for start in range(0, n, BLOCK_N):
            qrows = start + tl.arange(0, BLOCK_N)
            qvalid = qrows < n
            qpos = _positions(qpos_ptr + head * n, qrows, qvalid, CAUSAL)
            if _visible(qpos, rows_a, valid_a, CAUSAL) & _visible(qpos, rows_b, valid_b, CAUSAL):
                q = _load_tile(q_ptr + head * n * dim, qrows, qvalid, offs_d, dim)
                s_a = _logits(
                    q,
                    k_a,
                    qpos,
                    rows_a,
                    cols_a,
                    valid_a,
                    bias_ptr + head * keys,
                    extra_ptr + head * length,
                    scale,
                    HAS_BIAS,
                    HAS_EXTRA,
                    CAUSAL,
                    PRECISION,
                )
                s_b = _logits(
                    q,
                    k_b,
                    qpos,
                    rows_b,
                    cols_b,
                    valid_b,
                    bias_ptr + head * keys,
                    extra_ptr + head * length,
                    scale,
                    HAS_BIAS,
                    HAS_EXTRA,
                    CAUSAL,
                    PRECISION,
                )
                d_a = _design(s_a, shift_ptr + head * n, coef_ptr + head * n, qrows, qvalid)
                d_b = _design(s_b, shift_ptr + head * n, coef_ptr + head * n, qrows, qvalid)
                acc += tl.dot(tl.trans(d_a), d_b, input_precision="ieee")
        out = out_ptr + (head * length + cols_a)[:, None] * length + cols_b[None, :]
        tl.store(out, acc, mask=(cols_a < length)[:, None] & (cols_b < length)[None, :])


@dataclass(frozen=True)
class _Columns:
    """The key columns a launch streams over, and how their logits are formed.

    Column j is key row ``indices[h, j]`` of ``keys`` (all rows in order when ``indices`` is
    None; -1 is padding); its logit is scale q.k + bias[row] + extra[j], masked by
    ``positions`` against the row (the key's original position).
    """

    queries: Tensor
    keys: Tensor
    bias: Tensor | None
    extra: Tensor | None
    indices: Tensor | None
    positions: Tensor | None
    scale: float
    block_rows: int
    block_keys: int

    @classmethod
    def make(
        cls,
        queries: Tensor,
        keys: Tensor,
        scale: float,
        bias: Tensor | None,
        extra: Tensor | None,
        indices: Tensor | None,
        positions: Tensor | None,
        blocks: tuple[int, int],
    ) -> _Columns:
        if min(blocks) < _MIN_DOT or any(b & (b - 1) for b in blocks):
            raise ValueError(f"block sizes must be powers of two >= {_MIN_DOT}, got {blocks}")
        if queries.device != keys.device:
            raise ValueError("queries and keys must be on one device")

        def prepared(x: Tensor | None, dtype: torch.dtype | None = None) -> Tensor | None:
            return None if x is None else x.to(keys.device, dtype).contiguous()

        return cls(
            queries=queries.contiguous(),
            keys=keys.contiguous(),
            bias=prepared(bias, torch.float32),
            extra=prepared(extra, torch.float32),
            indices=prepared(indices, torch.int64),
            positions=prepared(positions, torch.int64),
            scale=float(scale),
            block_rows=blocks[0],
            block_keys=blocks[1],
        )

    @property
    def heads(self) -> int:
        return self.queries.shape[0]

    @property
    def n(self) -> int:
        return self.queries.shape[1]

    @property
    def length(self) -> int:
        return self.keys.shape[1] if self.indices is None else self.indices.shape[1]

    @property
    def tiles(self) -> int:
        return triton.cdiv(self.length, self.block_keys)

    def pointers(self) -> tuple[Tensor, ...]:
        """The leading pointer arguments of every kernel; absent inputs pass a dummy pointer
        that the kernel never reads (its flag is off)."""
        inputs = (self.bias, self.extra, self.indices, self.positions)
        return (self.queries, self.keys, *(self.queries if x is None else x for x in inputs))

    def sizes(self) -> tuple[int, ...]:
        return (self.n, self.length, self.keys.shape[1], self.keys.shape[2])

    def meta(self) -> dict[str, object]:
        """Compile-time flags shared by every kernel."""
        exact = torch.float32 in (self.queries.dtype, self.keys.dtype)
        return {
            "BLOCK_N": self.block_rows,
            "BLOCK_T": self.block_keys,
            "BLOCK_D": max(_MIN_DOT, triton.next_power_of_2(self.keys.shape[2])),
            "GATHER": self.indices is not None,
            "HAS_BIAS": self.bias is not None,
            "HAS_EXTRA": self.extra is not None,
            "CAUSAL": self.positions is not None,
            "PRECISION": "ieee" if exact else "tf32",
        }

    def softmax_rows(self, values: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Row max (0 if no key), row sum of exp(s - max), and softmax(s) @ values (if given)."""
        heads, n = self.heads, self.n
        row_max = self.queries.new_empty(heads, n, dtype=torch.float32)
        total = torch.empty_like(row_max)
        dim_v = 1 if values is None else values.shape[2]
        out = None if values is None else row_max.new_empty(heads, n, dim_v)
        _rows_kernel[(heads, triton.cdiv(n, self.block_rows))](
            *self.pointers(),
            self.queries if values is None else values.contiguous(),
            row_max,
            total,
            row_max if out is None else out,
            *self.sizes(),
            dim_v,
            self.scale,
            BLOCK_V=max(_MIN_DOT, triton.next_power_of_2(dim_v)),
            VALUES=values is not None,
            **self.meta(),
        )
        return row_max, total, out

    def columns(self, shift: Tensor, coef: Tensor, residual: Tensor | None) -> Tensor:
        """D^T residual [H, length, width] for D = coef exp(s - shift), or sum_i D_ij^2
        [H, length] when ``residual`` is None."""
        width = 1 if residual is None else residual.shape[2]
        shape = (self.heads, self.length) + (() if residual is None else (width,))
        out = shift.new_empty(shape)
        _columns_kernel[(self.heads, self.tiles)](
            *self.pointers(),
            shift.contiguous(),
            coef.contiguous(),
            shift if residual is None else residual.contiguous(),
            out,
            *self.sizes(),
            width,
            self.scale,
            BLOCK_R=max(_MIN_DOT, triton.next_power_of_2(width)),
            SQUARES=residual is None,
            **self.meta(),
        )
        return out

    def gram(self, shift: Tensor, coef: Tensor) -> Tensor:
        """D^T D [H, length, length] for D = coef exp(s - shift)."""
        out = shift.new_empty(self.heads, self.length, self.length)
        _gram_kernel[(self.heads, self.tiles, self.tiles)](
            *self.pointers(),
            shift.contiguous(),
            coef.contiguous(),
            out,
            *self.sizes(),
            self.scale,
            **self.meta(),
        )
        tile = torch.arange(self.length, device=out.device) // self.block_keys
        return torch.where(tile[:, None] > tile[None, :], out.mT, out)


def attention_statistics(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    scale: float,
    bias: Tensor | None = None,
    query_positions: Tensor | None = None,
    *,
    blocks: tuple[int, int] = (64, 64),
) -> Statistics:
    """Kernel 1: a layer's attention statistics, streaming over keys, all heads at once.

    queries [H, n, d], keys [H, T, d], values [H, T, d_v] (fp32, bf16 or fp16); bias [H, T]
    (-inf allowed); query_positions [H, n]: query i sees the keys at positions <= its own
    (keys sit at 0..T-1); blocks: (query rows, keys) per tile, powers of two >= 16.

    Two passes, each streaming the logits tile by tile. The row pass (an online softmax, as
    in FlashAttention) gives shift, mass and the targets Y; Y comes from this pass because it
    already holds the softmax weights. The column pass then needs the finished row
    normalisers: per key tile, sum_i (exp(s_ij - shift_i) / mass_i)^2 over all query tiles.
    ``Problem`` in core forms the same sums from E = exp(S - shift) one block of query rows
    at a time; here no block wider than one tile exists.
    """
    columns = _Columns.make(queries, keys, scale, bias, None, None, query_positions, blocks)
    shift, mass, targets = columns.softmax_rows(values)
    squares = columns.columns(shift, safe_reciprocal(mass), None)
    count = (mass > 0).sum(dim=1, keepdim=True).clamp_min(1)
    return Statistics(shift=shift, mass=mass, targets=targets, rms=(squares / count).sqrt_())


def attention_statistics_reference(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    scale: float,
    bias: Tensor | None = None,
    query_positions: Tensor | None = None,
) -> Statistics:
    """Torch reference of ``attention_statistics``: the whole [H, n, T] matrix at once."""
    weights, mass, shift = exp_shifted_(logits(queries, keys, scale, bias, query_positions))
    inv = safe_reciprocal(mass)[..., None]
    targets = torch.bmm(weights, values.float()).mul_(inv)
    count = (mass > 0).sum(dim=1, keepdim=True).clamp_min(1)
    rms = (weights.mul_(inv).square_().sum(dim=1) / count).sqrt_()
    return Statistics(shift=shift, mass=mass, targets=targets, rms=rms)


def row_weights(mass: Tensor, weighting: float) -> Tensor:
    """u = y^-weighting [H, n], 0 for queries that see no key (core's ``fit.mass_rows``)."""
    return safe_reciprocal(mass).pow(float(weighting)).masked_fill_(mass == 0, 0.0)


def mass_products(
    queries: Tensor,
    keys: Tensor,
    indices: Tensor,
    shift: Tensor,
    mass: Tensor,
    scale: float,
    weighting: float,
    bias: Tensor | None = None,
    query_positions: Tensor | None = None,
    *,
    blocks: tuple[int, int] = (64, 64),
) -> Products:
    """Kernel 2, mass fit: the normal equations ``fit_beta`` passes to ``ridge_solve``.

    indices [H, t] kept key positions (-1 = padding); shift, mass [H, n] from
    ``attention_statistics``; weighting: ``AttentionMatching.mass_weighting``; the other
    arguments as for ``attention_statistics`` (bias is the keys' existing bias, not beta).
    With M = exp(s_kept - shift) [n, t] (the kept columns of E, zero on padding) and row
    weights u = y^-weighting (``row_weights``), returns

        gram = (u M)^T (u M)              [H, t, t]
        rhs  = (u M)^T (u (y - M 1))      [H, t]

    core's ``gram`` and ``rhs`` in ``fit_beta``/``solve_mass``: the system for the deviation
    delta = w - 1 from keeping the keys as they are. (u M)^T (u y) = rhs + gram 1; the
    residual form is what core solves, and forming y - M 1 per query keeps it accurate.

    M 1 comes from a row pass over the kept keys (their own max and sum, rescaled to shift),
    then rhs from a column pass and gram from a pass over pairs of key tiles: nothing wider
    than one [n-tile, t-tile] block of M exists.
    """
    columns = _Columns.make(queries, keys, scale, bias, None, indices, query_positions, blocks)
    shift, mass = shift.float(), mass.float()  # the kernels read them as fp32
    kept_max, kept_sum, _ = columns.softmax_rows(None)
    # Rows that see no kept key have sum 0; exp(0 - shift) could overflow into 0 * inf.
    kept_mass = torch.where(kept_sum > 0, kept_sum * torch.exp(kept_max - shift), 0.0)
    u = row_weights(mass, weighting)
    residual = u * (mass - kept_mass)
    rhs = columns.columns(shift, u, residual[..., None]).squeeze(-1)
    return Products(gram=columns.gram(shift, u), rhs=rhs)


def mass_products_reference(
    queries: Tensor,
    keys: Tensor,
    indices: Tensor,
    shift: Tensor,
    mass: Tensor,
    scale: float,
    weighting: float,
    bias: Tensor | None = None,
    query_positions: Tensor | None = None,
) -> Products:
    """Torch reference of ``mass_products``, with the whole design M [H, n, t]."""
    kept = _kept_logits(queries, keys, indices, scale, bias, query_positions)
    design = (kept - shift[..., None]).exp_().masked_fill_((indices < 0)[:, None, :], 0.0)
    u = row_weights(mass, weighting)
    residual = u * (mass - design.sum(dim=-1))
    design.mul_(u[..., None])
    rhs = torch.bmm(design.mT, residual[..., None]).squeeze(-1)
    return Products(gram=torch.bmm(design.mT, design), rhs=rhs)


def value_products(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    indices: Tensor,
    beta: Tensor,
    targets: Tensor,
    scale: float,
    bias: Tensor | None = None,
    query_positions: Tensor | None = None,
    *,
    blocks: tuple[int, int] = (64, 64),
) -> Products:
    """Kernel 2, value fit: the normal equations ``fit_values`` passes to ``ridge_solve``.

    indices [H, t] kept key positions (-1 = padding); beta [H, t] the fitted mass
    correction (on top of ``bias``, the keys' existing bias); targets [H, n, d_v] Y from
    ``attention_statistics``. With X = softmax over the kept keys of s_kept + beta [n, t]
    (zero on padding and on rows that see no kept key) and V_sel = values[indices],
    returns

        gram = X^T X                      [H, t, t]
        rhs  = X^T (Y - X V_sel)          [H, t, d_v]

    core's products in ``fit_values``, which fits the deviation C2 - V_sel. X^T Y =
    rhs + gram V_sel.

    A row pass over the kept keys gives X's row normalisers and X V_sel (an attention
    forward over the compact keys), then a column pass gives rhs and a pass over pairs of
    key tiles gives gram.
    """
    columns = _Columns.make(queries, keys, scale, bias, beta, indices, query_positions, blocks)
    row_max, total, fitted = columns.softmax_rows(values)
    coef = safe_reciprocal(total)
    return Products(
        gram=columns.gram(row_max, coef),
        rhs=columns.columns(row_max, coef, targets.float() - fitted),
    )


def value_products_reference(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    indices: Tensor,
    beta: Tensor,
    targets: Tensor,
    scale: float,
    bias: Tensor | None = None,
    query_positions: Tensor | None = None,
) -> Products:
    """Torch reference of ``value_products``, with the whole design X [H, n, t]."""
    kept = _kept_logits(queries, keys, indices, scale, bias, query_positions)
    scores = kept.add_(beta[:, None, :]).masked_fill_((indices < 0)[:, None, :], -math.inf)
    design, total, _ = exp_shifted_(scores)
    design.mul_(safe_reciprocal(total)[..., None])
    residual = targets.float() - torch.bmm(design, gather_rows(values.float(), indices))
    return Products(gram=torch.bmm(design.mT, design), rhs=torch.bmm(design.mT, residual))


def _kept_logits(
    queries: Tensor,
    keys: Tensor,
    indices: Tensor,
    scale: float,
    bias: Tensor | None,
    query_positions: Tensor | None,
) -> Tensor:
    """fp32 logits [H, n, t] against the keys at ``indices``, causal by their positions.

    Padding columns (-1) hold the logits of key 0: callers mask them.
    """
    rows = indices.clamp(min=0)
    kept_bias = None if bias is None else bias.gather(1, rows)
    return logits(queries, gather_rows(keys, indices), scale, kept_bias, query_positions, rows)
