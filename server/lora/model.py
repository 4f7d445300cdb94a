"""Injection of slot-buffered LoRA layers into a transformers model, and slot writes."""

from __future__ import annotations

import torch
from torch import nn

from server.adapters.layout import BaseLayout
from server.adapters.peft_format import ParsedAdapter
from server.lora.layers import LoraLinear
from server.lora.mapping import LoraContext
from server.lora.ops import select_impl


class LoraModel:
    """Owns the LoRA layers wrapped around every linear module of one base model.

    Every module in `layout.linear` is wrapped once, at start-up, so any adapter that
    validates against the layout can be written into any slot without touching the model.
    """

    def __init__(self, model: nn.Module, layout: BaseLayout, max_loras: int, max_rank: int) -> None:
        weight = next(model.parameters())
        self.model = model
        self.layout = layout
        self.max_loras, self.max_rank = max_loras, max_rank
        self.context = LoraContext(max_loras, weight.device)
        impl = select_impl(weight.device, weight.dtype)
        self.layers: dict[str, LoraLinear] = {}
        self.slot_writes = 0  # adapters copied into slots since start-up (swaps show up here)
        for name, (fan_in, fan_out) in layout.linear.items():
            base = model.get_submodule(name)
            layer = LoraLinear(base, fan_in, fan_out, max_loras, max_rank, self.context, impl)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            self.layers[name] = layer

    def write_slot(self, slot: int, adapter: ParsedAdapter) -> None:
        """Load `adapter` into `slot` of every layer (modules it does not target get zeros)."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter rank {adapter.rank} exceeds max_lora_rank {self.max_rank}")
        for name, layer in self.layers.items():
            weights = adapter.modules.get(name)
            if weights is None:
                layer.clear_slot(slot)
            else:
                layer.write_slot(slot, weights.a, weights.b, weights.scale)
        self.context.slot_ranks[slot] = adapter.rank
        self.slot_writes += 1

    def clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.context.slot_ranks[slot] = 0
