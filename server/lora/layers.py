"""Linear layers of the frozen base with `max_loras` adapter slots beside them.

Projections that read the same input (q/k/v of an attention block, gate/up of an MLP) form
one `LoraGroup`: their A matrices are stacked per slot, so the group runs ONE shrink for all
members and each member one expand on its column slice (a Llama layer: 4 shrinks, not 7).
Every member keeps PEFT semantics: a module an adapter does not target holds zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from server.lora.ops import Backend
from server.lora.step import LoraStepMeta


class StepState:
    """The step the LoRA layers of one model are running: set once per step by the runner
    (`LoraModel.stepping(meta)`), read by every layer; None outside a step (base only)."""

    def __init__(self) -> None:
        self.meta: LoraStepMeta | None = None


class LoraGroup(nn.Module):
    """Stacked A of `members` projections of one input.

    Buffers: `lora_a [S, members * R, in]`; member g's A sits in rows `[g*R, g*R + rank)`,
    zeros past its rank and for slots whose adapter does not target it.
    """

    def __init__(self, members: int, in_features: int, max_loras: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype, backend: Backend) -> None:
        super().__init__()
        self.members, self.max_rank, self.backend = members, max_rank, backend
        self.register_buffer("lora_a", torch.zeros(max_loras, members * max_rank, in_features, device=device,
                                                   dtype=dtype), persistent=False)
        self._x: torch.Tensor | None = None
        self._meta: LoraStepMeta | None = None
        self._t: torch.Tensor | None = None
        self._uses = 0
        self.shrinks = 0  # shrink computations since start-up (one per group per forward when stacking works)

    def shrink(self, x: torch.Tensor, meta: LoraStepMeta) -> torch.Tensor:
        """t [N, members * R] for input `x [..., in]` (N tokens), computed once for the group's
        members: they are handed the very same input tensor object, which is the cache key."""
        if self._x is not x or self._meta is not meta:
            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[0] != meta.num_tokens:
                raise RuntimeError(f"LoRA step planned for {meta.num_tokens} tokens, layer got {x2.shape[0]}")
            self._x, self._meta, self._uses = x, meta, 0
            self.shrinks += 1
            self._t = self.backend.shrink(x2, self.lora_a, meta)
        t = self._t
        self._uses += 1
        if self._uses == self.members:  # every member has read it: drop the references
            self._x = self._meta = self._t = None
        return t


class LoraLinear(nn.Module):
    """y = base(x) + b[slot] @ a[slot] @ x per token; member `index` of `group`.

    `lora_b [S, out_features, R]` (the adapter's scale folded in), a view of `b_storage`.
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, group: LoraGroup, index: int,
                 state: StepState) -> None:
        super().__init__()
        weight = next(base.parameters())
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.index, self.state = index, state
        self._group = [group]  # a list: the group is not a submodule of every member
        slots, rank, kw = group.lora_a.shape[0], group.max_rank, {"device": weight.device, "dtype": weight.dtype}
        # The CPU expand streams B fastest as [S, R, out] (a contiguous [R, out] matrix per slot, 2x
        # faster than [S, out, R] measured); `lora_b` is always the op's [S, out, R] (a view there).
        self.b_transposed = group.backend.name == "cpu"
        shape = (slots, rank, out_features) if self.b_transposed else (slots, out_features, rank)
        self.register_buffer("b_storage", torch.zeros(shape, **kw), persistent=False)

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
        y = self.base(x)
        meta = self.state.meta
        if meta is None or not meta.has_lora:
            return y
        t = self.group.shrink(x, meta)
        y = y.contiguous()
        self.group.backend.expand_(y.view(-1, self.out_features), t[:, self.a_rows], self.lora_b, meta, 0)
        return y

    @torch.no_grad()
    def write_slot(self, row: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Copy one adapter's A [r, in] and B [out, r] into physical `row`, zero past rank r."""
        r = a.shape[0]
        a_rows = self.group.lora_a[row, self.a_rows]
        a_rows[:r].copy_(a)
        a_rows[r:].zero_()
        b_row = self.lora_b[row]
        b_row[:, :r].copy_(b).mul_(scale)
        b_row[:, r:].zero_()

    @torch.no_grad()
    def clear_slot(self, row: int) -> None:
        self.group.lora_a[row, self.a_rows].zero_()
        self.b_storage[row].zero_()
