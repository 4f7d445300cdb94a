"""Random PEFT LoRA adapters for the default model, built as bytes without loading the model.

Each adapter is the two files PEFT's `save_pretrained` writes (adapter_config.json and
adapter_model.safetensors, keys `base_model.model.<module>.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r]). A large B scale makes every seed steer greedy decoding to its
own text, so an answer from the wrong weights is visible. Shapes come from the cached
model's config.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache

import torch
from safetensors.torch import save as save_safetensors

from tests.reliability.server_proc import CACHE

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Adapter:
    """The exact bytes of one adapter upload and the identity the server must report for them."""

    config: bytes
    weights: bytes

    @property
    def sha256(self) -> str:
        return identity(self.config, self.weights)

    @property
    def size(self) -> int:
        return len(self.config) + len(self.weights)


def identity(config: bytes, weights: bytes) -> str:
    """The CONTRACT's identity hash over the stored bytes."""
    head = b"loraplex-adapter-v1\0" + len(config).to_bytes(8, "little")
    return hashlib.sha256(head + config + weights).hexdigest()


@cache
def model_shapes() -> dict:
    folders = sorted(p for p in (CACHE / "models").iterdir() if (p / "config.json").exists())
    config = json.loads((folders[0] / "config.json").read_text())
    hidden, inter, head = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    kv = config["num_key_value_heads"] * head
    q = config["num_attention_heads"] * head
    return {"layers": config["num_hidden_layers"],
            "linear": {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
                       "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}}


def module_path(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if kind in ATTENTION else 'mlp'}.{kind}"


def lora_config(rank: int, targets: tuple[str, ...], alpha: float | None = None, **extra) -> bytes:
    body = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha or 2 * rank,
            "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", **extra}
    return json.dumps(body, sort_keys=True).encode()


def lora_tensors(seed: int, rank: int, targets: tuple[str, ...], scale_b: float,
                 layers: range | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A [r, in] ~ N(0, 1/in) and B [out, r] ~ N(0, scale_b^2) for every targeted module."""
    shapes = model_shapes()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers if layers is not None else range(shapes["layers"]):
        for kind in targets:
            fan_in, fan_out = shapes["linear"][kind]
            key = f"base_model.model.{module_path(layer, kind)}"
            a = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
            b = torch.randn(fan_out, rank, generator=generator) * scale_b
            tensors[f"{key}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = b.to(dtype).contiguous()
    return tensors


def random_adapter(seed: int, rank: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                   scale_b: float = 0.5) -> Adapter:
    """A valid adapter whose greedy outputs differ from the base model's and from other seeds'."""
    weights = save_safetensors(lora_tensors(seed, rank, targets, scale_b), metadata={"seed": str(seed)})
    return Adapter(lora_config(rank, targets), weights)


def big_adapter(target_bytes: int, seed: int = 0) -> Adapter:
    """A structurally valid rank-8 adapter plus one stray tensor of ~`target_bytes`: the server must read
    and decode all of it before it can refuse the stray key (the worst case of a slow, large upload)."""
    tensors = lora_tensors(seed, 8, ("q_proj",), 0.1)
    tensors["base_model.model.padding.lora_A.weight"] = torch.zeros(max(1, target_bytes // 4), dtype=torch.float32)
    return Adapter(lora_config(8, ("q_proj",)), save_safetensors(tensors))
