"""The compiled CPU backend of the LoRA op: rank-aware kernels over each slot's rows.

Activations are float32; the weights float32 or bfloat16 (read as they lie, widened in registers).

Same contract as the reference in server/lora/ops.py (`shrink` returns a dense `t [N, R]`, 0 on
rows of the base model), computed from `meta.slot_plan`:

    decode rows in CSR per slot  -> loraplex::shrink_slots / expand_slots (server/native/lora_kernels.cpp):
                                    each slot's A and B streamed once, only up to its adapter's rank
    prefill chunks, long runs    -> one matmul per segment (a GEMM is faster there)

Why a kernel of our own: with one or two rows per adapter the LoRA op reads every adapter's
weights once per step and does almost no arithmetic, so it is bound by memory traffic; torch's
batched matmul over the padded slots reached about half the machine's read bandwidth on these
shapes and read the rank padding too (a batch of rank 8-64 adapters all at rank 64).

server/native/loader.py builds and loads them (`load_kernels`); when it cannot, the caller uses the
batched-matmul backend (server/lora/cpu_ops.py).
"""

from __future__ import annotations

import torch

from server.lora.ranks import RankTable
from server.lora.step import LoraStepMeta


def _ranks(meta: LoraStepMeta, width: int) -> torch.Tensor:
    """The slots' ranks when the buffers are `width` wide per member (meta.max_rank), else `width`
    for every slot: the padding is then read, and the result is the same."""
    if meta.max_rank == width:
        return meta.slot_ranks
    return torch.full((meta.slot_ranks.numel(),), width, dtype=torch.int32, device=meta.slot_ranks.device)


def _segment_rank(meta: LoraStepMeta, ranks: RankTable | None, member: int, slot: int, width: int) -> int:
    """The columns of a slot's `width`-wide member that a segment's matmul needs (as `_ranks`)."""
    if ranks is not None:
        return ranks.host[member][slot]
    return meta.ranks[slot] if meta.max_rank == width and meta.ranks else width


def shrink(x: torch.Tensor, a: torch.Tensor, meta: LoraStepMeta, *, ranks: RankTable | None = None) -> torch.Tensor:
    """t [N, R'] = a[slot] @ x per row (0 on base rows); `x [N, in]`, `a [S, R', in]` contiguous in `in`."""
    t = x.new_zeros(x.shape[0], a.shape[1])
    plan = meta.slot_plan
    stacked = meta.max_rank and a.shape[1] % meta.max_rank == 0  # members of max_rank columns each
    members = a.shape[1] // meta.max_rank if stacked else 1
    width = a.shape[1] // members
    if plan.ptr is not None:
        a = a if a.stride(2) == 1 else a.contiguous()  # the layers' buffers already are; a copy otherwise
        table = _ranks(meta, width) if ranks is None else ranks.table
        torch.ops.loraplex.shrink_slots(x, a, plan.ptr, plan.rows, table, members, t)
    for start, length, slot in plan.segments:
        rows = x[start:start + length]
        member_ranks = [_segment_rank(meta, ranks, g, slot, width) for g in range(members)]
        if all(rank == width for rank in member_ranks):  # one matmul for every member
            torch.mm(rows, a[slot].to(x.dtype).t(), out=t[start:start + length])
            continue
        for g, rank in enumerate(member_ranks):  # each member's own rank only (0: not targeted)
            if rank:
                cols = slice(g * width, g * width + rank)
                t[start:start + length, cols] = rows @ a[slot, cols].to(x.dtype).t()
    return t


def expand_(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, meta: LoraStepMeta, out_offset: int = 0, *,
            ranks: RankTable | None = None) -> None:
    """y[:, out_offset:out_offset+out] += b[slot] @ t per row; `b [S, out, R]` with `out` contiguous."""
    out = y[:, out_offset:out_offset + b.shape[1]]
    plan = meta.slot_plan
    width = b.shape[2]
    if plan.ptr is not None:
        b = b if b.stride(1) == 1 else b.transpose(1, 2).contiguous().transpose(1, 2)  # as the layers keep it
        table = _ranks(meta, width) if ranks is None else ranks.table
        torch.ops.loraplex.expand_slots(out, t, b, plan.ptr, plan.rows, table)
    for start, length, slot in plan.segments:
        rank = _segment_rank(meta, ranks, 0, slot, width)
        if rank:
            out[start:start + length].addmm_(t[start:start + length, :rank], b[slot, :, :rank].to(y.dtype).t())
