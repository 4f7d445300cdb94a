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
    """`excess [S + 1, out]` float32: `g - 1` of the adapter in each slot row, at index row + 1; index 0
    (the base's rows, slot -1) and rows of plain adapters hold zeros. Allocated on the first DoRA write."""

    def __init__(self, rows: int, out_features: int, device: torch.device) -> None:
        self.excess = torch.zeros(rows + 1, out_features, device=device, dtype=torch.float32)
        self.mask = 0  # bitmask of slot rows holding a DoRA adapter in this module

    def set(self, row: int, excess: torch.Tensor | None) -> None:
        if excess is None:
            self.excess[row + 1].zero_()
            self.mask &= ~(1 << row)
        else:
            self.excess[row + 1].copy_(excess)
            self.mask |= 1 << row

    def move_rows(self, dst: list[int], src: list[int]) -> None:
        """Row `dst[i]` takes what row `src[i]` held (a row move of the slot buffers)."""
        index = torch.tensor(src, device=self.excess.device) + 1
        self.excess.index_copy_(0, torch.tensor(dst, device=self.excess.device) + 1,
                                self.excess.index_select(0, index))
        flags = {d: bool(self.mask >> s & 1) for d, s in zip(dst, src)}
        for d, on in flags.items():
            self.mask = self.mask | (1 << d) if on else self.mask & ~(1 << d)

    def apply_(self, y: torch.Tensor, bias: torch.Tensor | None, meta: LoraStepMeta) -> None:
        """`y [N, out]` (base plus LoRA) += (g - 1) * (y - bias) for every row (zeros where not DoRA)."""
        excess = self.excess.index_select(0, meta.excess_index).to(y.dtype)
        y.addcmul_(excess, y if bias is None else y - bias)
