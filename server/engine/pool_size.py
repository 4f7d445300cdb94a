"""How much device memory the adapters get: the pool's bytes and the slot-table size, from Settings.

With a pooled LoRA op (the compiled CPU kernels, the Triton kernels) the pool's bytes bound residency and
`--max-loras` is only an optional cap on the count. On other ops the weights sit in slots padded to the max
rank, so `--lora-pool-gb` there sets how many such slots fit. On a GPU without `--lora-pool-gb` the adapters
get the bytes of as many padded slots as half of what the model and the KV cache leave free holds (8 at
least, 256 at most; `--max-loras` of them when set): a pool of those bytes, or those slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from server.config import Settings

PADDED_SLOTS = 8        # padded slots when neither --max-loras nor --lora-pool-gb is set (vLLM's default, 4-8)
POOL_SLOTS = 1024       # slot-table entries beside a pool when --max-loras is unset (tables only: 8 bytes each)
CPU_POOL_SHARE = 0.25   # of the memory available at start-up: the pool is committed only as adapters fill it
CPU_POOL_MAX = 8 * 2**30
CPU_POOL_MIN = 256 * 2**20
GPU_FREE_SHARE = 0.5    # of a GPU's memory left free by the model and the KV cache (activations need the rest)
GPU_SLOTS_MAX = 256     # padded slots on a GPU by default (Triton's BGMV reads one slot per row)


def lora_capacity(settings: Settings, pooled: bool, padded_slot_bytes: int,
                  device_free: int | None = None) -> tuple[int, int | None]:
    """(slots, pool bytes or None) for the LoRA model. `device_free`: a GPU's free bytes once the model and
    the KV cache are allocated (None on the CPU)."""
    if pooled:
        slots = settings.max_loras or POOL_SLOTS
        if settings.lora_pool_gb is not None:
            return slots, int(settings.lora_pool_gb * 2**30)
        if device_free is not None:  # a GPU's memory is committed at once: the padded slots' bytes
            return slots, _gpu_slots(settings, padded_slot_bytes, device_free) * padded_slot_bytes
        return slots, default_cpu_pool_bytes()
    if settings.lora_pool_gb is not None:
        slots = max(1, int(settings.lora_pool_gb * 2**30) // padded_slot_bytes)
        return min(slots, settings.max_loras or POOL_SLOTS), None
    if device_free is None:
        return settings.max_loras or PADDED_SLOTS, None
    return _gpu_slots(settings, padded_slot_bytes, device_free), None


def _gpu_slots(settings: Settings, padded_slot_bytes: int, device_free: int) -> int:
    """Padded slots on a GPU without --lora-pool-gb: --max-loras, else a share of what the KV cache left."""
    if settings.max_loras is not None:
        return settings.max_loras
    fitting = int(GPU_FREE_SHARE * device_free) // padded_slot_bytes
    return max(PADDED_SLOTS, min(GPU_SLOTS_MAX, fitting))


def device_free_bytes(device: torch.device) -> int | None:
    """A CUDA device's free bytes now; None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def default_cpu_pool_bytes() -> int:
    """A quarter of the memory available now, within [256 MiB, 8 GiB]."""
    return int(min(CPU_POOL_MAX, max(CPU_POOL_MIN, CPU_POOL_SHARE * available_memory())))


def available_memory() -> int:
    """MemAvailable of /proc/meminfo (bytes); the physical memory where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")



@dataclass(frozen=True)
class PoolStats:
    """The device's adapter memory now (the metrics' `loraplex_adapter_pool_*`)."""

    capacity_bytes: int       # the pool (padded slots: their count x one slot's bytes)
    used_bytes: int           # taken by resident adapters (whole pages)
    free_pages: int           # pages no adapter holds (padded slots: free slots)
    page_bytes: int           # a page's bytes (padded slots: a slot's)
    resident: int             # adapters on the device
    pinned: int               # of them, used by a running sequence
    evictions: int            # idle adapters evicted to make room, since start-up
    admissions_delayed: int   # admissions put off because running adapters held the room
    compactions: int          # times the pool's extents were slid together to make one hole
