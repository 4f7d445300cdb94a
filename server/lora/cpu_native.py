"""The compiled CPU backend of the LoRA op: rank-aware kernels over each slot's rows.

Activations are float32; the weights float32 or bfloat16 (read as they lie, widened in registers).

Same contract as the reference in server/lora/ops.py (`shrink` returns a dense `t [N, R]`, 0 on
rows of the base model), computed from its plan of the step (`SlotPlan`, `meta.plan`; `plan_slots`), the
CSR of every LoRA row per slot, in
ONE kernel call per weight for the whole step, however many adapters and prefill chunks it holds
(loraplex::shrink_slots / expand_slots, or shrink_pool / expand_pool; server/native/lora_kernels.cpp):

    decode rows (1-2 per slot)  -> each slot's A and B streamed once from memory, up to its rank
    prefill chunks              -> register tiles of rows over the slot's A and B, held in cache

Why a kernel of our own: with one or two rows per adapter the LoRA op reads every adapter's
weights once per step and does almost no arithmetic, so it is bound by memory traffic; torch's
batched matmul over the padded slots reached about half the machine's read bandwidth on these
shapes and read the rank padding too (a batch of rank 8-64 adapters all at rank 64). For prefill,
one matmul per adapter segment per module was some 13,000 small calls for a wave of 64 prompts
on the default model, each a dispatch from Python and a copy of its result.

The weights are either per-slot buffers padded to the max rank (`a [S, R', in]`, `b [S, out, R]`) or
blocks in the adapter pool (`PooledWeight`, server/lora/pool.py: each adapter's weights at their own
rank, found at per-slot offsets), which the engine uses; the two compute the same.

server/native/loader.py builds and loads them (`load_kernels`); when it cannot, the caller uses the
batched-matmul backend (server/lora/cpu_ops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.lora.pool import PooledWeight
from server.lora.ranks import RankTable
from server.lora.step import LoraStepMeta, ToDevice


@dataclass(frozen=True, eq=False)
class SlotPlan:
    """Every LoRA row of slots `[0, S')` as CSR.

    `ptr [S' + 1]` int64, `rows [n]` int64: slot s owns packed rows `rows[ptr[s]:ptr[s+1]]`, its
    decode rows first, then its prefill rows, each in packed order (both None when no row of the
    step uses an adapter). The kernels cut a slot's rows into units and pick their loop by the
    unit's length: one or two rows stream the weights from memory, more go over them in tiles.
    """

    ptr: torch.Tensor | None
    rows: torch.Tensor | None


def plan_slots(slots: list[int], num_decode: int, to_device: ToDevice) -> SlotPlan:
    by_slot: dict[int, list[int]] = {}
    for row, s in enumerate(slots):
        if s >= 0:
            by_slot.setdefault(s, []).append(row)
    if not by_slot:
        return SlotPlan(None, None)
    ptr, rows = [0], []
    for s in range(max(by_slot) + 1):
        rows += by_slot.get(s, [])
        ptr.append(len(rows))
    return SlotPlan(to_device(ptr, torch.int64), to_device(rows, torch.int64))


def plan_of(meta: LoraStepMeta) -> SlotPlan:
    """The step's plan for these kernels (a `TypeError` if another backend's was built)."""
    if not isinstance(meta.plan, SlotPlan):
        raise TypeError(f"the compiled LoRA kernels need a step planned for them, not {type(meta.plan).__name__}")
    return meta.plan


def _ranks(meta: LoraStepMeta, width: int) -> torch.Tensor:
    """The slots' ranks when the buffers are `width` wide per member (meta.max_rank), else `width`
    for every slot: the padding is then read, and the result is the same."""
    if meta.max_rank == width:
        return meta.slot_ranks
    return torch.full((meta.slot_ranks.numel(),), width, dtype=torch.int32, device=meta.slot_ranks.device)


def shrink(x: torch.Tensor, a: torch.Tensor | PooledWeight, meta: LoraStepMeta, *,
           ranks: RankTable | None = None) -> torch.Tensor:
    """t [N, R'] = a[slot] @ x per row (0 on base rows); `x [N, in]`, `a [S, R', in]` contiguous in `in`."""
    if isinstance(a, PooledWeight):
        return _shrink_pooled(x, a, meta, ranks)
    t = x.new_zeros(x.shape[0], a.shape[1])
    plan = plan_of(meta)
    stacked = meta.max_rank and a.shape[1] % meta.max_rank == 0  # members of max_rank columns each
    members = a.shape[1] // meta.max_rank if stacked else 1
    width = a.shape[1] // members
    if plan.ptr is not None:
        a = a if a.stride(2) == 1 else a.contiguous()  # the layers' buffers already are; a copy otherwise
        table = _ranks(meta, width) if ranks is None else ranks.table
        torch.ops.loraplex.shrink_slots(x, a, plan.ptr, plan.rows, table, members, t)
    return t


def expand_(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor | PooledWeight, meta: LoraStepMeta,
            out_offset: int = 0, *, ranks: RankTable | None = None) -> None:
    """y[:, out_offset:out_offset+out] += b[slot] @ t per row; `b [S, out, R]` with `out` contiguous."""
    if isinstance(b, PooledWeight):
        _expand_pooled(y[:, out_offset:out_offset + b.row], t, b, meta, ranks)
        return
    out = y[:, out_offset:out_offset + b.shape[1]]
    plan = plan_of(meta)
    width = b.shape[2]
    if plan.ptr is not None:
        b = b if b.stride(1) == 1 else b.transpose(1, 2).contiguous().transpose(1, 2)  # as the layers keep it
        table = _ranks(meta, width) if ranks is None else ranks.table
        torch.ops.loraplex.expand_slots(out, t, b, plan.ptr, plan.rows, table)


def _pool_ranks(ranks: RankTable | None) -> RankTable:
    """A pooled weight's blocks hold exactly each slot's rank: the op needs the per-member table."""
    if ranks is None:
        raise ValueError("the pooled LoRA op needs each member's ranks (the layers' RankTable)")
    return ranks


def _shrink_pooled(x: torch.Tensor, a: PooledWeight, meta: LoraStepMeta, ranks: RankTable | None) -> torch.Tensor:
    ranks = _pool_ranks(ranks)
    plan = plan_of(meta)
    # Rows of the base model stay 0; the kernel writes every LoRA row's columns (zeros past its ranks).
    t = x.new_zeros(x.shape[0], a.members * a.width)
    if plan.ptr is not None:
        torch.ops.loraplex.shrink_pool(x, a.pool.data, a.pool.base, a.rel, plan.ptr, plan.rows, ranks.table,
                                       a.members, a.width, t)
    return t


def _expand_pooled(out: torch.Tensor, t: torch.Tensor, b: PooledWeight, meta: LoraStepMeta,
                   ranks: RankTable | None) -> None:
    ranks = _pool_ranks(ranks)
    plan = plan_of(meta)
    if plan.ptr is not None:
        torch.ops.loraplex.expand_pool(out, t, b.pool.data, b.pool.base, b.rel, plan.ptr, plan.rows, ranks.table,
                                       b.width)
