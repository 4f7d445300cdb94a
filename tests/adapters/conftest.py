"""Tiny random base models and real PEFT adapters saved from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from server.adapters.layout import BaseLayout
from tests.peft_adapters import random_peft_model


def tiny_llama(num_hidden_layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def new_llama() -> Callable[..., LlamaForCausalLM]:
    """A factory: a fresh tiny random Llama (PEFT wraps models in place, so tests need new ones)."""
    return tiny_llama


@pytest.fixture(scope="session")
def layout() -> BaseLayout:
    return BaseLayout.from_model(tiny_llama())


MakeAdapter = Callable[..., tuple[Path, PeftModel]]


@pytest.fixture
def make_adapter(tmp_path: Path) -> MakeAdapter:
    """Save a real PEFT LoRA adapter (random A and B) of a fresh tiny Llama into a folder."""
    count = 0

    def make(num_hidden_layers: int = 2, **lora: Any) -> tuple[Path, PeftModel]:
        nonlocal count
        count += 1
        folder = tmp_path / f"adapter{count}"
        lora.setdefault("target_modules", ["q_proj", "v_proj"])
        lora.setdefault("r", 4)
        lora.setdefault("lora_alpha", 8)
        model = random_peft_model(tiny_llama(num_hidden_layers), seed=count, copy_base=False, **lora)
        model.save_pretrained(folder)
        return folder, model

    return make

