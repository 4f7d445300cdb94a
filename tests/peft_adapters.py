"""Real PEFT adapters for tests: random non-zero A and B, saved as PEFT saves them."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model


def save_adapter(base: torch.nn.Module, folder: Path, seed: int, scale_b: float = 1.0, **lora) -> Path:
    """Save a PEFT LoRA adapter of `base` (left untouched) with B scaled by `scale_b` to keep logits sane."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale_b)
    model.save_pretrained(folder)
    return folder
