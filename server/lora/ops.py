"""The batched multi-adapter LoRA op: two primitives over per-slot stacked buffers.

    shrink(x [N, in], a [S, R, in], meta, ranks=None) -> t [N, R]
        t[i] = a[slot(i)] @ x[i]; rows with slot -1 are 0
    expand_(y [N, out_total], t [N, R], b [S, out, R], meta, out_offset, ranks=None) -> None
        y[i, out_offset:out_offset+out] += b[slot(i)] @ t[i]   (slot(i) != -1)

`ranks` (a `RankTable`, server/lora/ranks.py) gives each slot's rank in this very weight, per
stacked member (`[members, S]`; one member for an expand): 0 where the slot's adapter does not
target it. Rows of A and columns of B at or past it are zero, so a backend may skip them; the
compiled CPU kernels do. Without it, `meta.slot_ranks` holds for every member.

`meta` is the step's `LoraStepMeta` (server/lora/step.py): the common core and the plan that this
backend's `plan` built (each backend reads its own plan, and refuses another's). `x`, `t`, `y` may be strided views
(q/k/v share one shrink with A stacked to [S, 3R, in]; each expand reads its columns of t,
`backend.columns(t, cols)`). A is zero-padded past each slot's rank and B carries the adapter's
scale. `a` and `b` may be bfloat16 beside float32 `x` (the slots' `--lora-dtype`): the op
computes in `x`'s dtype. What `shrink` returns is the backend's own: a dense `t [N, R]` for the
reference and the Triton kernels, a `CpuShrunk` (the same values in the layouts its expands
read) on the CPU.

Backends, picked per device and dtype by `backend_for`: on the CPU in float32 the compiled
kernels (`server.lora.cpu_native`: each slot's rows through a rank-aware mat-vec that streams its
weights once, matmuls for prefill chunks), else the batched-matmul CPU path (`server.lora.cpu_ops`:
one padded batched matmul over the dense prefix of used slots for decode rows, one matmul per
segment for prefill chunks); both read plans built on the host, so nothing syncs with the host.
Triton kernels from `server.lora.triton_ops` on CUDA when importable (`triton_backend`: over the adapter
pool at each slot's own rank), and the torch reference
(a per-token gather + bmm, BGMV) everywhere else.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Any, NamedTuple, Protocol, get_args

import torch

from server.config import CpuLoraKernel
from server.lora import cpu_native, cpu_ops
from server.lora.ranks import RankTable
from server.lora.step import LoraStepMeta, Planner, no_plan
from server.lora.triton_plan import plan_segments
from server.native.loader import load_kernels


# The weights `a` / `b` a backend takes: padded per-slot tensors, or `PooledWeight`s for a pooled backend
# (`Backend.pooled`); the layers hold whichever their backend reads, so the op's signature leaves them open.
class ShrinkFn(Protocol):
    def __call__(self, x: torch.Tensor, a: Any, meta: LoraStepMeta, *,
                 ranks: RankTable | None = None) -> Any: ...


class ExpandFn(Protocol):
    def __call__(self, y: torch.Tensor, t: Any, b: Any, meta: LoraStepMeta,
                 out_offset: int = 0, *, ranks: RankTable | None = None) -> None: ...


def dense_columns(t: torch.Tensor, cols: slice) -> torch.Tensor:
    return t[:, cols]


def dense_as_is(t: torch.Tensor, meta: LoraStepMeta) -> torch.Tensor:
    return t


class Backend(NamedTuple):
    name: str
    shrink: ShrinkFn
    expand_: ExpandFn
    columns: Any = dense_columns  # (shrink output, slice of the stacked rank dim) -> that member's part
    from_dense: Any = dense_as_is  # (dense t [N, R], meta) -> the form `expand_` takes (the embedding's gather)
    # Storage the backend reads fastest (the op's views `a [S, R, in]`, `b [S, out, R]` are taken of it):
    a_storage_in_major: bool = False  # A kept as [S, in, R] (else [S, R, in])
    b_storage_rank_major: bool = False  # B kept as [S, R, out] (else [S, out, R])
    # The weights live in the adapter pool (server/lora/pool.py) at each adapter's own rank, not in
    # per-slot buffers padded to the max rank; the layers hand the op `PooledWeight`s.
    pooled: bool = False
    # Builds this backend's own plan of a step (`LoraStepMeta.plan`) from the step's host ints.
    plan: Planner = no_plan


# Reference (any device) ----------------------------------------------------------------------------

def shrink_reference(x: torch.Tensor, a: torch.Tensor, meta: LoraStepMeta, *,
                     ranks: RankTable | None = None) -> torch.Tensor:
    """BGMV: gather each token's A and run one batched mat-vec; `[N, R]` (reads the zeros too)."""
    slots = meta.token_slots
    t = torch.bmm(x.unsqueeze(1), a[slots.clamp(min=0)].to(x.dtype).transpose(1, 2)).squeeze(1)
    return t * (slots >= 0).unsqueeze(1).to(t.dtype)


def expand_reference_(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, meta: LoraStepMeta,
                      out_offset: int = 0, *, ranks: RankTable | None = None) -> None:
    slots = meta.token_slots
    delta = torch.bmm(t.unsqueeze(1), b[slots.clamp(min=0)].to(t.dtype).transpose(1, 2)).squeeze(1)
    y[:, out_offset:out_offset + b.shape[1]] += delta * (slots >= 0).unsqueeze(1).to(delta.dtype)


# Dispatch ------------------------------------------------------------------------------------------

REFERENCE = Backend("reference", shrink_reference, expand_reference_)
CPU = Backend("cpu", cpu_ops.shrink, cpu_ops.expand_, cpu_ops.CpuShrunk.columns, cpu_ops.from_dense,
              a_storage_in_major=True, b_storage_rank_major=True, plan=cpu_ops.plan_padded)
CPU_KERNELS = Backend("cpu-kernels", cpu_native.shrink, cpu_native.expand_, b_storage_rank_major=True, pooled=True,
                      plan=cpu_native.plan_slots)
CPU_LORA_KERNELS = get_args(CpuLoraKernel)  # the `--cpu-lora-kernel` choices


@lru_cache(maxsize=1)
def _triton_ops() -> ModuleType | None:
    """server.lora.triton_ops, imported on first use on CUDA (it needs triton); None if unavailable."""
    try:
        from server.lora import triton_ops
    except ImportError:
        return None
    return triton_ops


def backend_for(device: torch.device, dtype: torch.dtype = torch.float32,
                cpu_kernel: CpuLoraKernel = "auto") -> Backend:
    """The op implementation for `dtype` tensors on `device`.

    `cpu_kernel`: "auto" uses the compiled CPU kernels when they build (float32), "compiled"
    requires them (RuntimeError otherwise), "bmm" never builds them."""
    if cpu_kernel not in CPU_LORA_KERNELS:
        raise ValueError(f"cpu_kernel must be one of {CPU_LORA_KERNELS}, got {cpu_kernel!r}")
    if device.type == "cpu":
        if cpu_kernel == "bmm" or dtype != torch.float32:
            return CPU
        if load_kernels():
            return CPU_KERNELS
        if cpu_kernel == "compiled":
            raise RuntimeError("--cpu-lora-kernel compiled: the CPU LoRA kernels could not be built (see the log)")
        return CPU
    if device.type == "cuda":
        triton = triton_backend()
        if triton is not None:
            return triton
    return REFERENCE


def triton_backend() -> Backend | None:
    """The Triton kernels over the adapter pool, each slot read at its own rank (the layers' rank tables): one
    shrink per group whose split-K partial sums go to each member's expand as they are (`shrink_partials`);
    None without triton. CUDA tensors run compiled, CPU tensors in Triton's interpreter (the tests)."""
    ops = _triton_ops()
    if ops is None:
        return None
    return Backend("triton", ops.shrink_partials, ops.expand_, ops.partial_columns, pooled=True, plan=plan_segments)


def add_lora_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, meta: LoraStepMeta,
              backend: Backend | None = None) -> None:
    """y += b[slot] @ a[slot] @ x per token: one shrink and one expand (a single, unstacked projection)."""
    backend = backend or backend_for(x.device)
    backend.expand_(y, backend.shrink(x, a, meta), b, meta, 0)
