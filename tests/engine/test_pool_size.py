"""How much memory the adapters get from the settings: a pool in bytes with the compiled CPU kernels,
padded slots otherwise (on a GPU, from what the model and the KV cache leave)."""

from __future__ import annotations

from server.config import Settings
from server.engine.pool_size import CPU_POOL_MAX, CPU_POOL_MIN, POOL_SLOTS, lora_capacity

SLOT = 20 * 2**20  # one padded slot's bytes


def test_pool_from_flag_or_available_memory_and_max_loras_only_caps_the_count():
    assert lora_capacity(Settings(lora_pool_gb=0.5), True, SLOT) == (POOL_SLOTS, 2**29)
    assert lora_capacity(Settings(lora_pool_gb=0.5, max_loras=16), True, SLOT) == (16, 2**29)
    slots, nbytes = lora_capacity(Settings(), True, SLOT)
    assert slots == POOL_SLOTS and CPU_POOL_MIN <= nbytes <= CPU_POOL_MAX


def test_padded_slots_from_the_pool_flag_or_the_gpu_memory_left():
    assert lora_capacity(Settings(), False, SLOT) == (8, None)  # the CPU's batched-matmul path
    assert lora_capacity(Settings(max_loras=3), False, SLOT, device_free=2**40) == (3, None)
    assert lora_capacity(Settings(lora_pool_gb=1.0), False, SLOT) == (51, None)
    assert lora_capacity(Settings(), False, SLOT, device_free=4 * 2**30) == (102, None)  # half of 4 GiB
    assert lora_capacity(Settings(), False, SLOT, device_free=2**28) == (8, None)  # never below 8
    assert lora_capacity(Settings(), False, SLOT, device_free=2**40) == (256, None)


def test_gpu_pool_takes_the_bytes_the_padded_slots_took():
    """The Triton kernels read a pool on a GPU: it gets the bytes the padded slots had, all committed at once."""
    assert lora_capacity(Settings(), True, SLOT, device_free=4 * 2**30) == (POOL_SLOTS, 102 * SLOT)
    assert lora_capacity(Settings(max_loras=3), True, SLOT, device_free=2**40) == (3, 3 * SLOT)
    assert lora_capacity(Settings(lora_pool_gb=0.5), True, SLOT, device_free=2**40) == (POOL_SLOTS, 2**29)
