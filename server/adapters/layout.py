"""The base model's module layout as LoRA sees it: the single source of truth for which
modules can carry an adapter (the LoRA layers wrap exactly `BaseLayout.linear`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class BaseLayout:
    """The base model's modules, as LoRA sees them."""

    linear: dict[str, tuple[int, int]]  # LoRA-able module name -> (in_features, out_features)
    other: frozenset[str]  # every other module name (embeddings, lm_head, norms, containers)
    output_name: str | None  # name of the output layer (lm_head), never a LoRA target
    embeddings: frozenset[str] = frozenset()  # the nn.Embedding modules (subset of `other`)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> BaseLayout:
        output = _output_module(model)
        linear: dict[str, tuple[int, int]] = {}
        other: set[str] = set()
        embeddings: set[str] = set()
        output_name = None
        for name, module in model.named_modules():
            if not name:  # the root is never a target (PEFT skips it too)
                continue
            if module is output:
                output_name = name
            dims = None if module is output else _linear_dims(module)
            if dims is None:
                other.add(name)
            else:
                linear[name] = dims
            if isinstance(module, torch.nn.Embedding):
                embeddings.add(name)
        return cls(linear, frozenset(other), output_name, frozenset(embeddings))


def _output_module(model: torch.nn.Module) -> torch.nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _linear_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) for the layer types PEFT's LoRA treats as linear."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 style: weight is [in, out]
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None
