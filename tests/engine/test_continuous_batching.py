"""Continuous batching with staggered arrivals, mixed adapters (more than slots) and chunked
prefill gives, token for token, the outputs of serving one request at a time."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.conftest import greedy, make_engine, one_at_a_time, run_all, save_adapter

PROMPTS = [
    "The weather today is",
    "Write a long story about a dragon who guards a library full of ancient books, forgotten maps, "
    "and letters from travellers who never came back home. The dragon",
    "1, 2, 3, 4,",
    "Translate to French: good morning, my friend. How are you doing today? I hope that",
    "def add(a, b):",
    "A list of fruits: apple,",
]


def adapter_store(tmp_path, model_dir, count: int):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    targets = [["q_proj", "v_proj"], "all-linear", ["o_proj", "down_proj"]]
    for i in range(count):
        save_adapter(base, tmp_path / f"ad{i}", seed=i, r=4 + 4 * (i % 3), lora_alpha=8,
                     target_modules=targets[i % 3], use_rslora=bool(i % 2))
    return tmp_path


def mixed_requests(names: list[str], max_tokens: int = 20):
    return [greedy(names[i % len(names)], p, max_tokens=max_tokens - i) for i, p in enumerate(PROMPTS * 2)]


def check_equal_to_serial(model_dir, store, names, started):
    # The reference serves one request at a time with roomy settings; the engine under test has
    # 2 slots for 4 adapters and a 24-token step budget, so prompts are prefilled in chunks.
    reference = started(make_engine(model_dir, store, max_loras=8, max_lora_rank=16))
    requests = mixed_requests(names)
    expected = asyncio.run(one_at_a_time(reference, requests))
    reference.stop()
    engine = started(make_engine(model_dir, store, max_loras=2, max_lora_rank=16, max_batched_tokens=24))
    got = asyncio.run(run_all(engine, requests, stagger=0.05))
    for request, exp, out in zip(requests, expected, got):
        assert out.text == exp.text, f"{request.model}: {out.text!r} != {exp.text!r}"
        assert out.completion_tokens == exp.completion_tokens
    adapters = {r.model for r in requests} - {engine.base_name}
    assert engine.lora.slot_writes >= len(adapters) > engine.slots.num_slots  # slots were reused mid-burst
    assert max(len(engine.tokenizer(p)["input_ids"]) for p in PROMPTS) > 24  # some prefills were chunked
    assert engine.kv_cache.allocator.num_free == engine.kv_cache.allocator.num_total
    assert all(engine.slots.pinned(s) == 0 for s in range(engine.slots.num_slots))


def test_tiny_models_batched_equals_serial(tiny_model_dir, tmp_path, started):
    store = adapter_store(tmp_path, tiny_model_dir, 4)
    check_equal_to_serial(tiny_model_dir, store, ["ad0", "ad1", "ad2", "ad3", tiny_model_dir.name], started)


@pytest.mark.slow
@pytest.mark.full
def test_default_model_batched_equals_serial(default_base, tmp_path, started):
    base = default_base.model
    for i in range(4):
        save_adapter(base, tmp_path / f"ad{i}", seed=i, scale_b=0.3, r=8, lora_alpha=16,
                     target_modules=["q_proj", "v_proj", "down_proj"] if i % 2 else "all-linear")
    check_equal_to_serial(None, tmp_path, ["ad0", "ad1", "ad2", "ad3", default_base.name], started)


def test_engine_equals_peft_generate_per_request(tiny_model_dir, tmp_path, started):
    """The one-at-a-time engine itself equals PEFT's greedy `generate` for every adapter."""
    from peft import PeftModel

    store = adapter_store(tmp_path, tiny_model_dir, 3)
    engine = started(make_engine(tiny_model_dir, store, max_loras=2))
    tokenizer = engine.tokenizer
    for name in ["ad0", "ad1", "ad2"]:
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), store / name).eval()
        prompt = PROMPTS[1]
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.inference_mode():
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                               do_sample=False, eos_token_id=2, pad_token_id=2)
        new = out[0, ids.shape[1]:].tolist()
        new = new[: new.index(2)] if 2 in new else new
        result = asyncio.run(engine.generate(greedy(name, prompt, max_tokens=12)))
        assert result.text == tokenizer.decode(new, skip_special_tokens=True), name


def test_preempted_sequences_are_recomputed_to_the_same_output(tiny_model_dir, tmp_path, started):
    # A KV cache of 8 blocks of 16 cannot hold six growing sequences at once: the newest are preempted,
    # their blocks freed, and they are recomputed from the prompt later, with the same greedy output.
    store = adapter_store(tmp_path, tiny_model_dir, 2)
    requests = [greedy(["ad0", "ad1", tiny_model_dir.name][i % 3], p, max_tokens=40) for i, p in enumerate(PROMPTS)]
    reference = started(make_engine(tiny_model_dir, store))
    expected = asyncio.run(one_at_a_time(reference, requests))
    engine = started(make_engine(tiny_model_dir, store, kv_cache_tokens=128, block_size=16))
    got = asyncio.run(run_all(engine, requests))
    assert [g.text for g in got] == [e.text for e in expected]
    assert engine.stats().preemptions > 0 and reference.stats().preemptions == 0
    assert engine.kv_cache.allocator.num_free == engine.kv_cache.allocator.num_total
