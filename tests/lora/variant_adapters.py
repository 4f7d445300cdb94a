"""PEFT adapters of every kind the server serves beyond plain LoRA, saved as PEFT saves them, with the
parts PEFT initialises to a no-op perturbed (DoRA magnitudes, trained copies, token rows), so each
one's output clearly differs from plain LoRA and from the base. PEFT is the oracle."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftModel

from tests.peft_adapters import random_peft_model

# name -> LoraConfig keywords; the tied and untied bases both take every one of them.
VARIANT_CONFIGS: dict[str, dict] = {
    "dora-all": dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True),
    "dora-qv-rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, use_rslora=True),
    "embed-head": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    "head-dora": dict(r=6, lora_alpha=12, target_modules=["lm_head", "v_proj"], use_dora=True),
    "saved-copies": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    "tokens": dict(r=4, lora_alpha=8, target_modules=["o_proj"], trainable_token_indices=[3, 5, 7, 9, 11, 200]),
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}


@torch.no_grad()
def perturb(model: PeftModel, seed: int, strength: float = 0.5) -> None:
    """Move what PEFT initialises to a no-op: DoRA magnitudes (PEFT starts them at ||W + sBA||, g = 1),
    modules_to_save copies and trainable token rows (PEFT starts them as the base's)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name:
            param.mul_(1 + strength * (torch.rand(param.shape, generator=gen) - 0.5))
        elif "modules_to_save" in name or "trainable_tokens_delta" in name:
            param.add_(strength * torch.randn(param.shape, generator=gen) * param.std())


def save_variant(base: torch.nn.Module, folder: Path, seed: int, scale_b: float = 1.0, **lora) -> Path:
    model = random_peft_model(base, seed, scale_b, **lora)
    perturb(model, seed)
    model.save_pretrained(folder)
    return folder


def make_variant_adapters(base: torch.nn.Module, folder: Path, names: list[str] | None = None,
                          scale_b: float = 1.0) -> dict[str, Path]:
    names = names or list(VARIANT_CONFIGS)
    return {name: save_variant(base, folder / name, 300 + i, scale_b, **VARIANT_CONFIGS[name])
            for i, name in enumerate(names)}


class SeparateOracles:
    """One PeftModel per adapter (PEFT cannot hold an embedding LoRA and a trained copy of the same
    embedding in one model), behind the `set_adapter` / `disable_adapter` interface of one PeftModel."""

    def __init__(self, base: torch.nn.Module, paths: dict[str, Path]) -> None:
        self.models = {name: PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
                       for name, path in paths.items()}
        self.active = next(iter(self.models))

    def set_adapter(self, name: str) -> None:
        self.active = name

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        with self.models[self.active].disable_adapter():
            yield

    def __call__(self, **kwargs):
        return self.models[self.active](**kwargs)

    def generate(self, **kwargs):
        return self.models[self.active].generate(**kwargs)
