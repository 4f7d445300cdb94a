"""Prefix caching: a hit answers exactly as a miss; blocks are keyed by the weights' content, never by name."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from transformers import AutoModelForCausalLM

from server.engine.kv_cache import BlockAllocator, OutOfBlocks
from tests.engine.conftest import greedy, make_engine, save_adapter

PREFIX = ("You are a careful assistant. Answer briefly and exactly, in plain words, and never make up facts. " * 4)
BLOCK = 8


@pytest.fixture
def store(tmp_path, tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    save_adapter(base, tmp_path / "store" / "a", seed=1, r=8, lora_alpha=16, target_modules="all-linear")
    save_adapter(base, tmp_path / "store" / "b", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    save_adapter(base, tmp_path / "a-new", seed=3, r=8, lora_alpha=16, target_modules="all-linear")
    return tmp_path


def record_logits(engine) -> dict[str, list]:
    """Every sampled logits row of the engine's steps, per sequence key."""
    seen: dict[str, list] = defaultdict(list)
    step = engine.core.runner.step

    def recording(plan):
        ordered, logits = step(plan)
        for i, item in enumerate(ordered):
            if item.samples:
                seen[item.seq.key].append(logits[i].clone())
        return ordered, logits

    engine.core.runner.step = recording
    return seen


def ask(engine, model: str, prompt: str, key: str, max_tokens: int = 8):
    request = greedy(model, prompt, max_tokens, ignore_eos=True)
    request = type(request)(key, request.model, request.prompt, request.params)
    return asyncio.run(engine.generate(request)).text


def hits(engine) -> int:
    return engine.stats().prefix_cache_hit_tokens


def test_allocator_keeps_published_blocks_until_evicted_lru():
    allocator = BlockAllocator(4)
    a, b = allocator.allocate(2)
    assert allocator.publish(a, b"ha") and allocator.publish(b, b"hb") and not allocator.publish(a, b"hx")
    allocator.free([a])
    allocator.free([b])
    assert allocator.num_free == 4 and allocator.num_cached == 2          # cached free blocks count as free
    assert allocator.lookup(b"ha") == a and allocator.refcount(a) == 1    # revived
    allocator.free([a])                                                    # now b is the least recently freed
    got = allocator.allocate(3)                                            # 2 never-cached blocks, then evicts b
    assert b in got and a not in got and allocator.evictions == 1
    assert allocator.lookup(b"hb") is None and allocator.lookup(b"ha") == a
    with pytest.raises(OutOfBlocks):
        allocator.allocate(1)
    allocator.free(got + [a])
    with pytest.raises(ValueError):
        allocator.free([a])                                                # a double free still raises
    assert allocator.num_free == 4


def test_hit_answers_exactly_as_a_miss(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store / "store", block_size=BLOCK))
    fresh = started(make_engine(tiny_llama_dir, store / "store", block_size=BLOCK, prefix_cache=False))
    logits = record_logits(engine)
    for n, model in enumerate(["a", engine.base_name, "a*0.6+b*0.4"]):
        prompt = PREFIX + f"Question {n}: what is two plus two?"
        miss = ask(engine, model, prompt, f"miss{n}")
        prompt_len = len(engine.tokenizer(prompt)["input_ids"])
        before = engine.stats()
        hit = ask(engine, model, prompt, f"hit{n}")
        after = engine.stats()
        cached = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
        assert cached == (prompt_len - 1) // BLOCK * BLOCK > 0, model
        assert after.prefill_tokens - before.prefill_tokens == prompt_len - cached   # only the suffix ran
        assert hit == miss
        for got, want in zip(logits[f"hit{n}"], logits[f"miss{n}"], strict=True):
            assert (got - want).abs().max().item() < 1e-5, model
        # A longer prompt sharing the prefix reuses its full blocks, and matches an engine without a cache.
        longer = PREFIX + f"Question {n}: name a colour."
        assert ask(engine, model, longer, f"shared{n}") == ask(fresh, model, longer, f"cold{n}")
        assert hits(engine) > after.prefix_cache_hit_tokens
    assert fresh.stats().prefix_cache_hit_tokens == 0


def test_other_weights_never_share_blocks(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store / "store", block_size=BLOCK))
    fresh = started(make_engine(tiny_llama_dir, store / "store", block_size=BLOCK, prefix_cache=False))
    prompt = PREFIX + "Question: which way is north?"
    ask(engine, "a", prompt, "a1")
    for i, model in enumerate(["b", engine.base_name, "a*0.5+b*0.5", "a*0.5"]):
        seen = hits(engine)
        assert ask(engine, model, prompt, f"other{i}") == ask(fresh, model, prompt, f"cold{i}")
        assert hits(engine) == seen, f"{model} hit blocks computed with other weights"
    # The same name overwritten with new weights: no old block is reused, and the answer is the new one.
    config = (store / "a-new" / "adapter_config.json").read_bytes()
    weights = store / "a-new" / "adapter_model.safetensors"
    engine.add_adapter("a", config, weights, overwrite=True)
    fresh.add_adapter("a", config, weights, overwrite=True)
    seen = hits(engine)
    assert ask(engine, "a", prompt, "a2") == ask(fresh, "a", prompt, "a2-cold")
    assert hits(engine) == seen
    # Overwritten again with the very same bytes: same content, so its blocks may be (and are) reused.
    engine.add_adapter("a", config, weights, overwrite=True)
    assert ask(engine, "a", prompt, "a3") == ask(fresh, "a", prompt, "a3-cold")
    assert hits(engine) > seen


def test_eviction_under_pressure_stays_correct(tiny_llama_dir, store, started):
    # 20 blocks of 8 tokens: a few 40-60-token prompts fill it, so cached blocks are evicted and reused.
    engine = started(make_engine(tiny_llama_dir, store / "store", block_size=BLOCK, kv_cache_tokens=160))
    fresh = started(make_engine(tiny_llama_dir, store / "store", block_size=BLOCK, kv_cache_tokens=160,
                                prefix_cache=False))
    prompts = [f"Topic {i}: " + PREFIX[: 150 + 20 * i] for i in range(6)]
    order = [0, 1, 2, 3, 4, 5, 0, 5, 1, 4]
    for n, i in enumerate(order):
        model = "a" if i % 2 else engine.base_name
        assert ask(engine, model, prompts[i], f"p{n}") == ask(fresh, model, prompts[i], f"c{n}")
    allocator = engine.kv_cache.allocator
    assert allocator.evictions > 0 and hits(engine) > 0
    assert allocator.num_free == allocator.num_total and engine.num_active() == 0


def test_concurrent_requests_with_a_shared_prefix_equal_serial(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store / "store", block_size=BLOCK))
    fresh = started(make_engine(tiny_llama_dir, store / "store", block_size=BLOCK, prefix_cache=False))
    prompts = [PREFIX + f"Question {i}: say something." for i in range(4)]
    models = ["a", "b", engine.base_name, "a"]
    ask(engine, "a", prompts[0], "warm")

    async def together():
        return await asyncio.gather(*(engine.generate(greedy(m, p, 8, ignore_eos=True))
                                      for m, p in zip(models, prompts)))

    got = [r.text for r in asyncio.run(together())]
    want = [ask(fresh, m, p, f"s{i}") for i, (m, p) in enumerate(zip(models, prompts))]
    assert got == want
    allocator = engine.kv_cache.allocator
    assert allocator.num_free == allocator.num_total
