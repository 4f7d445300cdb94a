"""Shared fixtures: tiny random models and the real default model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from server.config import Settings

# The embedded model is converted once per machine into this cache and reused by every test run.
TEST_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "loraplex"


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=1, pad_token_id=0, bos_token_id=None)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def default_settings() -> Settings:
    return Settings(cache_dir=TEST_CACHE, device="cpu")


@pytest.fixture(scope="session")
def default_base(default_settings: Settings):
    from server.models import load_base_model

    return load_base_model(default_settings)
