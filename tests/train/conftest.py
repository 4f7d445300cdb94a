"""Fixtures for the training tests: the real default tokenizer and a tiny random Llama beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from server.config import Settings
from server.models import EMBEDDED_NAME, embedded_gguf_path


def default_tokenizer() -> PreTrainedTokenizerBase:
    """From the converted cache when there is one; else straight from the GGUF (no weight conversion)."""
    cached = Settings().cache_dir / "models" / EMBEDDED_NAME
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached, local_files_only=True)
    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 Llama with random weights and the real tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = default_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        initializer_range=0.2,  # big enough embeddings that LoRA can move the logits in a few steps
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


@pytest.fixture()
def tiny_base(tiny_model_dir: Path):
    """A fresh tiny base model each test: PEFT wraps models in place."""
    from server.models import load_base_model

    return load_base_model(Settings(model=str(tiny_model_dir), device="cpu"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are all small ops: on a shared CPU a second thread only adds waiting at barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
