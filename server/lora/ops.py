"""The batched multi-adapter LoRA op: two primitives over per-slot stacked buffers.

    shrink(x [N, in], a [S, R, in], meta) -> t [N, R]
        t[i] = a[slot(i)] @ x[i]; rows with slot -1 are 0
    expand_(y [N, out_total], t [N, R], b [S, out, R], meta, out_offset) -> None
        y[i, out_offset:out_offset+out] += b[slot(i)] @ t[i]   (slot(i) != -1)

`meta` is the step's `LoraStepMeta` (server/lora/step.py). `x`, `t`, `y` may be strided views
(q/k/v share one shrink with A stacked to [S, 3R, in]; each expand reads a column slice of t).
A is zero-padded past each slot's rank and B carries the adapter's scale.

Backends, picked per device by `backend_for`: the CPU fast path (one padded batched matmul over
the dense prefix of used slots for decode rows, one matmul per segment for prefill chunks; the
padding layout comes from the host plan in `meta`, so nothing here syncs with the host), Triton
kernels from `server.lora.triton_ops` on CUDA when importable, and the torch reference (a
per-token gather + bmm, BGMV) everywhere else.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import NamedTuple, Protocol

import torch

from server.lora.step import LoraStepMeta


class ShrinkFn(Protocol):
    def __call__(self, x: torch.Tensor, a: torch.Tensor, meta: LoraStepMeta) -> torch.Tensor: ...


class ExpandFn(Protocol):
    def __call__(self, y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, meta: LoraStepMeta,
                 out_offset: int = 0) -> None: ...


class Backend(NamedTuple):
    name: str
    shrink: ShrinkFn
    expand_: ExpandFn


# Reference (any device) ----------------------------------------------------------------------------

def shrink_reference(x: torch.Tensor, a: torch.Tensor, meta: LoraStepMeta) -> torch.Tensor:
    """BGMV: gather each token's A and run one batched mat-vec; `[N, R]`."""
    slots = meta.token_slots
    t = torch.bmm(x.unsqueeze(1), a[slots.clamp(min=0)].transpose(1, 2)).squeeze(1)
    return t * (slots >= 0).unsqueeze(1).to(t.dtype)


def expand_reference_(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, meta: LoraStepMeta,
                      out_offset: int = 0) -> None:
    slots = meta.token_slots
    delta = torch.bmm(t.unsqueeze(1), b[slots.clamp(min=0)].transpose(1, 2)).squeeze(1)
    y[:, out_offset:out_offset + b.shape[1]] += delta * (slots >= 0).unsqueeze(1).to(delta.dtype)


# CPU fast path -------------------------------------------------------------------------------------

def _padded(rows: torch.Tensor, meta: LoraStepMeta) -> torch.Tensor:
    """The decode rows of `rows [N, D]` in the `[pad_slots, pad_width, D]` padded layout."""
    slots, width, count = meta.pad_slots, meta.pad_width, meta.pad_count
    picked = rows[:count] if meta.pad_rows is None else rows.index_select(0, meta.pad_rows)
    if meta.pad_index is not None:
        picked = rows.new_zeros(slots * width, rows.shape[1]).index_copy_(0, meta.pad_index, picked)
    return picked.reshape(slots, width, -1)


def shrink_cpu(x: torch.Tensor, a: torch.Tensor, meta: LoraStepMeta) -> torch.Tensor:
    """Decode rows: one bmm over slots [0, pad_slots); segments: one mm each."""
    t = x.new_zeros(x.shape[0], a.shape[1])
    if meta.pad_count:
        a_t = a[:meta.pad_slots].transpose(1, 2)
        if meta.pad_rows is None and meta.pad_index is None:
            torch.bmm(_padded(x, meta), a_t, out=t[:meta.pad_count].view(meta.pad_slots, meta.pad_width, -1))
        else:
            padded = torch.bmm(_padded(x, meta), a_t).view(-1, a.shape[1])
            if meta.pad_index is not None:
                padded = padded.index_select(0, meta.pad_index)
            if meta.pad_rows is None:
                t[:meta.pad_count] = padded
            else:
                t.index_copy_(0, meta.pad_rows, padded)
    for start, length, slot in meta.host_segments:
        torch.mm(x[start:start + length], a[slot].t(), out=t[start:start + length])
    return t


def expand_cpu_(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, meta: LoraStepMeta, out_offset: int = 0) -> None:
    out = y[:, out_offset:out_offset + b.shape[1]]
    if meta.pad_count:
        b_t = b[:meta.pad_slots].transpose(1, 2)
        if meta.pad_rows is None and meta.pad_index is None:
            out[:meta.pad_count].view(meta.pad_slots, meta.pad_width, -1).baddbmm_(_padded(t, meta), b_t)
        else:
            delta = torch.bmm(_padded(t, meta), b_t).view(-1, b.shape[1])
            if meta.pad_index is not None:
                delta = delta.index_select(0, meta.pad_index)
            if meta.pad_rows is None:
                out[:meta.pad_count] += delta
            else:
                # index_put_ with unique rows: index_add_ is far slower on the CPU.
                out.index_put_((meta.pad_rows,), delta, accumulate=True)
    for start, length, slot in meta.host_segments:
        out[start:start + length].addmm_(t[start:start + length], b[slot].t())


# Dispatch ------------------------------------------------------------------------------------------

REFERENCE = Backend("reference", shrink_reference, expand_reference_)
CPU = Backend("cpu", shrink_cpu, expand_cpu_)


@lru_cache(maxsize=1)
def _triton_ops() -> ModuleType | None:
    """server.lora.triton_ops, imported on first use on CUDA (it needs triton); None if unavailable."""
    try:
        from server.lora import triton_ops
    except ImportError:
        return None
    return triton_ops


def backend_for(device: torch.device) -> Backend:
    """The op implementation for tensors on `device`."""
    if device.type == "cpu":
        return CPU
    if device.type == "cuda":
        ops = _triton_ops()
        if ops is not None:
            return Backend("triton", ops.shrink, ops.expand_)
    return REFERENCE


def add_lora_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, meta: LoraStepMeta,
              backend: Backend | None = None) -> None:
    """y += b[slot] @ a[slot] @ x per token: one shrink and one expand (a single, unstacked projection)."""
    backend = backend or backend_for(x.device)
    backend.expand_(y, backend.shrink(x, a, meta), b, meta, 0)
