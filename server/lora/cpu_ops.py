"""The CPU backend of the LoRA op: padded batched matmuls for decode rows, one matmul per segment.

Same contract as the reference in server/lora/ops.py, except that `shrink` returns a `CpuShrunk`
(the shrink output in the layouts the expands read, see below) instead of a dense `t [N, R]`:

    shrink(x [N, in], a [S, R, in], meta) -> CpuShrunk          (t[i] = a[slot(i)] @ x[i])
    expand_(y [N, out_total], t: CpuShrunk, b [S, out, R], meta, out_offset) -> None
        y[i, out_offset:out_offset+out] += b[slot(i)] @ t[i]   (slot(i) != -1)

Weights narrower than the activations (bfloat16 slots beside a float32 model) are widened per
call, a copy of the used slots: the compiled kernels (server/lora/cpu_native.py) read them as they lie.

Its plan of a step (`PaddedPlan`, `meta.plan`; `plan_padded` builds it on the host, so nothing syncs):
decode rows of the padded batch run as ONE `bmm` over slots
`[0, pad_slots)`, `pad_width` rows per slot. Their shrink output stays in that padded layout
`[pad_slots, pad_width, R]`, which every expand of the group multiplies as it lies; only the
expand's result is scattered back to the packed rows. Rows past a slot's count are gathered from
an arbitrary row and never read back, so no buffer is zero-filled. Host segments (prefill chunks,
busy decode slots) run as one `mm` per segment. The cost per layer is thus 2 calls per shrink and
3 per expand (1 when the padded batch is the packed rows as they lie), whatever the adapter count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from server.lora.ranks import RankTable
from server.lora.step import LoraStepMeta, ToDevice, runs

# A decode slot with more than this many times the mean tokens per slot runs as its own segment
# instead of widening the padded batch for every slot.
HEAVY_FACTOR = 2.0


@dataclass(frozen=True, eq=False)
class PaddedPlan:
    """Decode rows go through one padded batched matmul over slots `[0, pad_slots)` (`pad_width` rows per
    slot; `pad_rows [n]` are the packed rows it covers and `pad_index [n]` their positions in the
    `[pad_slots * pad_width]` padded layout, both None when they are the identity; `pad_gather
    [pad_slots * pad_width]` is the packed row each position reads, any LoRA row for a position that holds
    none, None when the padded layout is rows `[0, n)` as they lie), and every other LoRA row is covered by
    `host_segments` ((start, length, slot) triples; prefill chunks, and decode runs of a slot far busier
    than the rest, which would blow up the padding)."""

    pad_slots: int
    pad_width: int
    pad_count: int
    pad_rows: torch.Tensor | None
    pad_index: torch.Tensor | None
    pad_gather: torch.Tensor | None
    host_segments: tuple[tuple[int, int, int], ...]


def plan_padded(slots: list[int], num_decode: int, to_device: ToDevice) -> PaddedPlan:
    pad_slots, width, pad_rows, pad_index, heavy = _decode_plan(slots[:num_decode])
    rows_identity = pad_rows == list(range(len(pad_rows)))
    index_identity = pad_index == list(range(pad_slots * width))
    return PaddedPlan(
        pad_slots, width, len(pad_rows),
        None if rows_identity else to_device(pad_rows, torch.int64),
        None if index_identity else to_device(pad_index, torch.int64),
        None if rows_identity and index_identity else to_device(_gather(pad_rows, pad_index, pad_slots * width),
                                                                torch.int64),
        tuple(sorted(heavy + runs(slots, num_decode, len(slots)))))


def _plan(meta: LoraStepMeta) -> PaddedPlan:
    if not isinstance(meta.plan, PaddedPlan):
        raise TypeError(f"the batched-matmul LoRA op needs a step planned for it, not {type(meta.plan).__name__}")
    return meta.plan


def _gather(rows: list[int], index: list[int], size: int) -> list[int]:
    """The packed row each of `size` padded positions reads: `rows[j]` at `index[j]`, `rows[0]` elsewhere."""
    gather = [rows[0]] * size
    for row, position in zip(rows, index):
        gather[position] = row
    return gather


def _decode_plan(dec: list[int]) -> tuple[int, int, list[int], list[int], list[tuple[int, int, int]]]:
    """(pad_slots, pad_width, pad_rows, pad_index, heavy runs) for the decode rows `dec`.

    Slots far busier than the mean whose rows are one contiguous run become segments; the
    rest share one padded `[pad_slots, pad_width]` batch (slots are assumed to be a dense
    prefix `0..pad_slots-1`, which `LoraModel` keeps them in; gaps only cost padding).
    """
    counts = Counter(s for s in dec if s >= 0)
    if not counts:
        return 0, 0, [], [], []
    mean = sum(counts.values()) / len(counts)
    by_slot = {r[2]: r for r in runs(dec, 0, len(dec))}
    heavy = {s for s, c in counts.items() if c > HEAVY_FACTOR * mean and c > 1 and by_slot.get(s, (0, 0))[1] == c}
    light = {s: c for s, c in counts.items() if s not in heavy}
    if not light:
        return 0, 0, [], [], [by_slot[s] for s in sorted(heavy)]
    pad_slots, width = max(light) + 1, max(light.values())
    rows, index, seen = [], [], Counter[int]()
    for row, s in enumerate(dec):
        if s in light:
            rows.append(row)
            index.append(s * width + seen[s])
            seen[s] += 1
    return pad_slots, width, rows, index, [by_slot[s] for s in sorted(heavy)]


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
        plan = _plan(meta)
        if self.padded is not None:
            t = t.to(self.padded.dtype)
            flat = self.padded.reshape(-1, self.width)
            picked = flat if plan.pad_index is None else flat.index_select(0, plan.pad_index)
            rows = torch.arange(plan.pad_count) if plan.pad_rows is None else plan.pad_rows
            t[rows] = picked
        if self.rows is not None:
            for start, length, _ in plan.host_segments:
                t[start:start + length] = self.rows[start:start + length]
        return t


def shrink(x: torch.Tensor, a: torch.Tensor, meta: LoraStepMeta, *, ranks: RankTable | None = None) -> CpuShrunk:
    """x [N, in] @ a[slot]^T per row; `a [S, R, in]` (fastest as a transposed view of [S, in, R]).
    The padded batch reads every slot at the full width R, so `ranks` is not used."""
    plan = _plan(meta)
    padded = rows = None
    if plan.pad_count:
        picked = x[:plan.pad_count] if plan.pad_gather is None else x.index_select(0, plan.pad_gather)
        padded = torch.bmm(picked.view(plan.pad_slots, plan.pad_width, -1),
                           a[:plan.pad_slots].to(x.dtype).transpose(1, 2))
    if plan.host_segments:
        rows = x.new_empty(x.shape[0], a.shape[1])
        for start, length, slot in plan.host_segments:
            torch.mm(x[start:start + length], a[slot].to(x.dtype).t(), out=rows[start:start + length])
    return CpuShrunk(padded, rows, a.shape[1])


def from_dense(t: torch.Tensor, meta: LoraStepMeta) -> CpuShrunk:
    """A dense `t [N, R]` computed another way (the embedding's gathered rows) in the layouts `expand_` reads."""
    plan = _plan(meta)
    padded = None
    if plan.pad_count:
        picked = t[:plan.pad_count] if plan.pad_gather is None else t.index_select(0, plan.pad_gather)
        padded = picked.view(plan.pad_slots, plan.pad_width, -1)
    return CpuShrunk(padded, t if plan.host_segments else None, t.shape[1])


def expand_(y: torch.Tensor, t: CpuShrunk, b: torch.Tensor, meta: LoraStepMeta, out_offset: int = 0, *,
            ranks: RankTable | None = None) -> None:
    """y[:, out_offset:out_offset+out] += b[slot] @ t per row; `b [S, out, R]` (fastest as a view of [S, R, out])."""
    out = y[:, out_offset:out_offset + b.shape[1]]
    plan = _plan(meta)
    if t.padded is not None:
        b_t = b[:plan.pad_slots].to(y.dtype).transpose(1, 2)
        count = plan.pad_count
        if plan.pad_gather is None:  # the padded batch is rows [0, count) as they lie
            out[:count].view(plan.pad_slots, plan.pad_width, -1).baddbmm_(t.padded, b_t)
        else:
            delta = torch.bmm(t.padded, b_t).view(-1, b.shape[1])
            if plan.pad_index is not None:
                delta = delta.index_select(0, plan.pad_index)
            if plan.pad_rows is None:
                out[:count] += delta
            else:
                # index_put_ with unique rows: index_add_ is far slower on the CPU.
                out.index_put_((plan.pad_rows,), delta, accumulate=True)
    if t.rows is not None:
        for start, length, slot in plan.host_segments:
            out[start:start + length].addmm_(t.rows[start:start + length], b[slot].to(y.dtype).t())
