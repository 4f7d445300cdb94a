"""Adapters of waiting requests are read from disk while the batch runs, not after a slot frees."""

from __future__ import annotations

import asyncio
import time

import pytest
from transformers import AutoModelForCausalLM

from server.engine.request import GenerationRequest, SamplingParams, UnknownModelError
from tests.engine.conftest import make_engine, save_adapter, submit_one

PROMPT = "Once upon a time in a land far away, there lived"


def long_request(request_id: str, model: str, tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id, model, PROMPT, SamplingParams(max_tokens=tokens, temperature=0.0,
                                                                       ignore_eos=True))


@pytest.fixture
def store(tmp_path, tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for i, name in enumerate("abcdef"):
        save_adapter(base, tmp_path / "store" / name, seed=10 + i, r=8, lora_alpha=16, target_modules="all-linear")
    return tmp_path / "store"


def test_waiting_requests_adapters_load_while_the_batch_runs(tiny_llama_dir, store, started):
    # A CPU tier of 4 for 6 adapters: prefetch looks 2 adapters ahead.
    engine = started(make_engine(tiny_llama_dir, store, max_running=1, max_loras=2, max_cpu_loras=4))
    on_disk = [n for n in "abcdef" if engine.adapter_info(n).tier == "disk"]
    assert len(on_disk) == 2
    b, c = on_disk
    a = next(n for n in "abcdef" if n not in on_disk)

    async def scenario() -> None:
        running = await submit_one(engine, long_request("a", a, 400))
        await running.__anext__()
        waiting = [asyncio.ensure_future(engine.generate(long_request(n, n, 4))) for n in (b, c)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and engine.core.num_waiting() < 2:  # tokenized, queued
            await asyncio.sleep(0.001)
        tiers, waiting_then, loaded = set(), 2, {"cpu", "device"}  # read ahead: into memory, or the pool's free room
        while time.monotonic() < deadline and not (tiers and tiers <= loaded) and waiting_then == 2:
            waiting_then = engine.core.num_waiting()  # one sequence runs at a time: a's, then b's
            tiers = {engine.adapter_info(n).tier for n in (b, c)}
            await asyncio.sleep(0.005)
        assert tiers <= loaded and waiting_then == 2, (tiers, waiting_then)  # loaded while neither could be admitted
        await asyncio.to_thread(engine.delete_adapter, c)  # prefetched weights must not outlive a delete
        async for _ in running:
            pass
        answered, refused = await asyncio.gather(*waiting, return_exceptions=True)
        assert answered.text and isinstance(refused, UnknownModelError), (answered, refused)

    asyncio.run(scenario())
