"""Real PEFT adapters for tests and benchmarks: the one helper that makes them.

Random non-zero A and B (PEFT's `init_lora_weights=False`), saved exactly as PEFT saves them;
PEFT itself is the oracle for LoRA numerics (`peft_reference`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

# Mixed ranks 4..64, rsLoRA and plain, rank/alpha patterns, and different target sets.
ADAPTER_CONFIGS: dict[str, dict] = {
    "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-r8-rslora": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "regex-r16": dict(r=16, lora_alpha=8, target_modules=r".*\.(k_proj|o_proj)"),
    "mlp-r32": dict(r=32, lora_alpha=64, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all-r64": dict(r=64, lora_alpha=32, target_modules="all-linear"),
    "patterns-r8": dict(r=8, lora_alpha=16, target_modules="all-linear",
                        rank_pattern={"q_proj": 16}, alpha_pattern={"down_proj": 4}),
    "layer1-r12": dict(r=12, lora_alpha=24, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                       layers_to_transform=[1]),
    "rslora-r6": dict(r=6, lora_alpha=3, target_modules=["q_proj", "up_proj"], use_rslora=True),
}


def random_peft_model(base: torch.nn.Module, seed: int, scale_b: float = 1.0, copy_base: bool = True,
                      **lora) -> PeftModel:
    """A PEFT LoRA model of `base` (deep-copied unless `copy_base=False`) with random A and B, B scaled by `scale_b`."""
    model = copy.deepcopy(base) if copy_base else base
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    if scale_b != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale_b)
    return peft_model


def save_adapter(base: torch.nn.Module, folder: Path, seed: int, scale_b: float = 1.0, **lora) -> Path:
    """Save a PEFT LoRA adapter of `base` (left untouched) with B scaled by `scale_b` to keep logits sane."""
    random_peft_model(base, seed, scale_b, **lora).save_pretrained(folder)
    return folder


def make_peft_adapters(base: torch.nn.Module, folder: Path, scale_b: float = 1.0) -> dict[str, Path]:
    """Save every adapter of ADAPTER_CONFIGS with non-zero random A and B; returns name -> folder."""
    paths = {}
    for i, (name, kwargs) in enumerate(ADAPTER_CONFIGS.items()):
        paths[name] = save_adapter(base, folder / name, seed=100 + i, scale_b=scale_b, **kwargs)
    return paths


def peft_reference(base: torch.nn.Module, path: Path) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def save_bfloat16_copy(source: Path, folder: Path) -> Path:
    """`source`'s adapter saved again with bfloat16 weights (as PEFT saves adapters trained in bfloat16)."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    tensors = load_file(source / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder
