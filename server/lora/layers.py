"""Linear layers of the frozen base with `max_loras` adapter slots beside them.

Projections that read the same input (q/k/v of an attention block, gate/up of an MLP) form
one `LoraGroup`: their A matrices are stacked per slot, so the group runs ONE shrink for all
members and each member one expand on its column slice (a Llama layer: 4 shrinks, not 7).
Every member keeps PEFT semantics: a module an adapter does not target holds zeros.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from server.lora.dora import DoraScales, dora_excess
from server.lora.ops import Backend
from server.lora.pool import AdapterPool, PooledWeight
from server.lora.ranks import WeightRanks
from server.lora.step import LoraStepMeta


class StepState:
    """The step the LoRA layers of one model are running: set once per step by the runner
    (`LoraModel.stepping(meta)`), read by every layer; None outside a step (base only)."""

    def __init__(self) -> None:
        self.meta: LoraStepMeta | None = None
        # The rows the output layer runs on (each sequence's sampled rows), when that is not every row
        # and some adapter of the step changes the output layer.
        self.head_meta: LoraStepMeta | None = None


def pooled(weight: torch.Tensor | PooledWeight) -> PooledWeight:
    """A layer's weight over the adapter pool (the layer was built with the pool)."""
    if not isinstance(weight, PooledWeight):
        raise TypeError("this layer keeps per-slot buffers, not blocks in the adapter pool")
    return weight


def pool_offset(rel: int | None) -> int:
    """Where a block goes in its slot's extent: required for a write into the adapter pool."""
    if rel is None:
        raise ValueError("a write into the adapter pool needs the block's offset in the slot's extent")
    return rel


class LoraGroup(nn.Module):
    """Stacked A of `members` projections of one input.

    `lora_a [S, members * R, in]`: member g's A sits in rows `[g*R, g*R + rank)`, zeros past its
    rank and for slots whose adapter does not target it. It is a view of `a_storage`, kept in the
    layout the backend reads fastest (`Backend.a_storage_in_major`): `[S, in, members * R]` for
    the batched-matmul CPU path (the shrink's right operand as it lies: up to 25% faster than the
    transposed view, measured), `[S, members * R, in]` for the compiled kernels (a rank row is
    contiguous, so a slot's rows past its rank are never read). `ranks` holds each row's rank per
    member (0 where its adapter does not target the member), which the op may skip.

    With `pool` (the compiled CPU kernels), there is no padded buffer: `op_a` is a `PooledWeight`, each
    adapter's member block `[rank, in]` in its extent of the adapter pool (server/lora/pool.py).
    """

    a_storage: torch.Tensor
    op_a: torch.Tensor | PooledWeight

    def __init__(self, members: int, in_features: int, max_loras: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype, backend: Backend, pool: AdapterPool | None = None) -> None:
        super().__init__()
        self.members, self.max_rank, self.backend = members, max_rank, backend
        self.in_features, self.pool = in_features, pool
        self.a_transposed = backend.a_storage_in_major
        self.ranks = WeightRanks(members, max_loras, device)
        self._cache = _ShrinkCache()
        if pool is not None:  # A lives in the adapter pool, each adapter's block at its own rank
            self.op_a = PooledWeight(pool, members, in_features, max_rank)
            return
        rows = members * max_rank
        shape = (max_loras, in_features, rows) if self.a_transposed else (max_loras, rows, in_features)
        self.register_buffer("a_storage", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        # The op's view of A, taken once (buffers are never replaced: the model is on its device
        # before its layers are wrapped); a plain attribute, as module buffer lookups are slow.
        self.op_a = self.lora_a

    @property
    def lora_a(self) -> torch.Tensor:
        """A as the op takes it, `[S, members * R, in]` (per-slot buffers only)."""
        return self.a_storage.transpose(1, 2) if self.a_transposed else self.a_storage

    def write_a(self, row: int, member: int, a: torch.Tensor, rel: int | None) -> None:
        """Member `member`'s A `[r, in]` for slot `row`: into the pool at `rel` within the slot's extent,
        or into the padded buffer (zeros past r)."""
        r = a.shape[0]
        if self.pool is not None:
            weight = pooled(self.op_a)
            weight.place(member, row, pool_offset(rel))
            weight.block(member, row, r).copy_(a)
            return
        a_rows = self.lora_a[row, member * self.max_rank:(member + 1) * self.max_rank]
        a_rows[:r].copy_(a)
        a_rows[r:].zero_()

    def clear_a(self, row: int, member: int) -> None:
        if self.pool is None:
            self.lora_a[row, member * self.max_rank:(member + 1) * self.max_rank].zero_()

    @property
    def shrinks(self) -> int:
        """Shrink computations since start-up (one per group per forward when stacking works)."""
        return self._cache.computed

    def shrink(self, x: torch.Tensor, meta: LoraStepMeta) -> Any:
        """The shrink output (t [N, members * R] in the backend's form) for input `x [..., in]` (N
        tokens), computed once for the group's members: they are handed the very same input
        tensor object, which is the cache key. Only members that a row of the step touches ask."""
        cache = self._cache
        if cache.x is not x or cache.meta is not meta:
            x2 = x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1])
            if x2.shape[0] != meta.num_tokens:
                raise RuntimeError(f"LoRA step planned for {meta.num_tokens} tokens, layer got {x2.shape[0]}")
            cache.x, cache.meta, cache.uses = x, meta, 0
            cache.readers = sum(1 for mask in self.ranks.masks if mask & meta.row_mask)
            cache.computed += 1
            cache.t = self.backend.shrink(x2, self.op_a, meta, ranks=self.ranks.group)
        t = cache.t
        cache.uses += 1
        if cache.uses >= cache.readers:  # every member that needs it has read it: drop the references
            cache.x = cache.meta = cache.t = None
        return t


class _ShrinkCache:
    """A group's last shrink (a plain object: setting attributes on a module is slow)."""

    __slots__ = ("x", "meta", "t", "uses", "readers", "computed")

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.meta: LoraStepMeta | None = None
        self.t: Any = None
        self.uses = self.readers = 0
        self.computed = 0


class LoraLinear(nn.Module):
    """y = base(x) + b[slot] @ a[slot] @ x per token; member `index` of `group`.

    `lora_b [S, out_features, R]` (the adapter's scale folded in), a view of `b_storage`. Rows of DoRA
    adapters are then rescaled per output feature (`dora`, server/lora/dora.py; None until one is written).
    """

    b_storage: torch.Tensor
    _op_b: torch.Tensor | PooledWeight

    def __init__(self, base: nn.Module, in_features: int, out_features: int, group: LoraGroup, index: int,
                 state: StepState) -> None:
        super().__init__()
        weight = next(base.parameters())
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.index, self.state = index, state
        self._group = [group]  # a list: the group is not a submodule of every member
        slots, rank = group.ranks.group.table.shape[1], group.max_rank
        # The CPU backends stream B fastest as [S, R, out] (a contiguous [R, out] matrix per slot, 2x
        # faster than [S, out, R] for batched matmuls, measured; the kernels stop at the rank's row);
        # `lora_b` is always the op's [S, out, R] (a view there). In the pool, B is a rank-major block.
        self.b_transposed = group.backend.b_storage_rank_major
        if group.pool is not None:
            self._op_b = PooledWeight(group.pool, 1, out_features, rank)
        else:
            shape = (slots, rank, out_features) if self.b_transposed else (slots, out_features, rank)
            self.register_buffer("b_storage", torch.zeros(shape, device=weight.device, dtype=group.a_storage.dtype),
                                 persistent=False)
            self._op_b = self.lora_b
        # Plain attributes the forward reads (module buffer and property lookups are slow).
        self._backend, self._a_rows = group.backend, self.a_rows
        self._ranks, self._masks = group.ranks.members[index], group.ranks.masks
        self._alone = group.members == 1  # reads the whole shrink output: no column view needed
        self.dora: DoraScales | None = None

    @property
    def group(self) -> LoraGroup:
        return self._group[0]

    @property
    def lora_b(self) -> torch.Tensor:
        """B as the op takes it, `[S, out_features, R]`."""
        return self.b_storage.transpose(1, 2) if self.b_transposed else self.b_storage

    @property
    def a_rows(self) -> slice:
        """This member's rows in the group's stacked A (and columns of its shrink output)."""
        rank = self.group.max_rank
        return slice(self.index * rank, (self.index + 1) * rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_lora(self.base(x), x, self.state.meta)

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, meta: LoraStepMeta | None) -> torch.Tensor:
        """`y` (the base's output for `x`) plus each row's adapter delta, DoRA rows rescaled."""
        # No row of the step holds an adapter that targets this module: its delta is 0 everywhere.
        if meta is None or not meta.row_mask & self._masks[self.index]:
            return y
        group, backend = self._group[0], self._backend
        t = group.shrink(x, meta)
        if not self._alone:
            t = backend.columns(t, self._a_rows)
        y = y.contiguous()
        backend.expand_(y.view(-1, self.out_features), t, self._op_b, meta, 0, ranks=self._ranks)
        if self.dora is not None and meta.row_mask & self.dora.mask:
            self.dora.apply_(y.view(-1, self.out_features), getattr(self.base, "bias", None), meta)
        return y

    def base_weight(self) -> torch.Tensor:
        """The base weight as `[out, in]` (a view: GPT-2's Conv1D keeps it as [in, out])."""
        weight = cast(torch.Tensor, self.base.weight)
        return weight if tuple(weight.shape) == (self.out_features, self.in_features) else weight.t()

    def pool_elements(self, rank: int) -> tuple[int, int]:
        """Elements of a rank-`rank` adapter's (A, B) blocks here, in the pool."""
        return rank * self.in_features, rank * self.out_features

    @torch.no_grad()
    def write_slot(self, row: int, a: torch.Tensor, b: torch.Tensor, scale: float,
                   magnitude: torch.Tensor | None = None, at: tuple[int, int] | None = None) -> None:
        """Copy one adapter's A [r, in] and B [out, r] into physical `row` (in the pool: at `at`, the
        blocks' offsets in the slot's extent; else padded, zeros past rank r); with DoRA's `magnitude
        [out]`, its `g - 1` beside them (computed here, once)."""
        self._write_dora(row, None if magnitude is None else dora_excess(self.base_weight(), a, b, scale, magnitude))
        r = a.shape[0]
        self.group.write_a(row, self.index, a, None if at is None else at[0])
        if self.group.pool is not None:
            weight = pooled(self._op_b)
            weight.place(0, row, pool_offset(None if at is None else at[1]))
            torch.mul(b.t(), scale, out=weight.block(0, row, r))  # scaled first: a narrower dtype rounds once
        else:
            b_row = self.lora_b[row]
            b_row[:, :r].copy_(b * scale)  # scaled first, so that a narrower slot dtype rounds once
            b_row[:, r:].zero_()
        self.group.ranks.set(self.index, row, r)

    @torch.no_grad()
    def clear_slot(self, row: int) -> None:
        """Nothing of this module in `row` (in the pool the blocks are freed with the slot's extent)."""
        self.group.clear_a(row, self.index)
        if self.group.pool is None:
            self.lora_b[row].zero_()
        self.group.ranks.set(self.index, row, 0)
        self._write_dora(row, None)

    def _write_dora(self, row: int, excess: torch.Tensor | None) -> None:
        if excess is not None and self.dora is None:
            table = self.group.ranks.group.table
            self.dora = DoraScales(table.shape[1], self.out_features, table.device)
        if self.dora is not None:
            self.dora.set(row, excess)
