"""What the engine holds in memory, by owner: the base model's weights, the KV cache, the adapters.

Counted from the tensors themselves (each storage once, so tied and shared weights count once),
not from the process's resident size, which also holds the Python runtime and libraries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`, each the span its tensors cover (views of one buffer
    count once; a tensor placed inside a larger mapping, as server/huge_pages.py places them, counts its own
    bytes, not the mapping's alignment slack)."""
    spans: dict[tuple[torch.device, int], tuple[int, int]] = {}
    for t in tensors:
        start = t.data_ptr()
        end = start + (_extent(t) * t.element_size() if t.numel() else 0)
        key = (t.device, t.untyped_storage().data_ptr())
        low, high = spans.get(key, (start, end))
        spans[key] = (min(low, start), max(high, end))
    return sum(high - low for low, high in spans.values())


def _extent(t: torch.Tensor) -> int:
    """Elements from a tensor's first to one past its last (its strides' reach)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)


def module_bytes(model: nn.Module) -> int:
    """Parameters and buffers of `model`, each storage once."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


@dataclass(frozen=True)
class MemoryUse:
    model_bytes: int          # the base model's weights (quantized blocks as stored)
    kv_cache_bytes: int       # keys and values of every layer, allocated up front
    adapter_device_bytes: int  # LoRA slots, DoRA vectors and trained copies beside the model
    adapter_cpu_bytes: int    # adapter files held in the CPU tier, ready to be written into slots


def adapter_device_bytes(lora, model_bytes: int) -> int:
    """What wrapping the model for LoRA added to it (`lora`: the engine's LoraModel): the slot buffers or
    the adapter pool's pages in use, plus DoRA vectors and trained copies, which are plain tensors beside
    the modules."""
    dora = sum(layer.dora.excess.nbytes for layer in lora.layers.values() if layer.dora is not None)
    pool = getattr(lora, "pool", None)  # the pool, when the op reads one, is a tensor beside the modules
    pool = 0 if pool is None else pool.used_pages * pool.page_bytes
    return module_bytes(lora.model) - model_bytes + dora + lora.saved_bytes + pool
