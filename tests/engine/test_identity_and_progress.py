"""Engine level: the adapter a request names is the one that answers; the scheduler always makes progress;
`n` choices share one prefill."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoModelForCausalLM

from server.engine.request import (AdapterVersionMismatchError, GenerationRequest, PromptTooLongError,
                                   SamplingParams, ShuttingDownError)
from tests.engine.conftest import greedy, make_engine, save_adapter, submit_one

PROMPT = "Once upon a time in a land far away, there lived"


@pytest.fixture
def folders(tmp_path, tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    save_adapter(base, tmp_path / "store" / "x", seed=1, r=8, lora_alpha=16, target_modules="all-linear")
    save_adapter(base, tmp_path / "x2", seed=2, r=8, lora_alpha=16, target_modules="all-linear")
    return tmp_path


def test_delete_and_reupload_answers_from_new_weights(tiny_llama_dir, folders, started):
    fresh = make_engine(tiny_llama_dir, folders / "fresh")  # the oracle: an engine that only knows v2
    fresh.add_adapter("x", (folders / "x2" / "adapter_config.json").read_bytes(),
                      folders / "x2" / "adapter_model.safetensors")
    started(fresh)
    want_new = asyncio.run(fresh.generate(greedy("x", PROMPT, 60))).text
    fresh.stop()
    engine = started(make_engine(tiny_llama_dir, folders / "store"))
    want_old = asyncio.run(engine.generate(greedy("x", PROMPT, 60))).text
    assert want_old != want_new
    v1 = engine.adapter_info("x")

    async def scenario():
        running = await submit_one(engine, greedy("x", PROMPT, 60))
        parts = [(await running.__anext__()).text]
        await asyncio.to_thread(engine.delete_adapter, "x")
        info = await asyncio.to_thread(engine.add_adapter, "x", (folders / "x2" / "adapter_config.json").read_bytes(),
                                       folders / "x2" / "adapter_model.safetensors")
        new = await engine.generate(GenerationRequest("n", "x", PROMPT, SamplingParams(max_tokens=60, temperature=0)))
        pinned = await engine.generate(GenerationRequest("p", f"x@{info.sha256[:12]}", PROMPT,
                                                         SamplingParams(max_tokens=60, temperature=0)))
        with pytest.raises(AdapterVersionMismatchError):
            await engine.submit(GenerationRequest("m", f"x@{v1.sha256[:12]}", PROMPT))
        parts += [d.text async for d in running]
        return "".join(parts), new.text, pinned.text, info

    old, new, pinned, info = asyncio.run(scenario())
    assert old == want_old and new == want_new and pinned == want_new
    assert info.version == 2 and info.generation > v1.generation and info.sha256 != v1.sha256
    assert [c.sha256 for c in engine.models() if c.id == "x"] == [info.sha256]


def test_request_that_can_never_fit_the_kv_cache_is_refused(tiny_llama_dir, folders, started):
    engine = started(make_engine(tiny_llama_dir, folders / "store", kv_cache_tokens=64, block_size=16))
    with pytest.raises(PromptTooLongError, match="KV cache capacity of 64 tokens"):
        asyncio.run(engine.submit(greedy("x", PROMPT, 60)))
    assert asyncio.run(engine.generate(greedy("x", PROMPT, 8))).completion_tokens == 8


def test_n_choices_share_one_prefill_and_equal_separate_requests(tiny_llama_dir, folders, started):
    # No prefix cache: the separate requests would otherwise leave the prompt's blocks for the forks to hit.
    engine = started(make_engine(tiny_llama_dir, folders / "store", block_size=8, prefix_cache=False))
    params = dict(max_tokens=24, temperature=1.0, top_k=8, ignore_eos=True)
    prompt_len = len(engine.tokenizer(PROMPT)["input_ids"])
    assert prompt_len % 8  # the last prompt block is partial: each fork gets its own copy
    separate = [asyncio.run(engine.generate(GenerationRequest(f"s{j}", "x", PROMPT,
                                                              SamplingParams(seed=7 + j, **params))))
                for j in range(4)]
    before = engine.stats().prefill_tokens

    async def together():
        streams = await engine.submit(GenerationRequest("t", "x", PROMPT, SamplingParams(seed=7, **params), n=4))
        return await asyncio.gather(*(s.collect() for s in streams))

    got = asyncio.run(together())
    assert engine.stats().prefill_tokens - before == prompt_len  # ONE prompt prefill for four choices
    assert [g.text for g in got] == [s.text for s in separate]
    assert len({g.text for g in got}) > 1
    allocator = engine.kv_cache.allocator
    assert allocator.num_free == allocator.num_total and engine.num_active() == 0


def test_shutdown_refuses_new_requests(tiny_llama_dir, folders, started):
    engine = started(make_engine(tiny_llama_dir, folders / "store"))
    engine.begin_shutdown()
    with pytest.raises(ShuttingDownError) as info:
        asyncio.run(engine.submit(greedy("x", PROMPT, 4)))
    assert info.value.code == "shutting_down" and engine.num_active() == 0


def test_prompt_too_many_characters_is_refused_before_tokenizing(tiny_llama_dir, folders, started):
    engine = started(make_engine(tiny_llama_dir, folders / "store"))
    engine.tokenizer = None  # would fail if the prompt reached the tokenizer
    engine.front.tokenizer = None
    with pytest.raises(PromptTooLongError, match="characters"):
        asyncio.run(engine.submit(greedy("x", "a" * (33 * 1024 + 1), 4)))
