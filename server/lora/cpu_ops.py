"""The CPU backend of the LoRA op: padded batched matmuls for decode rows, one matmul per segment.

Same contract as the reference in server/lora/ops.py, except that `shrink` returns a `CpuShrunk`
(the shrink output in the layouts the expands read, see below) instead of a dense `t [N, R]`:

    shrink(x [N, in], a [S, R, in], meta) -> CpuShrunk          (t[i] = a[slot(i)] @ x[i])
    expand_(y [N, out_total], t: CpuShrunk, b [S, out, R], meta, out_offset) -> None
        y[i, out_offset:out_offset+out] += b[slot(i)] @ t[i]   (slot(i) != -1)

Weights narrower than the activations (bfloat16 slots beside a float32 model) are widened per
call, a copy of the used slots: the compiled kernels (server/lora/cpu_native.py) read them as they lie.

Decode rows of the padded batch (`meta.pad_*`, planned on the host) run as ONE `bmm` over slots
`[0, pad_slots)`, `pad_width` rows per slot. Their shrink output stays in that padded layout
`[pad_slots, pad_width, R]`, which every expand of the group multiplies as it lies; only the
expand's result is scattered back to the packed rows. Rows past a slot's count are gathered from
an arbitrary row and never read back, so no buffer is zero-filled. Host segments (prefill chunks,
busy decode slots) run as one `mm` per segment. The cost per layer is thus 2 calls per shrink and
3 per expand (1 when the padded batch is the packed rows as they lie), whatever the adapter count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.lora.ranks import RankTable
from server.lora.step import LoraStepMeta


@dataclass(frozen=True)
class CpuShrunk:
    """One step's shrink output on the CPU.

    `padded [pad_slots, pad_width, R]`: the padded batch's rows (None without decode rows there);
    `rows [N, R]`: rows of host segments, other rows unset (None without segments); `width` is R. `columns`
    views the slice of the stacked rank dimension that one member of a group reads.
    """

    padded: torch.Tensor | None
    rows: torch.Tensor | None
    width: int  # R

    def columns(self, cols: slice) -> CpuShrunk:
        return CpuShrunk(None if self.padded is None else self.padded[..., cols],
                         None if self.rows is None else self.rows[:, cols], len(range(self.width)[cols]))

    def dense(self, meta: LoraStepMeta) -> torch.Tensor:
        """`t [N, R]` (0 on base rows): the reference's form, for inspection and tests."""
        t = torch.zeros(meta.num_tokens, self.width)
        if self.padded is not None:
            t = t.to(self.padded.dtype)
            flat = self.padded.reshape(-1, self.width)
            picked = flat if meta.pad_index is None else flat.index_select(0, meta.pad_index)
            rows = torch.arange(meta.pad_count) if meta.pad_rows is None else meta.pad_rows
            t[rows] = picked
        for start, length, _ in meta.host_segments:
            t[start:start + length] = self.rows[start:start + length]
        return t


def shrink(x: torch.Tensor, a: torch.Tensor, meta: LoraStepMeta, *, ranks: RankTable | None = None) -> CpuShrunk:
    """x [N, in] @ a[slot]^T per row; `a [S, R, in]` (fastest as a transposed view of [S, in, R]).
    The padded batch reads every slot at the full width R, so `ranks` is not used."""
    padded = rows = None
    if meta.pad_count:
        picked = x[:meta.pad_count] if meta.pad_gather is None else x.index_select(0, meta.pad_gather)
        padded = torch.bmm(picked.view(meta.pad_slots, meta.pad_width, -1),
                           a[:meta.pad_slots].to(x.dtype).transpose(1, 2))
    if meta.host_segments:
        rows = x.new_empty(x.shape[0], a.shape[1])
        for start, length, slot in meta.host_segments:
            torch.mm(x[start:start + length], a[slot].to(x.dtype).t(), out=rows[start:start + length])
    return CpuShrunk(padded, rows, a.shape[1])


def from_dense(t: torch.Tensor, meta: LoraStepMeta) -> CpuShrunk:
    """A dense `t [N, R]` computed another way (the embedding's gathered rows) in the layouts `expand_` reads."""
    padded = None
    if meta.pad_count:
        picked = t[:meta.pad_count] if meta.pad_gather is None else t.index_select(0, meta.pad_gather)
        padded = picked.view(meta.pad_slots, meta.pad_width, -1)
    return CpuShrunk(padded, t if meta.host_segments else None, t.shape[1])


def expand_(y: torch.Tensor, t: CpuShrunk, b: torch.Tensor, meta: LoraStepMeta, out_offset: int = 0, *,
            ranks: RankTable | None = None) -> None:
    """y[:, out_offset:out_offset+out] += b[slot] @ t per row; `b [S, out, R]` (fastest as a view of [S, R, out])."""
    out = y[:, out_offset:out_offset + b.shape[1]]
    if t.padded is not None:
        b_t = b[:meta.pad_slots].to(y.dtype).transpose(1, 2)
        count = meta.pad_count
        if meta.pad_gather is None:  # the padded batch is rows [0, count) as they lie
            out[:count].view(meta.pad_slots, meta.pad_width, -1).baddbmm_(t.padded, b_t)
        else:
            delta = torch.bmm(t.padded, b_t).view(-1, b.shape[1])
            if meta.pad_index is not None:
                delta = delta.index_select(0, meta.pad_index)
            if meta.pad_rows is None:
                out[:count] += delta
            else:
                # index_put_ with unique rows: index_add_ is far slower on the CPU.
                out.index_put_((meta.pad_rows,), delta, accumulate=True)
    if t.rows is not None:
        for start, length, slot in meta.host_segments:
            out[start:start + length].addmm_(t.rows[start:start + length], b[slot].to(y.dtype).t())
