"""Where the Triton kernels find each slot's weights: offset tables over padded buffers or the adapter pool.

The kernels (server/lora/triton_kernels.py) take a data tensor and an int64 table `off [G, S]`: member
(or slice) g of slot s starts at element `off[g, s]` of the data, its rank rows `row_stride` apart and
its elements `elem_stride` apart; ranks come from `ranks [G, S]` (`rank_g_stride` S) or one rank per
slot (`rank_g_stride` 0). Padded per-slot buffers and the pool (server/lora/pool.py: the extent of slot
s at `base[s]`, member g at `rel[g, s]` inside it) are then one and the same to the kernels, as the
compiled CPU kernels' per-slot offsets are to them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from server.lora.pool import PooledWeight


class Weights(NamedTuple):
    """One weight of every slot as the kernels read it.

    shrink: `data` holds member g of slot s from `off[g, s]`, rank row j at `+ j * row_stride`, feature k at
    `+ k * elem_stride`; `rows` = members * width (the stacked rank dimension), `width` each member's.
    expand: `data` holds slice j of slot s from `off[j, s]`, output n at `+ n * elem_stride`, rank column r at
    `+ r * row_stride`; `rows` = width = the rank columns of t each slice reads."""

    data: torch.Tensor
    off: torch.Tensor
    ranks: torch.Tensor
    rank_g_stride: int
    slots: int
    rows: int
    width: int
    row_stride: int
    elem_stride: int


@functools.lru_cache(maxsize=64)
def _grid(slots: int, members: int, slot_stride: int, member_stride: int, base: int,
          device: torch.device) -> torch.Tensor:
    """`off[g, s] = base + s * slot_stride + g * member_stride` (int64 [members, slots])."""
    s = torch.arange(slots, dtype=torch.int64) * slot_stride
    g = torch.arange(members, dtype=torch.int64) * member_stride + base
    return (g[:, None] + s[None, :]).to(device)


@functools.lru_cache(maxsize=64)
def _slices(slots: int, slot_strides: tuple[int, ...], deltas: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`off[j, s] = deltas[j] + s * slot_strides[j]` (int64 [slices, slots])."""
    s = torch.arange(slots, dtype=torch.int64)
    return torch.stack([d + s * stride for stride, d in zip(slot_strides, deltas)]).to(device)


def padded_shrink(a: torch.Tensor, width: int, ranks: torch.Tensor) -> Weights:
    """`a [S, R, in]` stacked from members of `width` rows each; `ranks [S]`, one per slot."""
    slots, rows = a.shape[0], a.shape[1]
    members = -(-rows // width)
    off = _grid(slots, members, a.stride(0), width * a.stride(1), 0, a.device)
    return Weights(a, off, ranks, 0, slots, rows, width, a.stride(1), a.stride(2))


def pooled_shrink(a: PooledWeight, ranks: Any) -> Weights:
    """A stacked A in the pool; `ranks` the layers' RankTable (`table [members, S]`)."""
    slots = a.rel.shape[1]
    off = a.pool.base.unsqueeze(0) + a.rel
    return Weights(a.pool.data, off, _table(ranks, a.members, slots), slots, slots, a.members * a.width, a.width,
                   a.row, 1)


def padded_expand(bs: Sequence[torch.Tensor], ranks: torch.Tensor) -> Weights:
    """1-3 slices `b_j [S, out_j, R]` with equal inner strides; `ranks [S]`, one per slot for every slice.
    The table holds each slice's place as an element offset from the first one's data."""
    b0 = bs[0]
    slots = b0.shape[0]
    deltas = tuple((b.data_ptr() - b0.data_ptr()) // b0.element_size() for b in bs)
    off = _slices(slots, tuple(b.stride(0) for b in bs), deltas, b0.device)
    return Weights(b0, off, ranks, 0, slots, b0.shape[2], b0.shape[2], b0.stride(2), b0.stride(1))


def pooled_expand(b: PooledWeight, ranks: Any) -> Weights:
    """One B in the pool (rank-major blocks `[rank, out]`); `ranks` the member's RankTable (`table [1, S]`)."""
    slots = b.rel.shape[1]
    off = b.pool.base.unsqueeze(0) + b.rel
    return Weights(b.pool.data, off, _table(ranks, 1, slots), slots, slots, b.width, b.width, b.row, 1)


def _table(ranks: Any, members: int, slots: int) -> torch.Tensor:
    if ranks is None:
        raise ValueError("the pooled LoRA op needs each member's ranks (the layers' RankTable)")
    table = ranks.table
    if tuple(table.shape) != (members, slots):
        raise ValueError(f"ranks table {tuple(table.shape)} is not [members, slots] = {(members, slots)}")
    return table.to(torch.int32).contiguous()
