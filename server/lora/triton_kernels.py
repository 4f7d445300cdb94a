"""The Triton kernels of the LoRA op (plain functions; server/lora/triton_ops.py compiles or interprets them
and launches them).

Weights are found through offset tables, so one kernel reads per-slot buffers padded to the max rank and
the adapter pool (server/lora/pool.py, each adapter's blocks at their own rank) alike:

- shrink: member g of slot s starts at element `a_off[g, s]` of `a_ptr`; its rank row j at `+ j * sa_r`,
  feature k at `+ k * sa_k`. Row r of the stacked rank dimension is member `r // slice_rank`, its row
  `r % slice_rank`. Padded buffers `a [S, R, in]`: `a_off[g, s] = s * a.stride(0) + g * slice_rank *
  a.stride(1)`; the pool: `base[s] + rel[g, s]`, rows `in` apart.
- expand: slice j of slot s starts at element `b_off[j, s]` of `b_ptr`; output n, rank column r at
  `+ n * sb_n + r * sb_r`.

Ranks: `ranks_ptr + g * rank_g_stride + s` is member g's rank in slot s (`rank_g_stride` 0: one rank per
slot for every member, `meta.slot_ranks`; S: the layers' per-member table, 0 where not targeted). Rows
and columns at or past it are never read.

The kernels use only Triton builtins (no `tl.sum`/`tl.zeros`, whose library versions are fixed to compiled
or interpreted mode when triton is imported), so the same functions run under the interpreter. Their one
helper of their own, `_expand_slice`, is jitted for the compiled kernels; server/lora/triton_ops.py hands the
interpreted kernels an interpreted copy of it.
"""

from __future__ import annotations

import triton
import triton.language as tl

_SUM = tl.standard._sum_combine  # the combine function the interpreter maps to numpy's sum


def _bgmv_shrink_kernel(
    x_ptr, a_ptr, out_ptr, slots_ptr, ranks_ptr, a_off_ptr,
    K, R, k_per_split, slice_rank, S, rank_g_stride,
    sx_n, sx_k, sa_r, sa_k, so_p, so_n, so_r,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[split, i, r] = sum over this split's k of A_{g(r)}[slot_i, r % slice_rank, k] * x[i, k]   (float32)."""
    i = tl.program_id(0)
    rb = tl.program_id(1)
    sp = tl.program_id(2)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    live_slot = tl.maximum(slot, 0)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = r < R
    g = tl.where(r_in, r // slice_rank, 0).to(tl.int64)
    rank = tl.load(ranks_ptr + g * rank_g_stride + live_slot, mask=r_in, other=0)
    rank = tl.where(slot >= 0, rank, 0)
    r_ok = r_in & ((r % slice_rank) < rank)
    k_lo = sp * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    live = tl.reduce(r_ok.to(tl.int32), 0, _SUM)
    k_hi = tl.where(live > 0, k_hi, k_lo)  # a block wholly in rank padding reads nothing
    a_row = a_ptr + tl.load(a_off_ptr + g * S + live_slot, mask=r_in, other=0) + (r % slice_rank).to(tl.int64) * sa_r
    acc = tl.full([BLOCK_R], 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        xv = tl.load(x_ptr + i.to(tl.int64) * sx_n + k * sx_k, mask=k_ok, other=0.0).to(tl.float32)
        av = tl.load(a_row[:, None] + k[None, :] * sa_k, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.reduce(av.to(tl.float32) * xv[None, :], 1, _SUM)
    out = out_ptr + sp.to(tl.int64) * so_p + i.to(tl.int64) * so_n + r * so_r
    tl.store(out, acc, mask=r_in)


@triton.jit
def _expand_slice(nb, out0, out1, out2, off0, off1, off2, BLOCK_N: tl.constexpr):
    """The slice j of output block `nb` when up to three slices' blocks lie one after another on a grid axis
    (slice 0's first): (j, the block's index within slice j, slice j's width, its first column in y)."""
    nb0 = (out0 + BLOCK_N - 1) // BLOCK_N
    nb1 = (out1 + BLOCK_N - 1) // BLOCK_N
    j = (nb >= nb0).to(tl.int32) + (nb >= nb0 + nb1).to(tl.int32)
    local = nb - tl.where(j >= 1, nb0, 0) - tl.where(j >= 2, nb1, 0)
    width = tl.where(j == 0, out0, tl.where(j == 1, out1, out2))
    offset = tl.where(j == 0, off0, tl.where(j == 1, off1, off2))
    return j, local, width, offset


def _bgmv_expand_kernel(
    y_ptr, t_ptr, b_ptr, slots_ptr, ranks_ptr, b_off_ptr,
    out0, out1, out2, off0, off1, off2, S, rank_g_stride, R, splits,
    sy_n, sy_k, st_p, st_n, st_r, sb_n, sb_r,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[i, off_j + n] += sum over r < rank_j(slot_i) of B_j[slot_i][n, r] * t[i, j * R + r].

    Up to three slices j in one launch (q/k/v or gate/up): the output blocks of slice 0 come
    first on grid axis 1, then slice 1's, then slice 2's.
    """
    i = tl.program_id(0)
    nb = tl.program_id(1)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    if slot < 0:
        return
    j, nb, OUT, out_offset = _expand_slice(nb, out0, out1, out2, off0, off1, off2, BLOCK_N)
    rank = tl.minimum(tl.load(ranks_ptr + j * rank_g_stride + slot), R)
    if rank <= 0:
        return
    b_base = tl.load(b_off_ptr + j * S + slot)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < OUT
    b_row = b_ptr + b_base + n.to(tl.int64) * sb_n
    t_row = t_ptr + i.to(tl.int64) * st_n + (j * R) * st_r
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        tv = tl.full([BLOCK_R], 0.0, tl.float32)
        for p in range(0, splits):  # t's split-K partial sums, when the shrink left them apart
            tv += tl.load(t_row + p * st_p + r * st_r, mask=r_ok, other=0.0).to(tl.float32)
        bv = tl.load(b_row[:, None] + r[None, :] * sb_r, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc += tl.reduce(bv.to(tl.float32) * tv[None, :], 1, _SUM)
    y = y_ptr + i.to(tl.int64) * sy_n + (out_offset + n) * sy_k
    yv = tl.load(y, mask=n_ok, other=0.0)
    tl.store(y, (yv.to(tl.float32) + acc).to(yv.dtype), mask=n_ok)


def _sgmv_shrink_kernel(
    x_ptr, a_ptr, out_ptr, starts_ptr, lens_ptr, seg_slots_ptr, ranks_ptr, a_off_ptr,
    K, R, k_per_split, slice_rank, S, rank_g_stride,
    sx_n, sx_k, sa_r, sa_k, so_p, so_n, so_r,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    EXACT: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[split, rows of segment g, r] = x[rows, k-split] @ A[slot_g] rows r, k-split ^T   (float32)."""
    seg = tl.program_id(0)
    mb = tl.program_id(1)
    pid2 = tl.program_id(2)
    num_rb = (R + BLOCK_R - 1) // BLOCK_R
    rb = pid2 % num_rb
    sp = pid2 // num_rb
    seg_len = tl.load(lens_ptr + seg)
    m0 = mb * BLOCK_M
    if m0 >= seg_len:
        return
    start = tl.load(starts_ptr + seg).to(tl.int64)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    m = m0 + tl.arange(0, BLOCK_M)
    m_ok = m < seg_len
    rows = start + m
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = r < R
    g = tl.where(r_in, r // slice_rank, 0).to(tl.int64)
    rank = tl.load(ranks_ptr + g * rank_g_stride + slot, mask=r_in, other=0)
    r_ok = r_in & ((r % slice_rank) < rank)
    k_lo = sp * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    live = tl.reduce(r_ok.to(tl.int32), 0, _SUM)
    k_hi = tl.where(live > 0, k_hi, k_lo)
    x_rows = x_ptr + rows * sx_n
    a_rows = a_ptr + tl.load(a_off_ptr + g * S + slot, mask=r_in, other=0) + (r % slice_rank).to(tl.int64) * sa_r
    acc = tl.full([BLOCK_M, BLOCK_R], 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        xv = tl.load(x_rows[:, None] + k[None, :] * sx_k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        av = tl.load(a_rows[None, :] + k[:, None] * sa_k, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if EXACT:
            acc += tl.dot(xv.to(tl.float32), av.to(tl.float32), input_precision="ieee")
        else:
            if UPCAST:
                xv = xv.to(tl.float32)
                av = av.to(tl.float32)
            acc += tl.dot(xv, av)
    out = out_ptr + sp.to(tl.int64) * so_p + rows[:, None] * so_n + r[None, :] * so_r
    tl.store(out, acc, mask=m_ok[:, None] & r_in[None, :])


def _sgmv_expand_kernel(
    y_ptr, t_ptr, b_ptr, starts_ptr, lens_ptr, seg_slots_ptr, ranks_ptr, b_off_ptr,
    out0, out1, out2, off0, off1, off2, S, rank_g_stride, R, splits,
    sy_n, sy_k, st_p, st_n, st_r, sb_n, sb_r,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    EXACT: tl.constexpr, UPCAST: tl.constexpr,
):
    """y[rows of segment g, off_j + n] += t[rows, j * R:j * R + rank] @ B_j[slot_g][n, :rank]^T,
    up to three slices j per launch, laid out on grid axis 2 as in _bgmv_expand_kernel."""
    seg = tl.program_id(0)
    mb = tl.program_id(1)
    nb = tl.program_id(2)
    seg_len = tl.load(lens_ptr + seg)
    m0 = mb * BLOCK_M
    if m0 >= seg_len:
        return
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    j, nb, OUT, out_offset = _expand_slice(nb, out0, out1, out2, off0, off1, off2, BLOCK_N)
    rank = tl.minimum(tl.load(ranks_ptr + j * rank_g_stride + slot), R)
    if rank <= 0:
        return
    b_base = tl.load(b_off_ptr + j * S + slot)
    start = tl.load(starts_ptr + seg).to(tl.int64)
    m = m0 + tl.arange(0, BLOCK_M)
    m_ok = m < seg_len
    rows = start + m
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < OUT
    t_rows = t_ptr + rows * st_n + (j * R) * st_r
    b_cols = b_ptr + b_base + n.to(tl.int64) * sb_n
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        tv = tl.full([BLOCK_M, BLOCK_R], 0.0, tl.float32)
        for p in range(0, splits):
            tv += tl.load(t_rows[:, None] + p * st_p + r[None, :] * st_r, mask=m_ok[:, None] & r_ok[None, :],
                          other=0.0).to(tl.float32)
        bv = tl.load(b_cols[None, :] + r[:, None] * sb_r, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if EXACT:
            acc += tl.dot(tv, bv.to(tl.float32), input_precision="ieee")
        elif UPCAST:
            acc += tl.dot(tv.to(tl.float32), bv.to(tl.float32))
        else:
            acc += tl.dot(tv.to(bv.dtype), bv)  # 16-bit operands for the tensor cores
    y = y_ptr + rows[:, None] * sy_n + (out_offset + n)[None, :] * sy_k
    mask = m_ok[:, None] & n_ok[None, :]
    yv = tl.load(y, mask=mask, other=0.0)
    tl.store(y, (yv.to(tl.float32) + acc).to(yv.dtype), mask=mask)
