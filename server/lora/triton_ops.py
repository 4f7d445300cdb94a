"""Triton kernels for the batched multi-adapter LoRA op: `shrink` and `expand_`.

Semantics (the LoRA op contract, same as the torch reference in server/lora/ops.py):

    shrink(x [N, in], a [S, R, in], meta) -> t [N, R]       t[i] = a[slot(i)] @ x[i]; slot -1 rows are 0
    expand_(y [N, >= out_offset + out], t [N, R], b [S, out, R], meta, out_offset)
                                                           y[i, out_offset:out_offset + out] += b[slot(i)] @ t[i]

Two kernel families, picked per call from the step context `meta`:
- BGMV (decode): one program per (token, output block), the slot read per token from
  `meta.token_slots`. Matrix-vector work, bound by reading the adapters' weights, so it uses no
  tensor cores; the shrink splits `in` across programs (split-K) so a 32-token decode step still
  fills the GPU, and sums the partials afterwards (deterministic, no atomics).
- SGMV (prefill): one program per (segment, row block, output block) over `meta.seg_*`
  (contiguous runs of one slot); the weight tile is read once per row block and multiplied with
  `tl.dot`. Programs past a segment's end return at once.

Both skip the rank padding: rows of A / columns of B at or past `meta.slot_ranks[slot]` are
masked (no memory traffic), and B's rank loop stops at the slot's rank. `shrink` returns float32
(the exact sum; `expand_` accepts a `t` of any float dtype and strided views of it). x, t and y may
be strided views: stacked q/k/v (A stacked to [S, 3R, in], t sliced per projection, y a fused
output with `out_offset`) work without copies. Any R <= 256, float32 / float16 / bfloat16.

The same kernels run on CUDA tensors (compiled) and on CPU tensors through Triton's interpreter,
chosen per call, so the tests check them on machines with no GPU; the kernels use only Triton
builtins for that reason (no `tl.sum`/`tl.zeros`, whose library versions are fixed to compiled or
interpreted mode when triton is imported).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["MAX_RANK", "SGMV_MIN_SEGMENT", "expand_", "expand_slices_", "lora_", "shrink"]

MAX_RANK = 256
# Steps whose longest segment has at least this many tokens take the segment (SGMV) kernels.
SGMV_MIN_SEGMENT = 4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SUM = tl.standard._sum_combine  # the combine function the interpreter maps to numpy's sum
Path = Literal["auto", "bgmv", "sgmv"]


class StepMeta(Protocol):
    """What the kernels read from the step context (server/lora/step.py: LoraStepMeta)."""

    token_slots: torch.Tensor  # [N] int32/int64 on the device, -1 = base
    seg_starts: torch.Tensor  # [G] first row of each non-base run of one slot
    seg_lens: torch.Tensor  # [G]
    seg_slots: torch.Tensor  # [G]
    max_seg_len: int
    num_segments: int
    slot_ranks: torch.Tensor  # [S] int32, 0 for an empty slot


# ---------------------------------------------------------------------------------------------
# Kernels (plain functions; compiled or interpreted by `_kernel` below).


def _bgmv_shrink_kernel(
    x_ptr, a_ptr, out_ptr, slots_ptr, ranks_ptr,
    K, R, k_per_split, slice_rank,
    sx_n, sx_k, sa_s, sa_r, sa_k, so_p, so_n, so_r,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[split, i, r] = sum over this split's k of a[slot_i, r, k] * x[i, k]   (float32)."""
    i = tl.program_id(0)
    rb = tl.program_id(1)
    sp = tl.program_id(2)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    rank = tl.load(ranks_ptr + tl.maximum(slot, 0))
    rank = tl.where(slot >= 0, rank, 0)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = (r < R) & ((r % slice_rank) < rank)
    k_lo = sp * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    live = tl.reduce(r_ok.to(tl.int32), 0, _SUM)
    k_hi = tl.where(live > 0, k_hi, k_lo)  # a block wholly in rank padding reads nothing
    a_row = a_ptr + slot * sa_s + r.to(tl.int64) * sa_r
    acc = tl.full([BLOCK_R], 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        xv = tl.load(x_ptr + i.to(tl.int64) * sx_n + k * sx_k, mask=k_ok, other=0.0).to(tl.float32)
        av = tl.load(a_row[:, None] + k[None, :] * sa_k, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.reduce(av.to(tl.float32) * xv[None, :], 1, _SUM)
    out = out_ptr + sp.to(tl.int64) * so_p + i.to(tl.int64) * so_n + r * so_r
    tl.store(out, acc, mask=r < R)


def _bgmv_expand_kernel(
    y_ptr, t_ptr, b_ptr, slots_ptr, ranks_ptr,
    out0, out1, out2, off0, off1, off2, d1, d2, sb_s0, sb_s1, sb_s2, R, splits,
    sy_n, sy_k, st_p, st_n, st_r, sb_n, sb_r,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[i, off_j + n] += sum over r < rank(slot_i) of b_j[slot_i, n, r] * t[i, j * R + r].

    Up to three slices j in one launch (q/k/v or gate/up): the output blocks of slice 0 come
    first on grid axis 1, then slice 1's, then slice 2's. b_j lives at b_ptr + d_j elements.
    """
    i = tl.program_id(0)
    nb = tl.program_id(1)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    if slot < 0:
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), R)
    if rank <= 0:
        return
    # Which slice this output block belongs to, and the slice's size, place in y and weights.
    nb0 = (out0 + BLOCK_N - 1) // BLOCK_N
    nb1 = (out1 + BLOCK_N - 1) // BLOCK_N
    j = (nb >= nb0).to(tl.int32) + (nb >= nb0 + nb1).to(tl.int32)
    nb = nb - tl.where(j >= 1, nb0, 0) - tl.where(j >= 2, nb1, 0)
    OUT = tl.where(j == 0, out0, tl.where(j == 1, out1, out2))
    out_offset = tl.where(j == 0, off0, tl.where(j == 1, off1, off2))
    b_base = tl.where(j == 0, 0, tl.where(j == 1, d1, d2)).to(tl.int64)
    b_base += slot * tl.where(j == 0, sb_s0, tl.where(j == 1, sb_s1, sb_s2)).to(tl.int64)
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
    x_ptr, a_ptr, out_ptr, starts_ptr, lens_ptr, seg_slots_ptr, ranks_ptr,
    K, R, k_per_split, slice_rank,
    sx_n, sx_k, sa_s, sa_r, sa_k, so_p, so_n, so_r,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    EXACT: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[split, rows of segment g, r] = x[rows, k-split] @ a[slot_g, r, k-split]^T   (float32)."""
    g = tl.program_id(0)
    mb = tl.program_id(1)
    pid2 = tl.program_id(2)
    num_rb = (R + BLOCK_R - 1) // BLOCK_R
    rb = pid2 % num_rb
    sp = pid2 // num_rb
    seg_len = tl.load(lens_ptr + g)
    m0 = mb * BLOCK_M
    if m0 >= seg_len:
        return
    start = tl.load(starts_ptr + g).to(tl.int64)
    slot = tl.load(seg_slots_ptr + g).to(tl.int64)
    rank = tl.load(ranks_ptr + slot)
    m = m0 + tl.arange(0, BLOCK_M)
    m_ok = m < seg_len
    rows = start + m
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = (r < R) & ((r % slice_rank) < rank)
    k_lo = sp * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    live = tl.reduce(r_ok.to(tl.int32), 0, _SUM)
    k_hi = tl.where(live > 0, k_hi, k_lo)
    x_rows = x_ptr + rows * sx_n
    a_rows = a_ptr + slot * sa_s + r.to(tl.int64) * sa_r
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
    tl.store(out, acc, mask=m_ok[:, None] & (r < R)[None, :])


def _sgmv_expand_kernel(
    y_ptr, t_ptr, b_ptr, starts_ptr, lens_ptr, seg_slots_ptr, ranks_ptr,
    out0, out1, out2, off0, off1, off2, d1, d2, sb_s0, sb_s1, sb_s2, R, splits,
    sy_n, sy_k, st_p, st_n, st_r, sb_n, sb_r,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    EXACT: tl.constexpr, UPCAST: tl.constexpr,
):
    """y[rows of segment g, off_j + n] += t[rows, j * R:j * R + rank] @ b_j[slot_g, n, :rank]^T,
    up to three slices j per launch, laid out on grid axis 2 as in _bgmv_expand_kernel."""
    g = tl.program_id(0)
    mb = tl.program_id(1)
    nb = tl.program_id(2)
    seg_len = tl.load(lens_ptr + g)
    m0 = mb * BLOCK_M
    if m0 >= seg_len:
        return
    slot = tl.load(seg_slots_ptr + g).to(tl.int64)
    rank = tl.minimum(tl.load(ranks_ptr + slot), R)
    if rank <= 0:
        return
    nb0 = (out0 + BLOCK_N - 1) // BLOCK_N
    nb1 = (out1 + BLOCK_N - 1) // BLOCK_N
    j = (nb >= nb0).to(tl.int32) + (nb >= nb0 + nb1).to(tl.int32)
    nb = nb - tl.where(j >= 1, nb0, 0) - tl.where(j >= 2, nb1, 0)
    OUT = tl.where(j == 0, out0, tl.where(j == 1, out1, out2))
    out_offset = tl.where(j == 0, off0, tl.where(j == 1, off1, off2))
    b_base = tl.where(j == 0, 0, tl.where(j == 1, d1, d2)).to(tl.int64)
    b_base += slot * tl.where(j == 0, sb_s0, tl.where(j == 1, sb_s1, sb_s2)).to(tl.int64)
    start = tl.load(starts_ptr + g).to(tl.int64)
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


def _interpreted(device: torch.device) -> bool:
    """CPU tensors always run in the interpreter; CUDA ones too under TRITON_INTERPRET=1."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernel(fn: Any, interpreted: bool) -> Any:
    """The compiled kernel for CUDA tensors, Triton's interpreter for CPU tensors."""
    return InterpretedFunction(fn) if interpreted else triton.jit(fn)


# ---------------------------------------------------------------------------------------------
# Launch configuration.


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Programs that keep every SM busy with a few loads in flight each."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(device: torch.device, programs: int, k: int, block_k: int) -> tuple[int, int]:
    """(splits, k per split): split `in` so that `programs * splits` fills the device.

    On the CPU (the interpreter) two splits when possible, so the tests cover the partial sums.
    """
    k_blocks = triton.cdiv(k, block_k)
    if device.type == "cuda":
        want = triton.cdiv(_target_programs(device), max(1, programs))
    else:
        want = 2
    blocks_per_split = triton.cdiv(k_blocks, max(1, min(want, k_blocks)))
    per_split = blocks_per_split * block_k
    return triton.cdiv(k, per_split), per_split


def _dot_mode(dtype: torch.dtype, interpreted: bool) -> dict[str, bool]:
    """EXACT: float32 tiles use tl.dot with input_precision="ieee" (never tf32). A broadcast
    multiply-and-sum instead came out tf32-sized on an H100 (Triton 3.6 may rewrite it into a
    default-precision dot). 16-bit tiles use tl.dot (tensor cores). UPCAST: the interpreter's dot
    is wrong for bfloat16 operands, so there it multiplies float32 copies."""
    return {"EXACT": dtype == torch.float32, "UPCAST": interpreted}


def _use_sgmv(meta: StepMeta, path: Path) -> bool:
    if path == "auto":
        return meta.max_seg_len >= SGMV_MIN_SEGMENT
    if path not in ("bgmv", "sgmv"):
        raise ValueError(f"path must be 'auto', 'bgmv' or 'sgmv', not {path!r}")
    return path == "sgmv"


def _ranks(meta: StepMeta, device: torch.device) -> torch.Tensor:
    ranks = meta.slot_ranks
    if not isinstance(ranks, torch.Tensor):
        ranks = torch.tensor(list(ranks), dtype=torch.int32)
    return ranks.to(device=device, dtype=torch.int32)


def _check(x: torch.Tensor, w: torch.Tensor, what: str) -> None:
    if x.device != w.device:
        raise ValueError(f"{what}: tensors on {x.device} and {w.device}")
    if w.dtype not in _DTYPES:
        raise ValueError(f"{what}: dtype {w.dtype} is not float32, float16 or bfloat16")
    if w.dim() != 3:
        raise ValueError(f"{what}: weights must be [slots, ., .], got {tuple(w.shape)}")


# ---------------------------------------------------------------------------------------------
# The op.


def shrink(x: torch.Tensor, a: torch.Tensor, meta: StepMeta, *, slice_rank: int | None = None,
           path: Path = "auto", ranks: Any = None) -> torch.Tensor:
    """t [N, R] float32 = a[slot(i)] @ x[i] for every row; rows of slot -1 are 0.

    x: [N, in] (any strides); a: [S, R, in], R <= 256 (several projections' A may be stacked
    along R). `slice_rank`: the width of each stacked slice; when given, rows past
    `meta.slot_ranks[slot]` inside each slice are skipped (they are zero padding). Without it
    every one of the R rows is read, which is correct but reads the padding. `ranks` (the op's
    per-weight table, server/lora/ops.py) is not used: the kernels read `meta.slot_ranks`.
    """
    n, r = x.shape[0], a.shape[1]
    if n == 0 or meta.num_segments == 0:
        _shrink_args(x, a, slice_rank)
        return torch.zeros(n, r, device=x.device, dtype=torch.float32)
    return _sum_splits(_shrink_partials(x, a, meta, slice_rank, path, zero_base=True))


def _shrink_args(x: torch.Tensor, a: torch.Tensor, slice_rank: int | None) -> int:
    """Checks shrink's arguments; returns the slice width."""
    _check(x, a, "shrink")
    n, k = x.shape
    slots, r, k_a = a.shape
    if k_a != k:
        raise ValueError(f"shrink: x has {k} features, a has {k_a}")
    if r > MAX_RANK:
        raise ValueError(f"shrink: rank {r} exceeds {MAX_RANK}")
    width = r if slice_rank is None else int(slice_rank)
    if not 0 < width <= r:
        raise ValueError(f"shrink: slice_rank {slice_rank} outside 1..{r}")
    return width


def _shrink_partials(x: torch.Tensor, a: torch.Tensor, meta: StepMeta, slice_rank: int | None, path: Path,
                     zero_base: bool) -> torch.Tensor:
    """[splits, N, R] float32 partial sums of the shrink over `in` (see `shrink`). Rows of
    segments are always written; other rows are zero only with `zero_base`."""
    width = _shrink_args(x, a, slice_rank)
    if slice_rank is None:  # no rank skipping: every row counts as inside the rank
        ranks = torch.full((a.shape[0],), a.shape[1], device=x.device, dtype=torch.int32)
    else:
        ranks = _ranks(meta, x.device)
    interpreted = _interpreted(x.device)
    if _use_sgmv(meta, path):
        return _sgmv_shrink(x, a, meta, ranks, width, interpreted, zero_base)
    return _bgmv_shrink(x, a, meta, ranks, width, interpreted)


def _sum_splits(partial: torch.Tensor) -> torch.Tensor:
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)


def _bgmv_shrink(x, a, meta, ranks, width, interpreted) -> torch.Tensor:
    """Every row of every split is written (zeros for base rows)."""
    n, k = x.shape
    r = a.shape[1]
    block_r = _pow2(r, 1, 64)
    block_k = _pow2(k, 16, max(32, 4096 // block_r))
    r_blocks = triton.cdiv(r, block_r)
    splits, per_split = _split_k(x.device, n * r_blocks, k, block_k)
    partial = torch.empty(splits, n, r, device=x.device, dtype=torch.float32)
    _kernel(_bgmv_shrink_kernel, interpreted)[(n, r_blocks, splits)](
        x, a, partial, meta.token_slots, ranks,
        k, r, per_split, width,
        *x.stride(), *a.stride(), *partial.stride(),
        BLOCK_R=block_r, BLOCK_K=block_k,
    )
    return partial


def _sgmv_shrink(x, a, meta, ranks, width, interpreted, zero_base) -> torch.Tensor:
    n, k = x.shape
    r = a.shape[1]
    exact = a.dtype == torch.float32
    block_m = _pow2(meta.max_seg_len, 16, 16 if exact else 64)
    block_r = _pow2(r, 16, 64)
    block_k = 16 if exact else 64
    r_blocks = triton.cdiv(r, block_r)
    splits, per_split = _split_k(x.device, (triton.cdiv(n, block_m) + meta.num_segments) * r_blocks, k, block_k)
    alloc = torch.zeros if zero_base else torch.empty  # the kernels skip base rows
    partial = alloc(splits, n, r, device=x.device, dtype=torch.float32)
    grid = (meta.num_segments, triton.cdiv(meta.max_seg_len, block_m), r_blocks * splits)
    _kernel(_sgmv_shrink_kernel, interpreted)[grid](
        x, a, partial, meta.seg_starts, meta.seg_lens, meta.seg_slots, ranks,
        k, r, per_split, width,
        *x.stride(), *a.stride(), *partial.stride(),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, **_dot_mode(a.dtype, interpreted),
    )
    return partial


def expand_(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, meta: StepMeta, out_offset: int = 0, *,
            path: Path = "auto", ranks: Any = None) -> None:
    """y[i, out_offset:out_offset + out] += b[slot(i)] @ t[i] for every row whose slot is not -1.

    y: [N, >= out_offset + out], updated in place (any strides, e.g. a fused q/k/v output);
    t: [N, R] (any float dtype and strides, e.g. a column slice of a stacked shrink output);
    b: [S, out, R] with the adapter scale folded in; columns past `meta.slot_ranks[slot]` are
    skipped (zero padding); `ranks` as in `shrink`.
    """
    _check(y, b, "expand_")
    if t.shape != (y.shape[0], b.shape[2]):
        raise ValueError(f"expand_: t has shape {tuple(t.shape)}, expected {(y.shape[0], b.shape[2])}")
    _expand(y, t, [b], meta, [out_offset], path)


def expand_slices_(y: torch.Tensor, t: torch.Tensor, bs: Sequence[torch.Tensor], meta: StepMeta,
                   offsets: Sequence[int], *, path: Path = "auto") -> None:
    """`expand_` for every slice of a stacked shrink output, in one launch:

        y[:, offsets[j]:offsets[j] + out_j] += bs[j][slot] @ t[:, j * R:(j + 1) * R]   for each j

    t: [N, len(bs) * R]; bs: one to three [S, out_j, R] (q/k/v or gate/up). Same result as one
    `expand_` per slice, with one kernel instead of len(bs): decode steps are bound by the number
    of small launches more than by bytes (see bench/results/gpu-kernels.md).
    """
    if not bs:
        return
    for b in bs:
        _check(y, b, "expand_slices_")
    r = bs[0].shape[2]
    if (t.dim() not in (2, 3) or t.shape[-2:] != (y.shape[0], len(bs) * r) or any(b.shape[2] != r for b in bs)
            or len(bs) != len(offsets)):
        raise ValueError(f"expand_slices_: t {tuple(t.shape)} does not stack {len(bs)} slices of rank {r}")
    same_layout = all(b.stride()[1:] == bs[0].stride()[1:] and b.dtype == bs[0].dtype for b in bs)
    # TRITON_INTERPRET=1 copies each CUDA tensor to the host apart: no element offsets between them.
    if len(bs) > 3 or not same_layout or (y.device.type == "cuda" and _interpreted(y.device)):
        for j, (b, off) in enumerate(zip(bs, offsets)):
            _expand(y, t[..., j * r:(j + 1) * r], [b], meta, [off], path)
        return
    _expand(y, t, list(bs), meta, list(offsets), path)


def lora_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bs: Sequence[torch.Tensor], meta: StepMeta,
          offsets: Sequence[int], *, slice_rank: int | None = None, path: Path = "auto") -> None:
    """shrink + expand_slices_ in two launches, for one projection group (q/k/v, gate/up, o, down):

        y[:, offsets[j]:offsets[j] + out_j] += bs[j][slot] @ (a[slot] @ x)[j * R:(j + 1) * R]

    The shrink's split-K partial sums go straight to the expand, which adds them as it loads
    them, so no reduction kernel runs between the two. a: [S, len(bs) * R, in]; `slice_rank`
    as in `shrink` (R, to skip each slot's rank padding).
    """
    if y.shape[0] == 0 or meta.num_segments == 0:
        _shrink_args(x, a, slice_rank)
        return
    partial = _shrink_partials(x, a, meta, slice_rank, path, zero_base=False)
    expand_slices_(y, partial, bs, meta, offsets, path=path)


def _expand(y: torch.Tensor, t: torch.Tensor, bs: list[torch.Tensor], meta: StepMeta,
            offsets: list[int], path: Path) -> None:
    """One launch for 1-3 slices sharing R, dtype and B's inner strides. t: [N, slices * R], or
    [splits, N, slices * R] partial sums that the kernel adds up as it loads them."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    n, r = y.shape[0], bs[0].shape[2]
    if r > MAX_RANK:
        raise ValueError(f"expand_: rank {r} exceeds {MAX_RANK}")
    for b, off in zip(bs, offsets):
        if off < 0 or off + b.shape[1] > y.shape[1]:
            raise ValueError(f"expand_: columns {off}..{off + b.shape[1]} outside y's {y.shape[1]}")
    if n == 0 or meta.num_segments == 0:
        return
    b0 = bs[0]
    pad = bs + [b0] * (3 - len(bs))
    outs = [b.shape[1] for b in bs] + [0] * (3 - len(bs))
    offs = list(offsets) + [0] * (3 - len(bs))
    # Slices 1 and 2 as element offsets from slice 0 (one pointer argument serves all three).
    deltas = [(b.data_ptr() - b0.data_ptr()) // b0.element_size() for b in pad[1:]]
    slice_args = (*outs, *offs, *deltas, *(b.stride(0) for b in pad), r, t.shape[0],
                  *y.stride(), *t.stride(), *b0.stride()[1:])
    ranks = _ranks(meta, y.device)
    interpreted = _interpreted(y.device)
    if _use_sgmv(meta, path):
        exact = b0.dtype == torch.float32
        block_m = _pow2(meta.max_seg_len, 16, 16 if exact else 64)
        block_n = 64 if exact else 128
        block_r = 16 if exact else _pow2(r, 16, 64)
        blocks = sum(triton.cdiv(out, block_n) for out in outs)
        grid = (meta.num_segments, triton.cdiv(meta.max_seg_len, block_m), blocks)
        _kernel(_sgmv_expand_kernel, interpreted)[grid](
            y, t, b0, meta.seg_starts, meta.seg_lens, meta.seg_slots, ranks, *slice_args,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, **_dot_mode(b0.dtype, interpreted),
        )
        return
    block_r = _pow2(r, 1, 64)
    block_n = _pow2(max(outs), 16, max(32, 4096 // block_r))
    blocks = sum(triton.cdiv(out, block_n) for out in outs)
    _kernel(_bgmv_expand_kernel, interpreted)[(n, blocks)](
        y, t, b0, meta.token_slots, ranks, *slice_args,
        BLOCK_N=block_n, BLOCK_R=block_r,
    )
