"""The engine serves every adapter kind in one concurrent burst with plain adapters and the base, with
fewer slots than adapters: greedy token ids and chosen-token logprobs (`ignore_eos`) equal PEFT's.
Then the store's guarantees for those kinds: upload with the copy budget, overwrite, delete, and
compositions refused with a reason."""

from __future__ import annotations

import asyncio
import copy
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.engine.request import AdapterRejectedError, InvalidRequestError
from tests.engine.conftest import greedy, make_engine, run_all, started, tiny_llama_dir, tokenizer_dir  # noqa: F401
from tests.lora.variant_adapters import VARIANT_CONFIGS, make_variant_adapters

PROMPTS = ["The weather today is", "1, 2, 3, 4,", "def add(a, b):", "A list of fruits: apple,"]
STEPS = 8


def peft_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy ids and each chosen token's logprob, one full forward per token (no end-of-sequence stop)."""
    ids, chosen, logprobs = list(ids), [], []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            chosen.append(token)
            ids.append(token)
    return chosen, logprobs


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    folder = tmp_path_factory.mktemp("variant-store")
    make_variant_adapters(base, folder, scale_b=0.5)
    return folder


def test_burst_of_every_kind_equals_peft(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store, max_loras=3, max_lora_rank=16, max_batched_tokens=32))
    names = [*VARIANT_CONFIGS, engine.base_name]
    requests = [greedy(name, PROMPTS[i % len(PROMPTS)], max_tokens=STEPS, ignore_eos=True, logprobs=0)
                for i, name in enumerate(names * 2)]
    results = asyncio.run(run_all(engine, requests, stagger=0.02))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    oracles = {name: PeftModel.from_pretrained(copy.deepcopy(base), store / name).eval() for name in VARIANT_CONFIGS}
    oracles[engine.base_name] = base
    for request, result in zip(requests, results):
        ids = engine.tokenizer(request.prompt)["input_ids"]
        want_ids, want_logprobs = peft_greedy(oracles[request.model], ids, STEPS)
        assert [t.token_id for t in result.logprobs] == want_ids, request.model
        got_logprobs = [t.logprob for t in result.logprobs]
        assert max(abs(g - w) for g, w in zip(got_logprobs, want_logprobs)) < 1e-3, request.model
    assert engine.lora.slot_writes > engine.slots.num_slots  # slots were reused within the burst
    assert all(engine.slots.pinned(s) == 0 for s in range(engine.slots.num_slots))


@pytest.mark.full
def test_variants_differ_from_the_base_through_the_engine(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store, max_loras=8, max_lora_rank=16))
    names = [*VARIANT_CONFIGS, engine.base_name]
    requests = [greedy(name, PROMPTS[0], max_tokens=STEPS, ignore_eos=True, logprobs=0) for name in names]
    results = asyncio.run(run_all(engine, requests))
    base_ids = [t.token_id for t in results[-1].logprobs]
    for name, result in zip(names[:-1], results[:-1]):
        assert [t.token_id for t in result.logprobs] != base_ids or abs(
            result.logprobs[0].logprob - results[-1].logprobs[0].logprob) > 1e-2, name


def test_compositions_of_variants_are_refused_with_a_reason(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store, max_loras=2, max_lora_rank=16))
    for expression, word in [("dora-all*0.5+plain*0.5", "DoRA"), ("plain+saved-copies", "modules_to_save"),
                             ("tokens+plain", "trainable tokens")]:
        with pytest.raises(InvalidRequestError, match=word):
            asyncio.run(engine.generate(greedy(expression, PROMPTS[0], max_tokens=2)))
    result = asyncio.run(engine.generate(greedy("plain*0.5+embed-head*0.5", PROMPTS[0], max_tokens=2)))
    assert result.completion_tokens == 2  # LoRA on lm_head and the embedding composes like any LoRA


def test_upload_overwrite_delete_and_the_copy_budget(tiny_llama_dir, store, tmp_path, started):
    work = tmp_path / "store"
    shutil.copytree(store / "plain", work / "plain")
    saved = store / "saved-copies"
    copy_bytes = 2 * 4 * 49152 * 64  # lm_head and embed_tokens of the tiny model, float32
    engine = started(make_engine(tiny_llama_dir, work, max_loras=2, max_lora_rank=16,
                                 max_saved_module_bytes=copy_bytes))
    config, weights = (saved / "adapter_config.json").read_bytes(), saved / "adapter_model.safetensors"
    info = engine.add_adapter("copies", config, weights)
    assert info.size_bytes > copy_bytes and engine.registry.get("copies").kinds == ("saved:lm_head",
                                                                                       "saved:model.embed_tokens")
    first = asyncio.run(engine.generate(greedy("copies", PROMPTS[1], max_tokens=4, ignore_eos=True)))
    dora = store / "dora-all"
    engine.add_adapter("copies", (dora / "adapter_config.json").read_bytes(), dora / "adapter_model.safetensors",
                       overwrite=True)
    assert engine.registry.get("copies").kinds == ("dora",)
    second = asyncio.run(engine.generate(greedy("copies", PROMPTS[1], max_tokens=4, ignore_eos=True)))
    assert second.text != first.text
    engine.delete_adapter("copies")
    assert engine.registry.get("copies") is None
    small = started(make_engine(tiny_llama_dir, tmp_path / "small", max_loras=2, max_lora_rank=16,
                                max_saved_module_bytes=copy_bytes - 1))
    with pytest.raises(AdapterRejectedError, match="max-saved-module-bytes"):
        small.add_adapter("copies", config, weights)
