"""The CPU backend of the LoRA op: batched matmuls over rank bands for decode rows, one matmul per segment.

Same contract as the reference in server/lora/ops.py, except for two layouts of its own:

    shrink(x [N, in], a [S, in, R, G], meta) -> CpuShrunk       (t[i] = a[slot(i)] @ x[i], all G members)
    expand_(y [N, out_total], t: CpuShrunk, b [S, out, R], meta, out_offset) -> None
        y[i, out_offset:out_offset+out] += b[slot(i)] @ t[i]   (slot(i) != -1; t of one member)

A is stored rank-interleaved, `[S, in, R, G]` for a group of G stacked projections (the shrink's
right operand as it lies, its batched matmuls up to 25% faster than on `[S, R, in]`, measured): the
first r ranks of every member are then one contiguous column prefix `[:, :r * G]`, so a band of
slots whose ranks are all <= r reads (and multiplies) only those columns. B is a transposed view of
`[S, R, out]`, whose first r rank rows are contiguous.

Decode rows of the padded batch (`meta.pad_*`) run as one `bmm` per rank band (`meta.pad_bands`)
over its slots, `pad_width` rows per slot. Their shrink output stays in that padded layout,
`[band slots, pad_width, r * G]`, which each member's expand multiplies as it lies (its columns
`member::G`); only the expand's result is scattered back to the packed rows. Rows past a slot's
count are gathered from an arbitrary row and never read back, so no buffer is zero-filled. Host
segments (prefill chunks, busy decode slots) run as one `mm` per segment at the slot's own rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.lora.step import LoraStepMeta


def a_shape(slots: int, in_features: int, rank: int, members: int) -> tuple[int, ...]:
    """Storage shape of a group's stacked A on the CPU: `[S, in, R, G]`."""
    return slots, in_features, rank, members


def a_member(a: torch.Tensor, member: int, members: int) -> torch.Tensor:
    """Member `member`'s A `[S, R, in]`, a writable view of the storage."""
    return a[..., member].transpose(1, 2)


@dataclass(frozen=True)
class CpuShrunk:
    """One step's shrink output on the CPU.

    `bands`: per `meta.pad_bands` entry, `[band slots, pad_width, r * members]` (rank-interleaved:
    member g's rank k in column `k * members + g`); `segments`: per `meta.host_segments` entry,
    `[length, r * members]`. `columns` picks one member's columns (then `members` is 1); `rank` is
    the storage's R.
    """

    bands: tuple[torch.Tensor, ...]
    segments: tuple[torch.Tensor, ...]
    members: int
    rank: int

    def columns(self, member: int, members: int) -> CpuShrunk:
        if members == 1:
            return self
        return CpuShrunk(tuple(t[..., member::members] for t in self.bands),
                         tuple(t[:, member::members] for t in self.segments), 1, self.rank)

    def dense(self, meta: LoraStepMeta) -> torch.Tensor:
        """`t [N, members * R]` member-major (0 past each band's rank and on base rows): the reference's form."""
        parts = self.bands + self.segments
        dtype = parts[0].dtype if parts else torch.float32
        t = torch.zeros(meta.num_tokens, self.rank, self.members, dtype=dtype)
        if self.bands:
            width = meta.pad_width
            padded = torch.zeros(meta.pad_slots * width, self.rank, self.members, dtype=dtype)
            for (first, end, rank), band in zip(meta.pad_bands, self.bands):
                padded[first * width:end * width, :rank] = band.reshape(-1, rank, self.members)
            picked = padded if meta.pad_index is None else padded[meta.pad_index]
            rows = torch.arange(meta.pad_count) if meta.pad_rows is None else meta.pad_rows
            t[rows] = picked
        for (start, length, _, rank), seg in zip(meta.host_segments, self.segments):
            t[start:start + length, :rank] = seg.reshape(length, rank, self.members)
        return t.transpose(1, 2).reshape(meta.num_tokens, -1)


def shrink(x: torch.Tensor, a: torch.Tensor, meta: LoraStepMeta) -> CpuShrunk:
    """x [N, in] @ a[slot] per row, `a [S, in, R, G]`, at each band's or segment's rank."""
    members, flat = a.shape[3], a.flatten(2)
    bands: list[torch.Tensor] = []
    if meta.pad_count:
        picked = x[:meta.pad_count] if meta.pad_gather is None else x.index_select(0, meta.pad_gather)
        padded = picked.view(meta.pad_slots, meta.pad_width, -1)
        for first, end, rank in meta.pad_bands:
            bands.append(torch.bmm(padded[first:end], flat[first:end, :, :rank * members]))
    segments = tuple(torch.mm(x[start:start + length], flat[slot, :, :rank * members])
                     for start, length, slot, rank in meta.host_segments)
    return CpuShrunk(tuple(bands), segments, members, a.shape[2])


def expand_(y: torch.Tensor, t: CpuShrunk, b: torch.Tensor, meta: LoraStepMeta, out_offset: int = 0) -> None:
    """y[:, out_offset:out_offset+out] += b[slot] @ t per row; `b [S, out, R]` (a view of [S, R, out])."""
    out_features = b.shape[1]
    out = y[:, out_offset:out_offset + out_features]
    b_rows = b.transpose(1, 2)  # [S, R, out]: a band's first `rank` rows are contiguous
    if t.bands:
        width = meta.pad_width
        if meta.pad_gather is None:  # the padded batch is rows [0, count) as they lie
            padded_out = out[:meta.pad_count].view(meta.pad_slots, width, -1)
            for (first, end, rank), band in zip(meta.pad_bands, t.bands):
                padded_out[first:end].baddbmm_(band, b_rows[first:end, :rank])
        else:
            # Positions of slots outside every band are never selected below, so stay unset.
            delta = y.new_empty(meta.pad_slots, width, out_features)
            for (first, end, rank), band in zip(meta.pad_bands, t.bands):
                torch.bmm(band, b_rows[first:end, :rank], out=delta[first:end])
            delta = delta.view(-1, out_features)
            if meta.pad_index is not None:
                delta = delta.index_select(0, meta.pad_index)
            if meta.pad_rows is None:
                out[:meta.pad_count] += delta
            else:
                # index_put_ with unique rows: index_add_ is far slower on the CPU.
                out.index_put_((meta.pad_rows,), delta, accumulate=True)
    for (start, length, slot, rank), seg in zip(meta.host_segments, t.segments):
        out[start:start + length].addmm_(seg, b_rows[slot, :rank])
