"""server/huge_pages.py: copies in 2 MiB pages hold the same values, sit on a page boundary, get huge pages
where the kernel gives them, hold no memory past their bytes, and are unmapped with the tensor."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from server.engine.memory import tensor_bytes
from server.huge_pages import HUGE_PAGE, available, empty_in_huge_pages, in_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(not available(), reason="no MADV_HUGEPAGE on this platform")


def mapping_of(ptr: int) -> dict[str, int] | None:
    """The /proc/self/smaps sizes (kB) of the mapping holding address `ptr`; None if none does."""
    found: dict[str, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head[0] == "VmFlags:" and found is not None:  # a mapping's last line
            return found
        if "-" in head[0] and ":" not in head[0]:  # a mapping's first line: "start-end perms offset dev inode"
            start, end = (int(v, 16) for v in head[0].split("-"))
            found = {} if start <= ptr < end else None
        elif found is not None and len(head) >= 2 and head[1].isdigit():
            found[head[0].rstrip(":")] = int(head[1])
    return found


def huge_pages_granted() -> bool:
    return THP.exists() and "[never]" not in THP.read_text()


def test_a_copy_holds_the_same_values_from_a_page_boundary_in_huge_pages():
    source = torch.randn(3, 5_000_000)  # 60 MB: 28 whole huge pages
    copy = in_huge_pages(source)
    assert copy.dtype == source.dtype and copy.shape == source.shape and torch.equal(copy, source)
    assert copy.data_ptr() % HUGE_PAGE == 0 and copy.data_ptr() != source.data_ptr()
    fields = mapping_of(copy.data_ptr())
    assert fields is not None
    if huge_pages_granted():
        assert fields["AnonHugePages"] >= (source.numel() * 4 // HUGE_PAGE - 2) * HUGE_PAGE // 1024, fields


def test_no_huge_page_reaches_past_the_tensor():
    """Only the whole 2 MiB spans inside the bytes are advised (their own mapping), so the last, partial one
    stays in 4 KiB pages, and a tensor holds no memory past its end."""
    copy = in_huge_pages(torch.ones(HUGE_PAGE + 4096, dtype=torch.uint8))  # one whole huge page and 4 KiB
    copy += 1
    advised = mapping_of(copy.data_ptr())
    assert advised is not None and advised["Size"] == HUGE_PAGE // 1024, advised
    assert mapping_of(copy.data_ptr() + HUGE_PAGE) != advised


def test_the_mapping_is_released_with_the_tensor():
    copy = in_huge_pages(torch.zeros(4 * HUGE_PAGE, dtype=torch.uint8))
    ptr = copy.data_ptr()
    part = copy[10:20]  # a view keeps it
    del copy
    gc.collect()
    assert mapping_of(ptr) is not None and int(part.sum()) == 0
    del part
    gc.collect()
    assert mapping_of(ptr) is None


def test_small_and_device_tensors_are_returned_as_they_are():
    small = torch.ones(1000)
    assert in_huge_pages(small) is small
    assert empty_in_huge_pages(100, torch.float32).numel() == 100


def test_an_empty_tensor_commits_nothing_until_written():
    pool = empty_in_huge_pages(64 * HUGE_PAGE // 4, torch.float32)  # 128 MiB
    assert pool.numel() == 64 * HUGE_PAGE // 4 and pool.data_ptr() % HUGE_PAGE == 0
    assert mapping_of(pool.data_ptr())["Rss"] == 0
    pool[: HUGE_PAGE // 4].fill_(1.0)  # one page's worth
    assert mapping_of(pool.data_ptr())["Rss"] <= 2 * HUGE_PAGE // 1024
    assert float(pool[: HUGE_PAGE // 4].sum()) == HUGE_PAGE // 4


def test_the_memory_metric_counts_a_copy_by_its_own_bytes():
    """`loraplex_memory_bytes{owner="model"}` sums storages by the span their tensors cover: a copy counts its
    bytes, not its mapping's alignment slack; views of one buffer count it once."""
    source = torch.randn(1_000_000)
    assert tensor_bytes([in_huge_pages(source)]) == source.numel() * 4
    fused = in_huge_pages(torch.randn(3, 1_000_000))
    assert tensor_bytes([fused[0], fused[1:]]) == fused.numel() * 4
