"""DoRA in the slots: one vector per slot per module, computed once when an adapter is written.

DoRA rescales every output feature of a layer by `g = m / ||W + s·B·A||` (the norm of each output
row over the input dimension, with the frozen base weight W). Per row of a step, with y already
holding `base(x) + s·B·A·x`:

    y += (g - 1) * (y - bias)      ==  bias + g·W·x + g·s·B·A·x

which is what PEFT computes as `base(x) + (g - 1)·(base(x) - bias) + g·s·lora(x)`. `g` depends only on
the adapter and W, so it is computed at slot write (`dora_excess`) and kept as `g - 1`: zeros for
plain-LoRA and empty slots, so their rows come out bit for bit unchanged.
"""

from __future__ import annotations

import torch

from server.lora.step import LoraStepMeta

_ROWS_PER_CHUNK = 1024  # bounds the float32 temporary of W + s·B·A (16 MiB for a 4096-wide layer)


@torch.no_grad()
def dora_excess(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """`g - 1 [out]` float32 on `weight`'s device, for the base `weight [out, in]` (any dtype, a view is
    fine), `a [r, in]`, `b [out, r]` (unscaled) and DoRA's `magnitude [out]`. Computed in float32."""
    device = weight.device
    a = a.to(device, torch.float32)
    b_scaled = (b.to(device, torch.float32) * scale)
    norms = torch.empty(weight.shape[0], device=device, dtype=torch.float32)
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        rows = slice(start, start + _ROWS_PER_CHUNK)
        merged = torch.addmm(weight[rows].to(torch.float32), b_scaled[rows], a)
        norms[rows] = torch.linalg.vector_norm(merged, dim=1)
    return magnitude.to(device, torch.float32) / norms - 1


class DoraScales:
    """`g - 1` of the DoRA adapters of one module: `excess [E, out]` float32, one row per slot row that
    holds a DoRA adapter here (row 0: zeros, for the base's rows and plain adapters), found through
    `index [S + 1]` (slot row + 1 -> excess row). Rows grow with the DoRA adapters resident, not with
    the slot count (the adapter pool names many slots). Allocated on the first DoRA write."""

    def __init__(self, rows: int, out_features: int, device: torch.device) -> None:
        self.index = torch.zeros(rows + 1, device=device, dtype=torch.int64)
        self.excess = torch.zeros(2, out_features, device=device, dtype=torch.float32)
        self.row_of: dict[int, int] = {}  # slot row -> its excess row
        self.spare = [1]
        self.mask = 0  # bitmask of slot rows holding a DoRA adapter in this module

    def set(self, row: int, excess: torch.Tensor | None) -> None:
        if excess is None:
            spare = self.row_of.pop(row, None)
            if spare is not None:
                self.spare.append(spare)
            self._point(row, 0)
            return
        at = self.row_of.get(row) or self._take()
        self.row_of[row] = at
        self.excess[at].copy_(excess)
        self._point(row, at)

    def move_rows(self, dst: list[int], src: list[int]) -> None:
        """Row `dst[i]` takes what row `src[i]` held (a row move of the slot buffers)."""
        moved = [self.row_of.get(s) for s in src]
        for d in dst:
            self.row_of.pop(d, None)
        for d, at in zip(dst, moved):
            if at is not None:
                self.row_of[d] = at
            self._point(d, at or 0)

    def apply_(self, y: torch.Tensor, bias: torch.Tensor | None, meta: LoraStepMeta) -> None:
        """`y [N, out]` (base plus LoRA) += (g - 1) * (y - bias) for every row (zeros where not DoRA)."""
        excess = self.excess.index_select(0, self.index.index_select(0, meta.excess_index)).to(y.dtype)
        y.addcmul_(excess, y if bias is None else y - bias)

    def _point(self, row: int, at: int) -> None:
        self.index[row + 1] = at
        self.mask = self.mask | (1 << row) if at else self.mask & ~(1 << row)

    def _take(self) -> int:
        if not self.spare:  # double the rows
            size = self.excess.shape[0]
            grown = self.excess.new_zeros(2 * size, self.excess.shape[1])
            grown[:size] = self.excess
            self.excess = grown
            self.spare = list(range(2 * size - 1, size - 1, -1))
        return self.spare.pop()
