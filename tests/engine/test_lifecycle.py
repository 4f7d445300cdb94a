"""Engine behaviour: sampling, stops, queue bound, cancellation, adapter replace/delete/failure."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
from transformers import AutoModelForCausalLM

from server.engine.request import (AdapterUnavailableError, GenerationRequest, QueueFullError, SamplingParams,
                                   UnknownModelError)
from tests.engine.conftest import greedy, make_engine, run_all, save_adapter, submit_one

PROMPT = "Once upon a time in a land far away, there lived"


@pytest.fixture
def store(tmp_path, tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for i, name in enumerate(["ad0", "ad1", "ad2"]):
        save_adapter(base, tmp_path / "store" / name, seed=i, r=8, lora_alpha=16, target_modules="all-linear")
    save_adapter(base, tmp_path / "v2", seed=99, r=8, lora_alpha=16, target_modules="all-linear")
    return tmp_path / "store"


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def all_free(engine) -> bool:
    allocator = engine.kv_cache.allocator
    return allocator.num_free == allocator.num_total and not engine.scheduler.running \
        and all(engine.slots.pinned(s) == 0 for s in range(engine.slots.num_slots))


@pytest.mark.slow
@pytest.mark.full
def test_seeded_sampling_is_reproducible_whatever_the_batch(default_base, tmp_path, started):
    # On the real model: a random tiny model's near-uniform distribution over 49k tokens turns
    # float rounding differences between batch shapes into different draws.
    save_adapter(default_base.model, tmp_path / "ad", seed=5, scale_b=0.3, r=8, lora_alpha=16,
                 target_modules="all-linear")
    engine = started(make_engine(None, tmp_path))
    sampled = GenerationRequest("s", "ad", PROMPT, SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95,
                                                                   seed=1234))
    alone = asyncio.run(engine.generate(sampled))
    companions = [greedy("ad", "Hello"), greedy("ad", PROMPT, 40), greedy(engine.base_name, "1, 2, 3", 20)]
    together = asyncio.run(run_all(engine, [companions[0], sampled, *companions[1:]]))[1]
    other_seed = asyncio.run(engine.generate(GenerationRequest("t", "ad", PROMPT, SamplingParams(
        max_tokens=32, temperature=0.8, top_p=0.95, seed=4321))))
    assert together.text == alone.text
    assert other_seed.text != alone.text


def test_stop_string_is_cut_and_not_sent(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store))
    full = asyncio.run(engine.generate(greedy("ad0", PROMPT, 24))).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = asyncio.run(engine.generate(greedy("ad0", PROMPT, 24, stop=(stop,))))
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    assert stop not in cut.text


@pytest.mark.slow
def test_eos_ends_generation(default_base, tmp_path, started):
    engine = started(make_engine(None, tmp_path))
    messages = ({"role": "user", "content": "What is the capital of France?"},)
    result = asyncio.run(engine.generate(GenerationRequest("e", engine.base_name, None,
                                                           SamplingParams(max_tokens=64, temperature=0),
                                                           messages=messages)))
    assert result.finish_reason == "stop" and result.completion_tokens < 64
    assert "Paris" in result.text and "<|im_end|>" not in result.text


def test_queue_bound_gives_queue_full(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store, max_running=1, max_queue=2))

    async def scenario():
        first = await submit_one(engine, greedy("ad0", PROMPT, 400))
        await asyncio.to_thread(wait_for, lambda: len(engine.scheduler.running) == 1)
        waiting = [await submit_one(engine, greedy("ad1", PROMPT, 5)),
                   await submit_one(engine, greedy("ad2", PROMPT, 5))]
        with pytest.raises(QueueFullError) as info:
            await engine.submit(greedy("ad0", "one too many", 5))
        assert info.value.code == "queue_full" and info.value.retry_after
        await first.aclose()
        for stream in waiting:
            await stream.collect()

    asyncio.run(scenario())
    wait_for(lambda: all_free(engine))


def test_cancellation_frees_kv_blocks_and_slot_pins(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store))

    async def scenario():
        stream = await submit_one(engine, greedy("ad1", PROMPT * 4, 500))
        await stream.__anext__()
        slot = engine.slots.slot_of(engine.registry.get("ad1").key)
        assert engine.slots.pinned(slot) == 1
        assert engine.kv_cache.allocator.num_free < engine.kv_cache.allocator.num_total
        await stream.aclose()

    asyncio.run(scenario())
    wait_for(lambda: all_free(engine), timeout=5)


def test_replaced_adapter_keeps_running_generation_on_old_version(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store))
    v1_text = asyncio.run(engine.generate(greedy("ad0", PROMPT, 200))).text
    v1_key = engine.registry.get("ad0").key
    v2_folder = store.parent / "v2"
    config, weights = (v2_folder / "adapter_config.json").read_bytes(), v2_folder / "adapter_model.safetensors"

    async def scenario():
        stream = await submit_one(engine, greedy("ad0", PROMPT, 200))
        parts = [(await stream.__anext__()).text]
        info = await asyncio.to_thread(engine.add_adapter, "ad0", config, weights, True)
        assert info.version == 2
        new = await engine.generate(greedy("ad0", PROMPT, 200))
        async for delta in stream:
            parts.append(delta.text)
        return "".join(parts), new.text

    old_run, new_run = asyncio.run(scenario())
    assert old_run == v1_text
    assert new_run != v1_text
    wait_for(lambda: all_free(engine))
    assert engine.slots.slot_of(v1_key) is None  # the old version's slot was freed


def test_deleting_adapter_in_use_frees_it_after_last_request(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store))
    expected = asyncio.run(engine.generate(greedy("ad2", PROMPT, 150))).text
    record = engine.registry.get("ad2")
    key = record.key

    async def scenario():
        stream = await submit_one(engine, greedy("ad2", PROMPT, 150))
        first = await stream.__anext__()
        await asyncio.to_thread(engine.delete_adapter, "ad2")
        assert engine.slots.slot_of(key) is not None  # still in use
        with pytest.raises(UnknownModelError):
            await engine.submit(greedy("ad2", PROMPT, 5))
        rest = [d.text async for d in stream]
        return first.text + "".join(rest)

    assert asyncio.run(scenario()) == expected
    wait_for(lambda: engine.slots.slot_of(key) is None)
    assert engine.lora.row_ranks.count(0) == engine.slots.num_slots  # the slot's weights are zeroed
    assert not engine.registry.in_cpu(record)
    assert not (store / "ad2").exists()
    assert all(r.name != "ad2" for r in engine.registry.records())


def test_broken_adapter_fails_fast_and_others_keep_working(tiny_llama_dir, store, started):
    # One CPU slot: ad0 is parsed again from disk when requested after ad1, and by then it is corrupt.
    engine = started(make_engine(tiny_llama_dir, store, max_cpu_loras=1))
    (store / "ad0" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    assert not engine.registry.in_cpu(engine.registry.get("ad0"))

    async def scenario():
        broken = engine.generate(greedy("ad0", PROMPT, 8))
        healthy = engine.generate(greedy("ad1", PROMPT, 8))
        return await asyncio.gather(broken, healthy, return_exceptions=True)

    started_at = time.monotonic()
    broken, healthy = asyncio.run(scenario())
    assert isinstance(broken, AdapterUnavailableError) and "ad0" in str(broken)
    assert time.monotonic() - started_at < 10
    assert not isinstance(healthy, Exception) and healthy.completion_tokens == 8
    assert engine.adapter_info("ad0").status == "error"
    with pytest.raises(AdapterUnavailableError):  # later requests fail at once
        asyncio.run(engine.submit(greedy("ad0", PROMPT, 8)))


def test_rejected_folder_is_not_registered(tiny_llama_dir, store, started):
    shutil.copytree(store / "ad0", store / "bad")
    (store / "bad" / "adapter_model.safetensors").unlink()
    (store / "bad" / "adapter_model.bin").write_bytes(b"pickle")
    engine = make_engine(tiny_llama_dir, store)
    assert "bad" not in {r.name for r in engine.registry.records()}
    with pytest.raises(UnknownModelError):
        asyncio.run(started(engine).submit(greedy("bad", PROMPT, 4)))
