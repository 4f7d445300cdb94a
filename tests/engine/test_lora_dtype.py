"""`--lora-dtype`: bfloat16 adapter slots beside a float32 model. Adapters saved in bfloat16 answer
exactly as PEFT's float32 forward does (the slots hold their weights as saved, the op widens them),
batched with float32-saved adapters and base rows; pairs the op cannot compute are refused."""

from __future__ import annotations

import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.models import resolve_lora_dtype
from tests.engine.conftest import greedy, make_engine, peft_greedy_text, run_all, save_adapter
from tests.peft_adapters import save_bfloat16_copy

PROMPT = "The quick brown fox jumps over the lazy dog because"
STEPS = 12
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_lora_dtype_choices():
    assert resolve_lora_dtype("auto", torch.float32, CPU) == torch.float32
    assert resolve_lora_dtype("auto", torch.bfloat16, CUDA) == torch.bfloat16
    assert resolve_lora_dtype("bfloat16", torch.float32, CPU) == torch.bfloat16
    assert resolve_lora_dtype("float32", torch.float32, CPU) == torch.float32
    with pytest.raises(ValueError, match="lora-dtype float32"):
        resolve_lora_dtype("float32", torch.bfloat16, CPU)  # float32 weights beside bfloat16 activations
    with pytest.raises(ValueError, match="lora-dtype bfloat16"):
        resolve_lora_dtype("bfloat16", torch.float32, CUDA)  # the Triton kernels take the model's dtype


def peft_text(model_dir, adapter, tokenizer) -> str:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return peft_greedy_text(PeftModel.from_pretrained(base, adapter).eval(), tokenizer, PROMPT, STEPS)


def test_bfloat16_slots_answer_as_peft(tiny_llama_dir, tmp_path, started):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    store = tmp_path / "store"
    # alpha / r = 2: B * scale is exact in bfloat16 too.
    saved = save_adapter(base, tmp_path / "f32", seed=1, r=8, lora_alpha=16, target_modules="all-linear")
    save_bfloat16_copy(saved, store / "bf16-saved")
    save_adapter(base, store / "f32-saved", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    engine = started(make_engine(tiny_llama_dir, store, lora_dtype="bfloat16"))
    assert engine.lora.weight_dtype == torch.bfloat16 and engine.lora.backend.name == "cpu-kernels"
    models = ["bf16-saved", "f32-saved", engine.base_name, "bf16-saved"]
    texts = [r.text for r in asyncio.run(run_all(engine, [greedy(m, PROMPT, STEPS, ignore_eos=True)
                                                          for m in models]))]
    assert texts[0] == texts[3] == peft_text(tiny_llama_dir, store / "bf16-saved", engine.tokenizer)
    assert len(set(texts[:3])) == 3  # each adapter, and the base, answer differently
