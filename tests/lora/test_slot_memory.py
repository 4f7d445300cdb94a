"""The slot arena: zeroed, aligned, bounded buffers on huge pages where the OS allows them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.lora.slot_memory import ALIGN, HUGE_PAGE, SlotArena

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def anon_huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_buffers_are_zeroed_aligned_and_disjoint():
    shapes = [(3, 5, 7), (2, 11), (4, 4, 4)]
    arena = SlotArena(SlotArena.bytes_for(shapes, torch.bfloat16))
    buffers = [arena.zeros(shape, torch.bfloat16) for shape in shapes]
    for buf, shape in zip(buffers, shapes):
        assert buf.shape == shape and buf.dtype == torch.bfloat16 and buf.is_contiguous()
        assert buf.data_ptr() % ALIGN == 0 and not buf.any()
    for i, buf in enumerate(buffers):
        buf.fill_(i + 1)
    assert [int(buf.float().mean()) for buf in buffers] == [1, 2, 3]  # no two overlap
    with pytest.raises(RuntimeError, match="cannot hold"):
        arena.zeros((1,), torch.bfloat16)


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="transparent huge pages are off here")
def test_written_slots_sit_on_huge_pages():
    before = anon_huge_kb()
    arena = SlotArena(8 * HUGE_PAGE)
    buf = arena.zeros((8 * HUGE_PAGE // 4,), torch.float32)
    buf.fill_(1.0)
    assert anon_huge_kb() - before >= 4 * HUGE_PAGE // 1024
