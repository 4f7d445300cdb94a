"""A linear layer of the frozen base with `max_loras` adapter slots beside it."""

from __future__ import annotations

import torch
from torch import nn

from server.lora.mapping import LoraContext
from server.lora.ops import Impl, add_lora_


class LoraLinear(nn.Module):
    """y = base(x) + b[slot] @ a[slot] @ x, per token, for every adapter slot in the batch.

    Buffers, allocated once on the base layer's device and dtype:
        lora_a  [max_loras, max_rank, in_features]
        lora_b  [max_loras, out_features, max_rank]   (scale folded in)
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int,
                 max_loras: int, max_rank: int, context: LoraContext, impl: Impl) -> None:
        super().__init__()
        weight = next(base.parameters())
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.context = context
        self.impl = impl
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.register_buffer("lora_a", torch.zeros(max_loras, max_rank, in_features, **kw), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, out_features, max_rank, **kw), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mapping = self.context.mapping_for(x.numel() // self.in_features)
        if mapping is None or mapping.num_lora_tokens == 0:
            return y
        y = y.contiguous()
        add_lora_(y.view(-1, self.out_features), x.reshape(-1, self.in_features),
                  self.lora_a, self.lora_b, mapping, self.impl)
        return y

    @torch.no_grad()
    def write_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Copy one adapter's A [r, in] and B [out, r] into `slot`, zero-padding past rank r."""
        r = a.shape[0]
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :r].copy_(a)
        self.lora_b[slot, :, :r].copy_(b.to(torch.float32) * scale)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
