"""Prompt logprobs, max_tokens 0, logit_bias and min_tokens in the engine, against transformers + PEFT.

Prompt logprobs come from the rows of packed, chunked prefills (several requests per step, prompts cut
across steps); a request that wants them never starts from the prefix cache (a cached prefix has no logits).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.request import Delta, GenerationRequest, SamplingParams
from tests.engine.conftest import make_engine, save_adapter
from tests.peft_adapters import peft_reference

TOL = 1e-4
PROMPTS = ["You are a careful assistant. Answer briefly and exactly, in plain words. " * 3, "Cats and dogs are"]


@pytest.fixture
def store(tmp_path, tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    save_adapter(base, tmp_path / "store" / "a", seed=1, scale_b=0.3, r=8, lora_alpha=16, target_modules="all-linear")
    return tmp_path / "store"


@pytest.fixture
def reference(tiny_llama_dir, store):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return {"a": peft_reference(base, store / "a"), "base": base}


@torch.inference_mode()
def ref_logprobs(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


async def deltas(engine, request: GenerationRequest) -> list[list[Delta]]:
    """Every delta of every choice of `request`."""
    async def drain(stream) -> list[Delta]:
        return [d async for d in stream]
    return list(await asyncio.gather(*(drain(s) for s in await engine.submit(request))))


def scoring(rid: str, model: str, prompt: str, k: int = 2, n: int = 1, **params) -> GenerationRequest:
    params.setdefault("max_tokens", 0)
    return GenerationRequest(rid, model, prompt, SamplingParams(prompt_logprobs=k, temperature=0.0, **params), n=n)


def check_prompt(delta: Delta, model, ids: list[int], k: int) -> None:
    expected = ref_logprobs(model, ids)
    entries = delta.prompt_logprobs
    assert len(entries) == len(ids) and entries[0].logprob is None and entries[0].token_id == ids[0]
    for i in range(1, len(ids)):
        row, item = expected[i - 1], entries[i]
        assert item.token_id == ids[i] and abs(item.logprob - float(row[ids[i]])) <= TOL
        assert item.rank == int((row > row[ids[i]]).sum()) + 1
        assert list(item.top_ids) == row.topk(k).indices.tolist()
        assert all(abs(lp - float(v)) <= TOL for (_, lp), v in zip(item.top, row.topk(k).values))


def test_prompt_logprobs_of_packed_chunked_prefills(tiny_llama_dir, store, reference, started):
    engine = started(make_engine(tiny_llama_dir, store, max_batched_tokens=16, block_size=8))
    tokenizer = engine.tokenizer

    async def run():
        return await asyncio.gather(deltas(engine, scoring("s0", "a", PROMPTS[0], n=2)),
                                    deltas(engine, scoring("s1", engine.base_name, PROMPTS[1], 3)),
                                    deltas(engine, scoring("s2", "a", PROMPTS[1], max_tokens=2)))
    long_a, short_base, short_a = asyncio.run(run())
    for choice in long_a:  # max_tokens 0: one delta, no token, every choice with the prompt's logprobs
        (only,) = choice
        assert only.finish_reason == "length" and only.completion_tokens == 0 and only.text == ""
        check_prompt(only, reference["a"], tokenizer(PROMPTS[0])["input_ids"], 2)
    check_prompt(short_base[0][0], reference["base"], tokenizer(PROMPTS[1])["input_ids"], 3)
    first, *rest = short_a[0]
    check_prompt(first, reference["a"], tokenizer(PROMPTS[1])["input_ids"], 2)
    assert first.completion_tokens == 1 and all(d.prompt_logprobs is None for d in rest)


def test_prompt_logprobs_skip_the_prefix_cache(tiny_llama_dir, store, reference, started):
    engine = started(make_engine(tiny_llama_dir, store, block_size=8))
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]

    async def run():
        plain = GenerationRequest("plain", "a", PROMPTS[0], SamplingParams(max_tokens=1, temperature=0.0))
        await deltas(engine, plain)  # its blocks are now in the prefix cache
        hits = engine.prefix_cache.hit_tokens
        scored = await deltas(engine, scoring("scored", "a", PROMPTS[0]))
        assert engine.prefix_cache.hit_tokens == hits  # computed in full, not read from the cache
        await deltas(engine, GenerationRequest("again", "a", PROMPTS[0], SamplingParams(max_tokens=1)))
        assert engine.prefix_cache.hit_tokens > hits   # the cache itself still serves others
        return scored
    check_prompt(asyncio.run(run())[0][0], reference["a"], ids, 2)


def test_logit_bias_and_min_tokens(tiny_llama_dir, store, reference, started):
    engine = started(make_engine(tiny_llama_dir, store))
    eos = sorted(engine.eos_ids)[0]
    ids = engine.tokenizer(PROMPTS[1])["input_ids"]
    second = int(ref_logprobs(reference["a"], ids)[-1].topk(2).indices[1])
    best = int(ref_logprobs(reference["a"], ids)[-1].argmax())

    def request(rid: str, **params) -> GenerationRequest:
        return GenerationRequest(rid, "a", PROMPTS[1], SamplingParams(temperature=0.0, logprobs=0, **params))

    async def run():
        banned = await deltas(engine, request("ban", max_tokens=1, logit_bias=((best, -100.0),)))
        ends = await deltas(engine, request("eos", max_tokens=8, logit_bias=((eos, 100.0),)))
        held = await deltas(engine, request("min", max_tokens=8, logit_bias=((eos, 100.0),), min_tokens=3))
        return banned[0], ends[0], held[0]
    banned, ends, held = asyncio.run(run())
    assert banned[0].logprobs[0].token_id == second
    assert ends[-1].finish_reason == "stop" and ends[-1].completion_tokens == 1
    assert held[-1].finish_reason == "stop" and held[-1].completion_tokens == 4
    assert all(d.logprobs[0].token_id != eos for d in held[:3])
