"""The rank of each row's adapter in one weight of a group, per member: what the op may skip.

A row's adapter may target only some modules (PEFT's default for Llama is q_proj and v_proj),
and may give modules ranks of their own (PEFT's `rank_pattern`). A module it does not target holds
zeros in that row, and so do A's rows and B's columns at or past the module's rank. The op reads
nothing there when it is handed the weight's `RankTable`; without one it reads up to
`meta.slot_ranks`, the adapter's rank, in every module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from server.lora.pool import set_item


class RankTable(NamedTuple):
    """`table [members, S]` int32 (the kernels read it) and `host[g][row]`, the same as python ints
    (host loops over prefill segments). A member's own table is a view of its group's."""

    table: torch.Tensor
    host: list[list[int]]


class WeightRanks:
    """The ranks of one group's members per row, kept in step with the group's slot writes and
    row moves; `masks[g]` is the bitmask of rows whose rank in member g is nonzero, so a layer
    can skip the op when no row of a step touches it."""

    def __init__(self, members: int, rows: int, device: torch.device) -> None:
        table = torch.zeros(members, rows, dtype=torch.int32, device=device)
        host = [[0] * rows for _ in range(members)]
        self.group = RankTable(table, host)
        self.members = [RankTable(table[g:g + 1], [host[g]]) for g in range(members)]
        self.masks = [0] * members

    def set(self, member: int, row: int, rank: int) -> None:
        set_item(self.group.table, (member, row), rank)
        self.group.host[member][row] = rank
        bit = 1 << row
        self.masks[member] = self.masks[member] | bit if rank else self.masks[member] & ~bit

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Row `dst[i]` takes what row `src[i]` held (the buffers' `index_copy_` of a row move)."""
        table = self.group.table
        table.index_copy_(1, dst, table.index_select(1, src))
        dst_rows, src_rows = dst.tolist(), src.tolist()
        for g, ranks in enumerate(self.group.host):
            moved = [ranks[s] for s in src_rows]
            for d, rank in zip(dst_rows, moved):
                ranks[d] = rank
            self.masks[g] = sum(1 << row for row, rank in enumerate(ranks) if rank)
