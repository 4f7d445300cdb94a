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
- SGMV (prefill): one program per (segment, row block, output block) over the step's segments
  (`meta.plan`, server/lora/triton_plan.py: contiguous runs of one slot); the weight tile is read once
  per row block and multiplied with `tl.dot`. Programs past a segment's end return at once.

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
import types
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from server.lora.pool import PooledWeight
from server.lora.triton_kernels import (
    _bgmv_expand_kernel,
    _bgmv_shrink_kernel,
    _sgmv_expand_kernel,
    _sgmv_shrink_kernel,
)
from server.lora.triton_plan import SegmentPlan
from server.lora.triton_weights import Weights, padded_expand, padded_shrink, pooled_expand, pooled_shrink

__all__ = ["MAX_RANK", "SGMV_MIN_SEGMENT", "expand_", "expand_slices_", "lora_", "partial_columns", "shrink",
           "shrink_partials"]

MAX_RANK = 256
# Steps whose longest segment has at least this many tokens take the segment (SGMV) kernels.
SGMV_MIN_SEGMENT = 4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Path = Literal["auto", "bgmv", "sgmv"]


class StepMeta(Protocol):
    """What the kernels read from the step context (server/lora/step.py: LoraStepMeta)."""

    token_slots: torch.Tensor  # [N] int32/int64 on the device, -1 = base
    slot_ranks: torch.Tensor  # [S] int32, 0 for an empty slot
    plan: Any  # a SegmentPlan (server/lora/triton_plan.py: the runs of one slot)


def _segments(meta: StepMeta) -> SegmentPlan:
    if not isinstance(meta.plan, SegmentPlan):
        raise TypeError(f"the Triton LoRA op needs a step planned for it (plan_segments), not {type(meta.plan).__name__}")
    return meta.plan


def _interpreted(device: torch.device) -> bool:
    """CPU tensors always run in the interpreter; CUDA ones too under TRITON_INTERPRET=1."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernel(fn: Any, interpreted: bool) -> Any:
    """The compiled kernel for CUDA tensors, Triton's interpreter for CPU tensors."""
    return InterpretedFunction(_with_interpreted_helpers(fn)) if interpreted else triton.jit(fn)


def _with_interpreted_helpers(fn: Any) -> Any:
    """`fn` seeing interpreted copies of the jitted helpers of its own module: the interpreter cannot call a
    jitted function (triton's own, such as the sum's combine function, it maps itself)."""
    helpers = {name: InterpretedFunction(value.fn) for name, value in fn.__globals__.items()
               if isinstance(value, JITFunction) and value.fn.__module__ == fn.__module__}
    return types.FunctionType(fn.__code__, {**fn.__globals__, **helpers}, fn.__name__, fn.__defaults__,
                              fn.__closure__)


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
        return _segments(meta).max_seg_len >= SGMV_MIN_SEGMENT
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


def shrink(x: torch.Tensor, a: torch.Tensor | PooledWeight, meta: StepMeta, *, slice_rank: int | None = None,
           path: Path = "auto", ranks: Any = None) -> torch.Tensor:
    """t [N, R] float32 = a[slot(i)] @ x[i] for every row; rows of slot -1 are 0.

    x: [N, in] (any strides); a: [S, R, in], R <= 256 (several projections' A may be stacked
    along R), or a `PooledWeight` (each adapter's blocks at their own rank in the adapter pool,
    R = members * width; `ranks`, the layers' per-member RankTable, is then required and read).
    `slice_rank`: the width of each stacked slice of a padded `a`; when given, rows past
    `meta.slot_ranks[slot]` inside each slice are skipped (they are zero padding). Without it
    every one of the R rows is read, which is correct but reads the padding.
    """
    weights = _shrink_weights(x, a, meta, slice_rank, ranks)
    n = x.shape[0]
    if n == 0 or _segments(meta).num_segments == 0:
        return torch.zeros(n, weights.rows, device=x.device, dtype=torch.float32)
    return _sum_splits(_shrink_partials(x, weights, meta, path, zero_base=True))


def shrink_partials(x: torch.Tensor, a: torch.Tensor | PooledWeight, meta: StepMeta, *,
                    slice_rank: int | None = None, path: Path = "auto", ranks: Any = None) -> torch.Tensor:
    """The group op's shrink (the first launch of `lora_`): `[splits, N, R]` float32 partial sums of `shrink`
    over `in`, which `expand_` and `expand_slices_` add up as they load them, so no reduction kernel runs
    between the two; rows of slot -1 may hold anything (every expand skips them). Arguments as `shrink`'s:
    over the adapter pool (a `PooledWeight` with the layers' `ranks`) every slot is read at its own rank."""
    weights = _shrink_weights(x, a, meta, slice_rank, ranks)
    if x.shape[0] == 0 or _segments(meta).num_segments == 0:
        return torch.zeros(1, x.shape[0], weights.rows, device=x.device, dtype=torch.float32)
    return _shrink_partials(x, weights, meta, path, zero_base=False)


def partial_columns(t: torch.Tensor, cols: slice) -> torch.Tensor:
    """One member's columns of a stacked shrink output, partial sums (`[splits, N, R]`) or dense (`[N, R]`)."""
    return t[..., cols]


def _shrink_weights(x: torch.Tensor, a: torch.Tensor | PooledWeight, meta: StepMeta, slice_rank: int | None,
                    ranks: Any) -> Weights:
    """Checks shrink's arguments; returns where the kernels find A."""
    if isinstance(a, PooledWeight):
        _check(x, a.pool.data.unsqueeze(0).unsqueeze(0), "shrink")
        if a.row != x.shape[1] or a.members * a.width > MAX_RANK:
            raise ValueError(f"shrink: x has {x.shape[1]} features, the pooled A {a.row} (rank {a.width})")
        return pooled_shrink(a, ranks)
    width = _shrink_args(x, a, slice_rank)
    if slice_rank is None:  # no rank skipping: every row counts as inside the rank
        slot_ranks = torch.full((a.shape[0],), a.shape[1], device=x.device, dtype=torch.int32)
    else:
        slot_ranks = _ranks(meta, x.device)
    return padded_shrink(a, width, slot_ranks)


def _shrink_args(x: torch.Tensor, a: torch.Tensor, slice_rank: int | None) -> int:
    """Checks a padded shrink's arguments; returns the slice width."""
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


def _shrink_partials(x: torch.Tensor, w: Weights, meta: StepMeta, path: Path, zero_base: bool) -> torch.Tensor:
    """[splits, N, R] float32 partial sums of the shrink over `in` (see `shrink`). Rows of
    segments are always written; other rows are zero only with `zero_base`."""
    interpreted = _interpreted(x.device)
    if _use_sgmv(meta, path):
        return _sgmv_shrink(x, w, meta, interpreted, zero_base)
    return _bgmv_shrink(x, w, meta, interpreted)


def _sum_splits(partial: torch.Tensor) -> torch.Tensor:
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)


def _bgmv_shrink(x: torch.Tensor, w: Weights, meta: StepMeta, interpreted: bool) -> torch.Tensor:
    """Every row of every split is written (zeros for base rows)."""
    n, k = x.shape
    r = w.rows
    block_r = _pow2(r, 1, 64)
    block_k = _pow2(k, 16, max(32, 4096 // block_r))
    r_blocks = triton.cdiv(r, block_r)
    splits, per_split = _split_k(x.device, n * r_blocks, k, block_k)
    partial = torch.empty(splits, n, r, device=x.device, dtype=torch.float32)
    _kernel(_bgmv_shrink_kernel, interpreted)[(n, r_blocks, splits)](
        x, w.data, partial, meta.token_slots, w.ranks, w.off,
        k, r, per_split, w.width, w.slots, w.rank_g_stride,
        *x.stride(), w.row_stride, w.elem_stride, *partial.stride(),
        BLOCK_R=block_r, BLOCK_K=block_k,
    )
    return partial


def _sgmv_shrink(x: torch.Tensor, w: Weights, meta: StepMeta, interpreted: bool, zero_base: bool) -> torch.Tensor:
    n, k = x.shape
    r = w.rows
    seg = _segments(meta)
    exact = w.data.dtype == torch.float32
    block_m = _pow2(seg.max_seg_len, 16, 16 if exact else 64)
    block_r = _pow2(r, 16, 64)
    block_k = 16 if exact else 64
    r_blocks = triton.cdiv(r, block_r)
    splits, per_split = _split_k(x.device, (triton.cdiv(n, block_m) + seg.num_segments) * r_blocks, k, block_k)
    alloc = torch.zeros if zero_base else torch.empty  # the kernels skip base rows
    partial = alloc(splits, n, r, device=x.device, dtype=torch.float32)
    grid = (seg.num_segments, triton.cdiv(seg.max_seg_len, block_m), r_blocks * splits)
    _kernel(_sgmv_shrink_kernel, interpreted)[grid](
        x, w.data, partial, seg.starts, seg.lens, seg.slots, w.ranks, w.off,
        k, r, per_split, w.width, w.slots, w.rank_g_stride,
        *x.stride(), w.row_stride, w.elem_stride, *partial.stride(),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, **_dot_mode(w.data.dtype, interpreted),
    )
    return partial


def expand_(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor | PooledWeight, meta: StepMeta, out_offset: int = 0,
            *, path: Path = "auto", ranks: Any = None) -> None:
    """y[i, out_offset:out_offset + out] += b[slot(i)] @ t[i] for every row whose slot is not -1.

    y: [N, >= out_offset + out], updated in place (any strides, e.g. a fused q/k/v output);
    t: [N, R] (any float dtype and strides, e.g. a column slice of a stacked shrink output), or
    `[splits, N, R]` partial sums from `shrink_partials`, added up as they are loaded;
    b: [S, out, R] with the adapter scale folded in, columns past `meta.slot_ranks[slot]` skipped
    (zero padding); or a `PooledWeight` (rank-major blocks in the adapter pool, R its width), read up
    to each slot's rank in `ranks` (the member's RankTable, required then).
    """
    if isinstance(b, PooledWeight):
        _check(y, b.pool.data.unsqueeze(0).unsqueeze(0), "expand_")
        if t.dim() not in (2, 3) or t.shape[-2:] != (y.shape[0], b.width):
            raise ValueError(f"expand_: t has shape {tuple(t.shape)}, expected {(y.shape[0], b.width)}")
        _launch_expand(y, t, pooled_expand(b, ranks), [b.row], [out_offset], meta, path)
        return
    _check(y, b, "expand_")
    if t.dim() not in (2, 3) or t.shape[-2:] != (y.shape[0], b.shape[2]):
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
    partial = shrink_partials(x, a, meta, slice_rank=slice_rank, path=path)
    expand_slices_(y, partial, bs, meta, offsets, path=path)


def _expand(y: torch.Tensor, t: torch.Tensor, bs: list[torch.Tensor], meta: StepMeta,
            offsets: list[int], path: Path) -> None:
    """One launch for 1-3 padded slices sharing R, dtype and B's inner strides."""
    r = bs[0].shape[2]
    if r > MAX_RANK:
        raise ValueError(f"expand_: rank {r} exceeds {MAX_RANK}")
    for b, off in zip(bs, offsets):
        if off < 0 or off + b.shape[1] > y.shape[1]:
            raise ValueError(f"expand_: columns {off}..{off + b.shape[1]} outside y's {y.shape[1]}")
    if y.shape[0] == 0 or _segments(meta).num_segments == 0:
        return
    _launch_expand(y, t, padded_expand(bs, _ranks(meta, y.device)), [b.shape[1] for b in bs], offsets, meta, path)


def _launch_expand(y: torch.Tensor, t: torch.Tensor, w: Weights, outs: list[int], offsets: list[int],
                   meta: StepMeta, path: Path) -> None:
    """The expand kernel over `w`'s 1-3 slices (`outs` wide, at `offsets` in y). t: [N, slices * R], or
    [splits, N, slices * R] partial sums that the kernel adds up as it loads them."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    n, r = y.shape[0], w.width
    if n == 0 or _segments(meta).num_segments == 0:
        return
    outs = outs + [0] * (3 - len(outs))
    offs = list(offsets) + [0] * (3 - len(offsets))
    slice_args = (*outs, *offs, w.slots, w.rank_g_stride, r, t.shape[0],
                  *y.stride(), *t.stride(), w.elem_stride, w.row_stride)
    interpreted = _interpreted(y.device)
    dtype = w.data.dtype
    if _use_sgmv(meta, path):
        seg = _segments(meta)
        exact = dtype == torch.float32
        block_m = _pow2(seg.max_seg_len, 16, 16 if exact else 64)
        block_n = 64 if exact else 128
        block_r = 16 if exact else _pow2(r, 16, 64)
        blocks = sum(triton.cdiv(out, block_n) for out in outs)
        grid = (seg.num_segments, triton.cdiv(seg.max_seg_len, block_m), blocks)
        _kernel(_sgmv_expand_kernel, interpreted)[grid](
            y, t, w.data, seg.starts, seg.lens, seg.slots, w.ranks, w.off, *slice_args,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, **_dot_mode(dtype, interpreted),
        )
        return
    block_r = _pow2(r, 1, 64)
    block_n = _pow2(max(outs), 16, max(32, 4096 // block_r))
    blocks = sum(triton.cdiv(out, block_n) for out in outs)
    _kernel(_bgmv_expand_kernel, interpreted)[(n, blocks)](
        y, t, w.data, meta.token_slots, w.ranks, w.off, *slice_args,
        BLOCK_N=block_n, BLOCK_R=block_r,
    )
