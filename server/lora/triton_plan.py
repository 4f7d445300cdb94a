"""The Triton backend's plan of a step (`LoraStepMeta.plan`): every maximal run of consecutive rows with one
slot != -1, over ALL rows (decode runs and prefill chunks alike; base runs left out), the SGMV view of the
step. The BGMV kernels read the common core's `token_slots` instead; `max_seg_len` picks between the two
(server/lora/triton_ops.py). Kept apart from the kernels: building it needs no triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.lora.step import ToDevice, runs


@dataclass(frozen=True, eq=False)
class SegmentPlan:
    """`starts / lens / slots [G]` int64 on the device: the runs; `max_seg_len`, `num_segments` python ints."""

    starts: torch.Tensor
    lens: torch.Tensor
    slots: torch.Tensor
    max_seg_len: int
    num_segments: int


def plan_segments(slots: list[int], num_decode: int, to_device: ToDevice) -> SegmentPlan:
    found = runs(slots, 0, len(slots))
    return SegmentPlan(to_device([r[0] for r in found], torch.int64), to_device([r[1] for r in found], torch.int64),
                       to_device([r[2] for r in found], torch.int64), max((r[1] for r in found), default=0),
                       len(found))
