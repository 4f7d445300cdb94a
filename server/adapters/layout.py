"""The base model's module layout as LoRA sees it: the single source of truth for which
modules can carry an adapter (the LoRA layers wrap exactly `BaseLayout.linear`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from transformers.pytorch_utils import Conv1D

from server.quant.linear import QuantLinear


@dataclass(frozen=True)
class BaseLayout:
    """The base model's modules, as LoRA sees them."""

    linear: dict[str, tuple[int, int]]  # module name -> (in_features, out_features), wrapped at start-up
    other: frozenset[str]  # every other module name (embeddings, lm_head, norms, containers)
    output_name: str | None  # name of the output layer (lm_head): LoRA there runs on the head's rows only
    embeddings: frozenset[str] = frozenset()  # the nn.Embedding modules (subset of `other`)
    # (in, out) of the output layer and of the input embedding: an embedding's LoRA A is [r, vocab] and
    # its B [dim, r], the same shapes as a linear layer's with in = vocab and out = dim.
    special_dims: dict[str, tuple[int, int]] = field(default_factory=dict)
    input_embedding: str | None = None  # the module `get_input_embeddings()` returns
    tied: bool = False  # the output layer's weight is the input embedding's (tie_word_embeddings)
    # The base weights of those two modules (references, not copies): adapters' copies are checked against them.
    reference: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def dims(self, name: str) -> tuple[int, int]:
        """(in, out) of any module that may carry LoRA (linear, output layer, input embedding)."""
        return self.linear[name] if name in self.linear else self.special_dims[name]

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> BaseLayout:
        output = _output_module(model)
        embedding = _input_embedding(model)
        linear: dict[str, tuple[int, int]] = {}
        other: set[str] = set()
        embeddings: set[str] = set()
        output_name = input_name = None
        special: dict[str, tuple[int, int]] = {}
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
            if module is embedding and isinstance(module, torch.nn.Embedding):
                special[name] = (module.num_embeddings, module.embedding_dim)
                input_name = name
            elif module is output and isinstance(module, torch.nn.Linear):
                special[name] = (module.in_features, module.out_features)
        tied = output is not None and embedding is not None and getattr(output, "weight", None) is getattr(
            embedding, "weight", 0)
        reference = {name: cast(torch.Tensor, model.get_submodule(name).weight) for name in special}
        return cls(linear, frozenset(other), output_name, frozenset(embeddings), special, input_name, tied, reference)


def _output_module(model: torch.nn.Module) -> torch.nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _input_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except NotImplementedError:  # transformers' default for models without one
        return None


def _linear_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) for the layer types PEFT's LoRA treats as linear."""
    if isinstance(module, (torch.nn.Linear, QuantLinear)):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 style: weight is [in, out]
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None
