"""Host tensors in 2 MiB pages, for the bytes every decode step streams from memory.

    blocks = in_huge_pages(blocks)      # a copy backed by transparent huge pages, or `blocks` itself

A decode step reads the model's weights (and every in-flight adapter's A and B) once each, in long runs. From
4 KiB pages the core's streaming read stops short of its rate: on a Zen 4 core the int8 kernel at one row
read a 1B-class model's Q4_K gate at 19.2-24.0 GB/s from 4 KiB pages and 24.6-27.0 GB/s from 2 MiB ones, its
Q6_K down at 20.0-25.0 and 27.3-27.5 (two runs of `python bench/quantized.py --pages --threads 1`). Linux
gives an anonymous mapping 2 MiB pages where it is asked to (`madvise(MADV_HUGEPAGE)`, which works under the
default `madvise` setting of transparent huge pages and under `always`); torch's own allocator asks only when
`THP_MEM_ALLOC_ENABLE` is set, for every large allocation, so the weights are placed here instead.

Only the whole 2 MiB pages inside a tensor's bytes are advised, so no page reaches past its end and a
tensor holds no more memory than its bytes. Elsewhere (no `MADV_HUGEPAGE`, a non-CPU tensor, under 2 MiB)
the tensor is returned as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from functools import lru_cache

import torch

HUGE_PAGE = 2 << 20


def available() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE")


def in_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU `tensor` whose whole 2 MiB spans are advised as huge pages (the copy's
    memory is freed with the tensor); `tensor` itself where that cannot apply."""
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu" or nbytes < HUGE_PAGE or not available():
        return tensor
    copy = _mapped(nbytes).view(tensor.dtype).view(tensor.shape)
    copy.copy_(tensor)
    return copy


def empty_in_huge_pages(numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uncommitted tensor, on the CPU in 2 MiB pages (committed 2 MiB at a time as they are first written);
    `torch.empty` where that cannot apply."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < HUGE_PAGE or not available():
        return torch.empty(numel, dtype=dtype, device=device)
    return _mapped(nbytes).view(dtype)


def _mapped(nbytes: int) -> torch.Tensor:
    """`nbytes` uint8 of a fresh anonymous mapping, from a 2 MiB boundary, its whole 2 MiB spans advised."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping until the tensor is freed
    start = -whole.data_ptr() % HUGE_PAGE
    mapping.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    return whole[start:start + nbytes]


def release_freed_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`; elsewhere nothing): the 4 KiB copies
    freed once a model's weights have moved keep the process's resident set up otherwise (by their size, 510
    MiB for a 1B-class model, until later allocations reuse them)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")  # runs ldconfig: once
    return ctypes.CDLL(name) if name else None
