"""The LoRA half of one step's context: which adapter slot every packed token uses, built ONCE per step on
the host and shared by every LoRA layer: a common core, plus the plan of the one backend that runs the op.

Row order the engine packs (and the CPU paths are fastest on, though any order is correct): decode rows
first (one token per sequence) grouped by slot, then prefill chunks.

The common core (N packed tokens, S slots; every tensor on the model's device):

- `token_slots [N]` int64: slot of each token, -1 = base model; `host_slots` the same as python ints
  (per-slot work on a few rows: the output layer's and the embedding's replaced weights).
- `slot_ranks [S]` int32: rank of the adapter in each slot, 0 for an empty slot (A/B are zero-padded past
  it, so a kernel may compute with the buffers' full R); `ranks` the same as python ints; `max_rank` the
  buffers' rank width R (0 when unknown).
- `num_decode`: rows `[0, num_decode)` are decode rows, the rest prefill rows.
- `row_mask`: bitmask of the slots any row uses (a layer whose weights hold nothing in them skips the op;
  server/lora/ranks.py).
- `excess_index [N]`: `token_slots + 1`, built on first use (DoRA's per-slot vectors keep the base's zeros
  at index 0, server/lora/dora.py).

`plan` is the active backend's own plan, built by its `Backend.plan` (server/lora/ops.py) from the same
host ints: the Triton kernels' segments (server/lora/triton_plan.py), the batched-matmul path's padded
batch (server/lora/cpu_ops.py), the compiled kernels' CSR of rows per slot (server/lora/cpu_native.py);
None for the torch reference, which reads `token_slots` only.

On CUDA the step's tables go through `DeviceTables`: written into pinned host buffers that are reused
from step to step and copied without blocking the host (a copy from pageable memory waits for the GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

# (ints, dtype) -> that table on the step's device; what a backend's planner builds its tensors with.
ToDevice = Callable[[Sequence[int], torch.dtype], torch.Tensor]
# (slots per packed row, decode rows, to_device) -> the backend's own plan.
Planner = Callable[[list[int], int, ToDevice], Any]


def no_plan(slots: list[int], num_decode: int, to_device: ToDevice) -> None:
    """The plan of a backend that reads the common core only (the torch reference)."""
    return None


class DeviceTables:
    """Puts a step's int tables on the device. On CUDA each table is written into a pinned host buffer kept
    per dtype and reused every step, and copied with `non_blocking`; the next step's writes wait for the
    copies of the one before (an event), not for the GPU's work. Elsewhere it makes plain tensors (`staged`
    True there reuses unpinned buffers: the staging alone, for tests)."""

    def __init__(self, device: torch.device | str, staged: bool | None = None) -> None:
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self.staged = self.pinned if staged is None else staged
        self._host: dict[torch.dtype, torch.Tensor] = {}
        self._used: dict[torch.dtype, int] = {}
        self._copied: Any = None  # torch.cuda.Event after the last step's copies

    def begin(self) -> None:
        """A new step: the buffers' earlier contents may be overwritten once their copies are done."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        self._used.clear()

    def end(self) -> None:
        if self.pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def __call__(self, values: Sequence[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        if not self.staged:
            return torch.tensor(values, dtype=dtype, device=self.device)
        start, n = self._used.get(dtype, 0), len(values)
        host = self._host.get(dtype)
        if host is None or host.numel() < start + n:
            # A bigger buffer; the old one stays alive until its copies are done (torch's pinned allocator).
            host = torch.empty(max(1024, 2 * (start + n)), dtype=dtype, pin_memory=self.pinned)
            self._host[dtype] = host
            start = 0
        self._used[dtype] = start + n
        part = host[start:start + n]
        part.copy_(torch.tensor(values, dtype=dtype))
        return part.to(self.device, non_blocking=True)


@dataclass(frozen=True, eq=False)
class LoraStepMeta:
    """One step's token -> slot mapping (see the module docstring for every field)."""

    token_slots: torch.Tensor
    slot_ranks: torch.Tensor
    num_tokens: int
    num_decode: int
    num_lora_tokens: int
    plan: Any = None
    max_rank: int = 0
    ranks: tuple[int, ...] = ()
    row_mask: int = 0
    host_slots: tuple[int, ...] = ()

    @cached_property
    def excess_index(self) -> torch.Tensor:
        return self.token_slots + 1

    @classmethod
    def build(cls, token_slots: list[int], slot_ranks: list[int], device: torch.device | str = "cpu",
              num_decode: int = 0, max_rank: int = 0, planner: Planner = no_plan,
              tables: DeviceTables | None = None) -> LoraStepMeta:
        """Plan a step from host ints: `token_slots` per packed row (-1 = base), the rank of every slot, how
        many leading rows are decode rows, the buffers' rank width (0: unknown), and the backend's `planner`
        (`Backend.plan`). `tables`: the owner's `DeviceTables` for `device`, reused step after step."""
        n = len(token_slots)
        if not 0 <= num_decode <= n:
            raise ValueError(f"num_decode {num_decode} outside 0..{n}")
        tables = tables or DeviceTables(device)
        tables.begin()
        try:
            return cls(
                token_slots=tables(token_slots, torch.int64), slot_ranks=tables(slot_ranks, torch.int32),
                num_tokens=n, num_decode=num_decode, num_lora_tokens=sum(s >= 0 for s in token_slots),
                plan=planner(token_slots, num_decode, tables), max_rank=max_rank, ranks=tuple(slot_ranks),
                row_mask=sum(1 << s for s in set(token_slots) if s >= 0), host_slots=tuple(token_slots),
            )
        finally:
            tables.end()


def runs(slots: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """Maximal runs (start, length, slot) of one slot != -1 in `slots[start:end]`."""
    found: list[tuple[int, int, int]] = []
    i = start
    while i < end:
        j = i + 1
        while j < end and slots[j] == slots[i]:
            j += 1
        if slots[i] >= 0:
            found.append((i, j - i, slots[i]))
        i = j
    return found
