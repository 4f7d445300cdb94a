"""Weights an adapter replaces outright, per slot row: a fully trained copy of the output layer or the
input embedding (PEFT `modules_to_save`), or some of their rows (PEFT `trainable_token_indices`).

Rows of a step whose adapter replaces nothing keep the base's output untouched; the work is per
slot that replaces something, on that slot's rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.lora.step import LoraStepMeta


@dataclass(frozen=True, eq=False)
class Replacement:
    """`rows [k, dim]` (the model's dtype and device) replace the base weight's rows `indices [k]`; with
    `indices` None, `rows` is the whole weight (a fully trained copy, `[vocab, dim]`)."""

    rows: torch.Tensor
    indices: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + (0 if self.indices is None else self.indices.nbytes)


class Replacements:
    """The replacements of one module, keyed by slot row."""

    def __init__(self) -> None:
        self.by_row: dict[int, Replacement] = {}
        self.mask = 0  # bitmask of rows holding one

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.by_row.values())

    def set(self, row: int, replacement: Replacement | None) -> None:
        if replacement is None:
            self.by_row.pop(row, None)
            self.mask &= ~(1 << row)
        else:
            self.by_row[row] = replacement
            self.mask |= 1 << row

    def move_rows(self, dst: list[int], src: list[int]) -> None:
        moved = {d: self.by_row.get(s) for d, s in zip(dst, src)}
        for d, replacement in moved.items():
            self.set(d, replacement)

    def _groups(self, meta: LoraStepMeta, device: torch.device) -> list[tuple[Replacement, torch.Tensor]]:
        """(replacement, packed rows `[n]` that use it) for every slot row of the step holding one."""
        groups = []
        for row, replacement in self.by_row.items():
            if meta.row_mask >> row & 1:
                rows = [i for i, s in enumerate(meta.host_slots) if s == row]
                groups.append((replacement, torch.tensor(rows, device=device)))
        return groups

    def linear_(self, y: torch.Tensor, x: torch.Tensor, meta: LoraStepMeta) -> None:
        """Output layer: `y [N, vocab]` of `x [N, in]`, recomputed where a row's adapter replaces weights
        (no bias: the output layers PEFT replaces this way have none)."""
        for replacement, rows in self._groups(meta, y.device):
            inputs = x.index_select(0, rows)
            if replacement.indices is None:
                y.index_copy_(0, rows, F.linear(inputs, replacement.rows))
            else:
                y[rows.unsqueeze(1), replacement.indices.unsqueeze(0)] = F.linear(inputs, replacement.rows)

    def embed_(self, y: torch.Tensor, ids: torch.Tensor, meta: LoraStepMeta, scale: torch.Tensor | None) -> None:
        """Input embedding: `y [N, dim]` of token `ids [N]`, replaced where a row's adapter replaces the token's
        row; `scale` is the embedding's own output scale (Gemma's), applied to the replaced rows too."""
        for replacement, rows in self._groups(meta, y.device):
            tokens = ids.index_select(0, rows)
            if replacement.indices is None:
                values, hit_rows = F.embedding(tokens, replacement.rows), rows
            else:
                match = tokens.unsqueeze(1) == replacement.indices.unsqueeze(0)  # [n, k]
                hit, column = match.nonzero(as_tuple=True)
                values, hit_rows = replacement.rows.index_select(0, column), rows.index_select(0, hit)
            if scale is not None:
                values = values * scale.to(values.dtype)
            y.index_copy_(0, hit_rows, values.to(y.dtype))
