"""One projection group's LoRA delta on the adapter pool in one compiled call (`loraplex::lora_pool_group`).

A group is the projections of one input (q/k/v, gate/up, or a lone o/down projection): per step the
separate op costs a shrink, a column split and one expand per member, each a dispatch through torch with
its own temporary; for a single sequence those fixed costs are most of the LoRA time. The fused call
computes every member's `ys[g][row] += B_g (A_g x[row])` with the same loops (so the same sums) as
`cpu_native.shrink` then `cpu_native.expand_`.
"""

from __future__ import annotations

from typing import Any

import torch

from server.lora.cpu_native import plan_of
from server.lora.layers import LoraLinear, pooled
from server.lora.ops import CPU_KERNELS
from server.lora.pool import PooledWeight
from server.lora.ranks import RankTable
from server.lora.step import LoraStepMeta


def group_delta_(x: torch.Tensor, ys: list[torch.Tensor], a: PooledWeight, bs: list[PooledWeight],
                 meta: LoraStepMeta, ranks: RankTable) -> None:
    """Add each member's delta into `ys[g] [N, out_g]` (views with contiguous rows are fine) for `x [N, in]`;
    `a` the group's stacked A in the pool, `bs[g]` member g's B, `ranks.table [members, S]`."""
    plan = plan_of(meta)
    if plan.ptr is None:
        return
    torch.ops.loraplex.lora_pool_group(x, ys, a.pool.data, a.pool.base, a.rel, [b.rel for b in bs], plan.ptr,
                                       plan.rows, ranks.table, a.width)


class GroupDelta:
    """The fused op's view of sibling `LoraLinear`s: every member of one pooled group, each output's position.

    `of(modules)` is None where the fused op cannot serve them (a module without LoRA, members of
    different groups, or a group whose pool another backend reads, as Triton's); then each module adds its
    own delta."""

    def __init__(self, layers: list[LoraLinear]) -> None:
        group = layers[0].group
        self.group, self.layers = group, layers
        self.position = [0] * group.members  # member g's output is outs[position[g]]
        for i, layer in enumerate(layers):
            self.position[layer.index] = i
        self.a = pooled(group.op_a)  # built only for a group in the pool (`of`)
        self.bs = [pooled(layers[self.position[g]]._op_b) for g in range(group.members)]

    @classmethod
    def of(cls, modules: list[Any]) -> GroupDelta | None:
        if not modules or not all(isinstance(m, LoraLinear) for m in modules):
            return None
        group = modules[0].group
        if group.pool is None or group.backend is not CPU_KERNELS or len(modules) != group.members \
                or any(m.group is not group for m in modules):
            return None
        if sorted(m.index for m in modules) != list(range(group.members)):
            return None
        return cls(modules)

    def add_(self, x: torch.Tensor, outs: list[torch.Tensor], meta: LoraStepMeta | None) -> None:
        """Each output (the members' base outputs for `x [N, in]`) plus its delta, DoRA rows rescaled."""
        if meta is None or not any(meta.row_mask & mask for mask in self.group.ranks.masks):
            return
        ys = [outs[p] for p in self.position]
        group_delta_(x, ys, self.a, self.bs, meta, self.group.ranks.group)
        for layer, y in zip(self.layers, outs):
            if layer.dora is not None and meta.row_mask & layer.dora.mask:
                layer.dora.apply_(y, getattr(layer.base, "bias", None), meta)
