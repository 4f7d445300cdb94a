"""The engine's adapter pool under pressure: a pool of two pages for five adapters of mixed ranks and
targets, requests arriving while others run. Adapters are evicted and written again mid-burst, some
admissions wait for room, and every output equals PEFT's greedy `generate` for its adapter."""

from __future__ import annotations

import asyncio

import torch
from peft import PeftModel
from prometheus_client import CollectorRegistry, generate_latest
from transformers import AutoModelForCausalLM

from server.api.metrics import EngineCollector
from server.lora.pool import PAGE_BYTES
from tests.api.test_operations import metric
from tests.engine.conftest import greedy, make_engine, run_all
from tests.engine.test_continuous_batching import PROMPTS, adapter_store

ADAPTERS = 5


def peft_text(model_dir, store, name: str | None, tokenizer, prompt: str, max_tokens: int) -> str:
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = base if name is None else PeftModel.from_pretrained(base, store / name)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                    do_sample=False, eos_token_id=2, pad_token_id=2)
    new = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new[: new.index(2)] if 2 in new else new, skip_special_tokens=True)


def test_outputs_equal_peft_while_adapters_are_evicted(tiny_model_dir, tmp_path, started):
    store = adapter_store(tmp_path, tiny_model_dir, ADAPTERS)
    names = [f"ad{i}" for i in range(ADAPTERS)] + [tiny_model_dir.name]
    engine = started(make_engine(tiny_model_dir, store, lora_pool_gb=2 * PAGE_BYTES / 2**30, max_running=4,
                                 max_batched_tokens=24))
    assert engine.lora.capacity_bytes == 2 * PAGE_BYTES  # each tiny adapter takes one page: two resident
    requests = [greedy(names[i % len(names)], p, max_tokens=10 + i // len(names)) for i, p in enumerate(PROMPTS * 2)]
    got = asyncio.run(run_all(engine, requests, stagger=0.02))
    for request, out in zip(requests, got):
        name = None if request.model == tiny_model_dir.name else request.model
        expected = peft_text(tiny_model_dir, store, name, engine.tokenizer, request.prompt, request.params.max_tokens)
        assert out.text == expected, request.model
    # Four adapters asked for at once with room for two: some admission must wait for the pool (the staggered
    # burst above may finish each request before the next arrives on a loaded machine).
    delayed_before = engine.stats().adapter_pool.admissions_delayed
    asyncio.run(run_all(engine, [greedy(f"ad{i}", PROMPTS[i], max_tokens=30, ignore_eos=True) for i in range(4)]))
    pool = engine.stats().adapter_pool
    assert pool.evictions >= ADAPTERS - 2 and pool.admissions_delayed > delayed_before
    assert pool.resident <= 2 and pool.pinned == 0 and pool.used_bytes <= pool.capacity_bytes
    assert engine.kv_cache.allocator.num_free == engine.kv_cache.allocator.num_total
    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: engine))
    text = generate_latest(registry).decode()
    assert metric(text, "loraplex_adapter_pool_bytes") == 2 * PAGE_BYTES
    assert metric(text, "loraplex_adapter_pool_used_bytes") == pool.resident * PAGE_BYTES
    assert metric(text, "loraplex_adapter_pool_free_pages") == 2 - pool.resident
    assert metric(text, "loraplex_adapter_pool_adapters") == pool.resident
    assert metric(text, "loraplex_adapter_pool_evictions_total") == pool.evictions
    assert metric(text, "loraplex_adapter_pool_admissions_delayed_total") == pool.admissions_delayed
