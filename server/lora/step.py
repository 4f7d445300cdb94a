"""The LoRA half of one step's context: which adapter slot every packed token uses, in the
layouts the LoRA op wants, built ONCE per step on the host and shared by every LoRA layer.

Row order the engine packs (and the CPU fast path is fastest on, though any order is correct):
decode rows first (one token per sequence) grouped by slot, then prefill chunks.

Fields (N packed tokens, S slots, G segments; every tensor on the model's device):

- `token_slots [N]` int64: slot of each token, -1 = base model (the BGMV view of the step).
- `seg_starts / seg_lens / seg_slots [G]` int64: every maximal run of consecutive rows with one
  slot != -1, over ALL rows (decode runs and prefill chunks alike; base runs omitted): the SGMV
  view of the step. `num_segments`, `max_seg_len` are python ints.
- `slot_ranks [S]` int32: rank of the adapter in each slot, 0 for an empty slot; A/B are
  zero-padded past it, so a kernel may compute with the buffers' full R. `ranks` is the same
  as python ints, for host loops.
- `num_decode`: rows `[0, num_decode)` are decode rows, the rest prefill rows.
- `row_mask`: bitmask of the slots any row uses (a layer whose weights hold nothing in them skips
  the op; server/lora/ranks.py).
- `host_slots`: `token_slots` as python ints (per-slot work on a few rows: the output layer's and
  the embedding's replaced weights); `excess_index [N]`: `token_slots + 1`, built on first use (DoRA's
  per-slot vectors keep the base's zeros at index 0, server/lora/dora.py).

The CPU fast path (`server/lora/cpu_ops.py`) reads a host plan built here too, so it never syncs:
decode rows go through one padded batched matmul over slots `[0, pad_slots)` (`pad_width` rows
per slot; `pad_rows [n]` are the packed rows it covers and `pad_index [n]` their positions in the
`[pad_slots * pad_width]` padded layout, both None when they are the identity; `pad_gather
[pad_slots * pad_width]` is the packed row each position reads, any LoRA row for a position
that holds none, None when the padded layout is rows `[0, n)` as they lie), and every other
LoRA row is covered by `host_segments` ((start, length, slot) triples; prefill chunks, and decode
runs of a slot far busier than the rest, which would blow up the padding).

The compiled CPU kernels (`server/lora/cpu_native.py`, server/native/lora_kernels.cpp) read
`slot_plan` instead: every LoRA row of the step per slot in CSR form (decode rows and prefill
chunks alike), so one call per weight covers the whole step, each slot's weights read up to its
rank (`max_rank` is the buffers' rank width R, 0 when unknown).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import torch

# A decode slot with more than this many times the mean tokens per slot runs as its own segment
# instead of widening the padded batch for every slot.
HEAVY_FACTOR = 2.0


@dataclass(frozen=True, eq=False)
class SlotPlan:
    """Every LoRA row of slots `[0, S')` as CSR, for the compiled kernels.

    `ptr [S' + 1]` int64, `rows [n]` int64: slot s owns packed rows `rows[ptr[s]:ptr[s+1]]`, its
    decode rows first, then its prefill rows, each in packed order (both None when no row of the
    step uses an adapter). The kernels cut a slot's rows into units and pick their loop by the
    unit's length: one or two rows stream the weights from memory, more go over them in tiles.
    """

    ptr: torch.Tensor | None
    rows: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class LoraStepMeta:
    """One step's token -> slot mapping (see the module docstring for every field)."""

    token_slots: torch.Tensor
    seg_starts: torch.Tensor
    seg_lens: torch.Tensor
    seg_slots: torch.Tensor
    max_seg_len: int
    num_segments: int
    slot_ranks: torch.Tensor
    num_tokens: int
    num_decode: int
    num_lora_tokens: int
    # Host plan of the CPU fast path.
    pad_slots: int
    pad_width: int
    pad_count: int
    pad_rows: torch.Tensor | None
    pad_index: torch.Tensor | None
    pad_gather: torch.Tensor | None
    host_segments: tuple[tuple[int, int, int], ...]
    # Host plan of the compiled CPU kernels.
    slot_plan: SlotPlan
    max_rank: int = 0
    ranks: tuple[int, ...] = ()
    row_mask: int = 0
    host_slots: tuple[int, ...] = ()

    @cached_property
    def excess_index(self) -> torch.Tensor:
        return self.token_slots + 1

    @classmethod
    def build(cls, token_slots: list[int], slot_ranks: list[int], device: torch.device | str = "cpu",
              num_decode: int = 0, max_rank: int = 0, pad_plan: bool = True) -> LoraStepMeta:
        """Plan a step from host ints: `token_slots` per packed row (-1 = base), the rank of every
        slot, how many leading rows are decode rows, and the buffers' rank width (0: unknown).
        `pad_plan` False leaves out the batched-matmul path's padded plan (every decode row then is a
        host segment): the compiled kernels over the adapter pool, whose slots are not a dense prefix,
        never read it."""
        n = len(token_slots)
        if not 0 <= num_decode <= n:
            raise ValueError(f"num_decode {num_decode} outside 0..{n}")
        runs = _runs(token_slots, 0, n)
        pad_slots, width, pad_rows, pad_index, heavy = (
            _decode_plan(token_slots[:num_decode]) if pad_plan else (0, 0, [], [], _runs(token_slots, 0, num_decode)))
        host = tuple(sorted(heavy + _runs(token_slots, num_decode, n)))
        rows_identity = pad_rows == list(range(len(pad_rows)))
        index_identity = pad_index == list(range(pad_slots * width))

        def t(values, dtype=torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device)

        return cls(
            token_slots=t(token_slots),
            seg_starts=t([r[0] for r in runs]), seg_lens=t([r[1] for r in runs]), seg_slots=t([r[2] for r in runs]),
            max_seg_len=max((r[1] for r in runs), default=0), num_segments=len(runs),
            slot_ranks=t(slot_ranks, torch.int32),
            num_tokens=n, num_decode=num_decode, num_lora_tokens=sum(s >= 0 for s in token_slots),
            pad_slots=pad_slots, pad_width=width, pad_count=len(pad_rows),
            pad_rows=None if rows_identity else t(pad_rows),
            pad_index=None if index_identity else t(pad_index),
            pad_gather=None if rows_identity and index_identity else t(_gather(pad_rows, pad_index, pad_slots * width)),
            host_segments=host,
            slot_plan=_slot_plan(token_slots, t), max_rank=max_rank, ranks=tuple(slot_ranks),
            row_mask=sum(1 << s for s in set(token_slots) if s >= 0), host_slots=tuple(token_slots),
        )


def _slot_plan(slots: list[int], to_tensor) -> SlotPlan:
    """The kernels' plan: the CSR of every LoRA row per slot."""
    by_slot: dict[int, list[int]] = {}
    for row, s in enumerate(slots):
        if s >= 0:
            by_slot.setdefault(s, []).append(row)
    if not by_slot:
        return SlotPlan(None, None)
    ptr, rows = [0], []
    for s in range(max(by_slot) + 1):
        rows += by_slot.get(s, [])
        ptr.append(len(rows))
    return SlotPlan(to_tensor(ptr), to_tensor(rows))


def _gather(rows: list[int], index: list[int], size: int) -> list[int]:
    """The packed row each of `size` padded positions reads: `rows[j]` at `index[j]`, `rows[0]` elsewhere."""
    gather = [rows[0]] * size
    for row, position in zip(rows, index):
        gather[position] = row
    return gather


def _runs(slots: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """Maximal runs (start, length, slot) of one slot != -1 in `slots[start:end]`."""
    runs: list[tuple[int, int, int]] = []
    i = start
    while i < end:
        j = i + 1
        while j < end and slots[j] == slots[i]:
            j += 1
        if slots[i] >= 0:
            runs.append((i, j - i, slots[i]))
        i = j
    return runs


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
    runs = {r[2]: r for r in _runs(dec, 0, len(dec))}
    heavy = {s for s, c in counts.items() if c > HEAVY_FACTOR * mean and c > 1 and runs.get(s, (0, 0))[1] == c}
    light = {s: c for s, c in counts.items() if s not in heavy}
    if not light:
        return 0, 0, [], [], [runs[s] for s in sorted(heavy)]
    pad_slots, width = max(light) + 1, max(light.values())
    rows, index, seen = [], [], Counter()
    for row, s in enumerate(dec):
        if s in light:
            rows.append(row)
            index.append(s * width + seen[s])
            seen[s] += 1
    return pad_slots, width, rows, index, [runs[s] for s in sorted(heavy)]
