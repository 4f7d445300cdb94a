"""Engine level: `model: "a*0.7+b*0.3"` answers as PEFT's `cat` combination does, batched with plain and
base requests; its identity follows its parts' versions; bad expressions are refused by name."""

from __future__ import annotations

import asyncio
import time

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.adapters.composition import CompositionKey
from server.engine.request import AdapterVersionMismatchError, EngineError, InvalidRequestError, UnknownModelError
from tests.engine.conftest import greedy, make_engine, one_at_a_time, peft_greedy_text, run_all, save_adapter

PROMPT = "The quick brown fox jumps over the lazy dog because"
STEPS = 12


@pytest.fixture
def store(tmp_path, tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    save_adapter(base, tmp_path / "store" / "a", seed=1, r=8, lora_alpha=16, target_modules="all-linear")
    save_adapter(base, tmp_path / "store" / "b", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    save_adapter(base, tmp_path / "b-new", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    return tmp_path


def peft_cat_text(model_dir, store, parts: list[tuple[str, float]], tokenizer) -> str:
    """PEFT's greedy continuation with the parts combined by add_weighted_adapter(cat)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    oracle = PeftModel.from_pretrained(base, store / parts[0][0], adapter_name=parts[0][0]).eval()
    for name, _ in parts[1:]:
        oracle.load_adapter(store / name, adapter_name=name)
    oracle.add_weighted_adapter([n for n, _ in parts], [w for _, w in parts], "mix", combination_type="cat")
    oracle.set_adapter("mix")
    return peft_greedy_text(oracle, tokenizer, PROMPT, STEPS)


def test_composition_batched_with_plain_and_base_equals_peft_cat(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store / "store"))
    models = ["a*0.7+b*0.3", "a", "b", engine.base_name, "b*0.3 + a*0.7", "a*-0.5+b*1.5"]
    requests = [greedy(m, PROMPT, STEPS, ignore_eos=True) for m in models]
    batched = [r.text for r in asyncio.run(run_all(engine, requests))]
    serial = [r.text for r in asyncio.run(one_at_a_time(engine, requests))]
    assert batched == serial
    assert batched[0] == peft_cat_text(tiny_llama_dir, store / "store", [("a", 0.7), ("b", 0.3)], engine.tokenizer)
    assert batched[5] == peft_cat_text(tiny_llama_dir, store / "store", [("a", -0.5), ("b", 1.5)], engine.tokenizer)
    assert len(set(batched[:4])) == 4 and batched[4] == batched[0]
    # Both spellings of one composition share one identity, hence one device slot.
    composed = [k for k in engine.slots.keys() if isinstance(k, CompositionKey)]
    assert len(composed) == 2


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_overwrite_or_delete_of_a_part_re_resolves(tiny_llama_dir, store, started):
    engine = started(make_engine(tiny_llama_dir, store / "store"))
    mix = "a*0.6+b*0.4"
    before = asyncio.run(engine.generate(greedy(mix, PROMPT, STEPS, ignore_eos=True))).text
    (old_key,) = [k for k in engine.slots.keys() if isinstance(k, CompositionKey)]
    config, weights = (store / "b-new" / "adapter_config.json").read_bytes(), store / "b-new" / "adapter_model.safetensors"
    engine.add_adapter("b-new", config, weights)
    expected = asyncio.run(engine.generate(greedy("a*0.6+b-new*0.4", PROMPT, STEPS, ignore_eos=True))).text
    engine.add_adapter("b", config, weights, overwrite=True)
    after = asyncio.run(engine.generate(greedy(mix, PROMPT, STEPS, ignore_eos=True))).text
    assert after == expected != before
    # The old composition's slot and CPU copy went with its superseded part.
    wait_until(lambda: old_key not in engine.slots.keys())
    assert engine.registry.cached_derived(old_key) is None
    engine.delete_adapter("a")
    with pytest.raises(UnknownModelError):
        asyncio.run(engine.generate(greedy(mix, PROMPT, STEPS)))


BAD = [
    ("a*0.5+nope*0.5", UnknownModelError, "nope"),                       # 404
    ("a*0+b", InvalidRequestError, "non-zero"),                           # 400 from here on
    ("a*abc+b", InvalidRequestError, "cannot read"),
    ("a*1e3+b", InvalidRequestError, "cannot read"),
    ("a*17+b", InvalidRequestError, "between"),
    ("a*0.5+a*0.5", InvalidRequestError, "more than once"),
    ("+".join(["a"] * 9), InvalidRequestError, "at most 8 parts"),
    ("a+", InvalidRequestError, "cannot read"),
    ("BASE*0.5+a", InvalidRequestError, "base model"),
    ("a@00000000*0.5+b", AdapterVersionMismatchError, "does not start with"),  # 409, as for a plain pin
]


def test_bad_compositions_are_refused_by_name(tiny_llama_dir, store):
    engine = make_engine(tiny_llama_dir, store / "store")
    for model, error, message in BAD:
        with pytest.raises(EngineError) as info:
            engine.adapters.resolve(model.replace("BASE", engine.base_name))
        assert type(info.value) is error and message in str(info.value), model


def test_composition_rank_is_bounded_by_max_lora_rank(tiny_llama_dir, store):
    engine = make_engine(tiny_llama_dir, store / "store", max_lora_rank=8)
    with pytest.raises(InvalidRequestError, match=r"8 \+ 4 = 12.*max LoRA rank of 8"):
        engine.adapters.resolve("a*0.5+b*0.5")
    assert engine.adapters.resolve("b*2")[0].rank == 4
