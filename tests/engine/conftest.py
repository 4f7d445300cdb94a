"""Engines on real models: tiny random Llama/Qwen2 (with the default tokenizer) or the default model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, GenerationResult, SamplingParams
from server.engine.stream import RequestStream
from server.models import embedded_model_dir, load_base_model
from tests.conftest import TEST_CACHE
from tests.peft_adapters import save_adapter  # noqa: F401  (re-exported for the engine tests)

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=2, pad_token_id=2, bos_token_id=1)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return embedded_model_dir(TEST_CACHE)


def save_tiny(folder: Path, arch: str, tokenizer_dir: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(vocab_size=len(tokenizer), **TINY), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path_factory, tokenizer_dir) -> Path:
    return save_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param, tokenizer_dir)


def make_engine(model_dir: Path | None, store: Path, **overrides) -> Engine:
    settings = Settings(model=str(model_dir) if model_dir else None, cache_dir=TEST_CACHE, device="cpu",
                        adapters_dir=store, **overrides)
    engine = Engine(load_base_model(settings), settings)
    engine.load_store()
    return engine


def greedy(model: str, prompt: str, max_tokens: int = 16, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    return GenerationRequest(f"req-{id(prompt)}-{model}-{max_tokens}-{len(params)}", model, prompt,
                             SamplingParams(max_tokens=max_tokens, **params))


def peft_greedy_text(oracle, tokenizer, prompt: str, steps: int) -> str:
    """A PEFT model's greedy continuation of `prompt`, exactly `steps` tokens (the oracle of engine outputs)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        out = oracle.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, pad_token_id=2)
    return tokenizer.decode(out[0, ids.shape[1]:])


async def run_all(engine: Engine, requests: list[GenerationRequest], stagger: float = 0.0) -> list[GenerationResult]:
    """Submit requests `stagger` seconds apart, so they join a batch that is already running."""
    tasks = []
    for request in requests:
        tasks.append(asyncio.ensure_future(engine.generate(request)))
        if stagger:
            await asyncio.sleep(stagger)
    return await asyncio.gather(*tasks)


async def submit_one(engine: Engine, request: GenerationRequest) -> RequestStream:
    """The one stream of an n == 1 request."""
    (stream,) = await engine.submit(request)
    return stream


async def one_at_a_time(engine: Engine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    return [await engine.generate(r) for r in requests]


@pytest.fixture
def started() -> Callable[[Engine], Engine]:
    engines: list[Engine] = []

    def start(engine: Engine) -> Engine:
        engine.start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.stop()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer_dir)
