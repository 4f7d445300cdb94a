"""The architecture matrix: tiny random models of the common decoder families, each served by a real
engine with two PEFT adapters and compared with transformers + PEFT (eager attention).

Every model is saved by transformers from its config class and loaded by the server from the folder,
as `--model FOLDER` does. The requests of one model run as one mixed batch (the base and both adapters,
prompts longer than the sliding windows), then again, so the second pass starts from cached prefixes.
Each generated token must be the oracle's greedy choice and carry its log-probability; the outputs of
the base and of each adapter must differ, so a server that ignored adapters (or prompts) would fail.
The features each row exercises are in ARCHITECTURES; the slow rows run in `make test-full`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.engine.request import GenerationResult
from tests.engine.conftest import greedy, make_engine, run_all
from tests.peft_adapters import save_adapter

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, eos_token_id=2, pad_token_id=2, bos_token_id=1, initializer_range=0.1)
WINDOW = 8  # sliding windows the prompts outgrow
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class Arch:
    family: str                     # as docs/models.md's table names it
    config: str                     # the transformers config class
    features: str                   # what the row exercises (docs/models.md's table)
    overrides: dict = field(default_factory=dict)
    second_targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    first_targets: list[str] | str = "all-linear"
    full: bool = True               # only in `make test-full`


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("Llama", "LlamaConfig", "grouped-query attention, rotary, gated MLP"),
    "mistral": Arch("Mistral", "MistralConfig", "sliding window on every layer", dict(sliding_window=WINDOW)),
    "qwen2": Arch("Qwen2", "Qwen2Config", "q/k/v biases", second_targets=ATTENTION),
    "qwen3": Arch("Qwen3", "Qwen3Config", "q/k norms", dict(head_dim=16)),
    "gemma2": Arch("Gemma 2", "Gemma2Config", "attention and final-logit softcapping, sliding and full layers alternating, "
                   "scaled embeddings", dict(sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=16,
                                             attn_logit_softcapping=5.0, final_logit_softcapping=3.0), full=False),
    "gemma3_text": Arch("Gemma 3 (text)", "Gemma3TextConfig", "sliding and full layers mixed, q/k norms, local rotary base",
                        dict(sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=16,
                             layer_types=["sliding_attention", "full_attention"])),
    "phi3": Arch("Phi-3", "Phi3Config", "fused qkv_proj and gate_up_proj", dict(pad_token_id=0),
                 second_targets=["qkv_proj", "o_proj"]),
    "olmo2": Arch("OLMo 2", "Olmo2Config", "q/k norms over all heads, post-norms"),
    "granite": Arch("Granite", "GraniteConfig", "embedding, attention, residual and logit multipliers",
                    dict(embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.5,
                         logits_scaling=2.0)),
    "stablelm": Arch("StableLM", "StableLmConfig", "a decoder layer that does not pass keyword arguments to attention, "
                     "partial rotary, LayerNorm", full=False),
    "gpt_neox": Arch("GPT-NeoX", "GPTNeoXConfig", "fused query_key_value, partial rotary, parallel residual",
                     dict(rotary_pct=0.5, use_parallel_residual=True, num_key_value_heads=4),
                     second_targets=["query_key_value"]),
    "qwen2_moe": Arch("Qwen2-MoE", "Qwen2MoeConfig", "mixture of experts; LoRA on attention and the shared expert",
                      dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=64),
                      first_targets=[*ATTENTION, "shared_expert.gate_proj", "shared_expert.up_proj",
                                     "shared_expert.down_proj"]),
    "gpt_oss": Arch("gpt-oss", "GptOssConfig", "attention sinks, sliding and full layers, mixture of experts",
                    dict(sliding_window=WINDOW, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                         layer_types=["sliding_attention", "full_attention"]),
                    first_targets=ATTENTION, full=False),
}

PROMPTS = ["The quick brown fox jumps over the lazy dog while the cat watches from the old wooden fence.",
           "Input: Maria, 34, from Lisbon thinks the new phone is wonderful and tells everyone.\nOutput:",
           "Seven",
           "Once upon a time, in a kingdom by the sea, there lived a princess who loved to read books."]
NEW_TOKENS = 8


def _params() -> list:
    return [pytest.param(name, id=name, marks=[pytest.mark.full] if arch.full else [])
            for name, arch in ARCHITECTURES.items()]


def save_model(folder: Path, arch: Arch, tokenizer_dir: Path) -> Path:
    """A random model of `arch` with the default tokenizer's vocabulary, saved as transformers saves it."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, arch.config)(vocab_size=len(tokenizer), **{**TINY, **arch.overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # biases and sinks are zero at init: make them matter
        for name, param in model.named_parameters():
            if name.endswith(("bias", "sinks")) and "norm" not in name:
                param.normal_(0, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _oracle(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


@torch.inference_mode()
def check_against_oracle(oracle: torch.nn.Module, prompt_ids: list[int], result: GenerationResult) -> list[int]:
    """Each generated token is the oracle's greedy choice after the tokens before it, with its logprob."""
    out = [t.token_id for t in result.logprobs]
    logits = oracle(input_ids=torch.tensor([prompt_ids + out])).logits[0, len(prompt_ids) - 1:-1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for i, (token, got) in enumerate(zip(out, result.logprobs)):
        best = float(expected[i].max())
        assert float(expected[i, token]) >= best - 1e-4, f"token {i}: {token} is not the greedy choice"
        assert got.logprob == pytest.approx(float(expected[i, token]), abs=2e-4), f"token {i}: logprob"
    return out


@pytest.mark.parametrize("name", _params())
def test_served_exactly_with_adapters(name, tmp_path, tokenizer_dir):
    arch = ARCHITECTURES[name]
    model_dir = save_model(tmp_path / "model", arch, tokenizer_dir)
    base = _oracle(model_dir)
    store = tmp_path / "store"
    save_adapter(base, store / "first", seed=1, scale_b=4.0, r=8, lora_alpha=16, target_modules=arch.first_targets)
    save_adapter(base, store / "second", seed=2, scale_b=4.0, r=4, lora_alpha=8, target_modules=arch.second_targets,
                 use_rslora=True)
    oracles = {"base": base, **{a: PeftModel.from_pretrained(_oracle(model_dir), store / a).eval()
                                for a in ("first", "second")}}
    engine = make_engine(model_dir, store, max_loras=2, max_batched_tokens=64)
    engine.start()
    try:
        served = {"base": engine.base_name, "first": "first", "second": "second"}
        requests = [greedy(served[who], prompt, NEW_TOKENS, ignore_eos=True, logprobs=1)
                    for prompt in PROMPTS for who in served]
        tokenizer = engine.tokenizer
        outputs = {}
        for rerun in range(2):  # the second pass starts from the prefix cache's blocks
            results = asyncio.run(run_all(engine, requests, stagger=0.01))
            for request, result in zip(requests, results):
                who = next(k for k, v in served.items() if v == request.model)
                ids = tokenizer(request.prompt)["input_ids"]
                got = check_against_oracle(oracles[who], ids, result)
                assert len(got) == NEW_TOKENS
                assert outputs.setdefault((who, request.prompt), got) == got
        assert engine.stats().prefix_cache_hit_tokens > 0
    finally:
        engine.stop()
    for prompt in PROMPTS:  # each adapter changes the answer, and the answer depends on the prompt
        assert outputs[("base", prompt)] != outputs[("first", prompt)]
        assert outputs[("base", prompt)] != outputs[("second", prompt)]
    assert len({tuple(outputs[("base", p)]) for p in PROMPTS}) > 1


def test_models_doc_lists_every_tested_family():
    models = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    rows = [line for line in models.splitlines() if line.startswith("| ") and "---" not in line]
    assert all(any(arch.family in row.split("|")[1] for row in rows) for arch in ARCHITECTURES.values())
