"""The int8-activation mode's deviation on the embedded model (SmolLM2-135M-Instruct, Q4_1 GGUF), on a
fixed prompt set: the exact mode's greedy continuation is scored by both modes (teacher-forced, every call
under 256 rows, so every linear layer takes the int8 path), and the log-probabilities of those tokens may
differ by at most WORST_TOLERANCE on any token and MEAN_TOLERANCE on average (measured: 0.65 and 0.093 nats;
greedy continuations equal on 4 of the 8 prompts over 16 tokens); the exact mode stays within float32
rounding of the float32 model (measured: 1.3e-5)."""

from __future__ import annotations

import copy

import pytest
import torch

from server.models import embedded_gguf_path
from server.native.loader import load_kernels
from server.quant.gguf_weights import quantize_from_gguf

pytestmark = [pytest.mark.slow, pytest.mark.full]

PROMPTS = ["Input: Maria, 34, from Lisbon thinks the new phone is wonderful.\nOutput:",
           "The capital of France is",
           "def fibonacci(n):\n    ",
           "Translate to French: I would like a cup of coffee.",
           "List three colours of the rainbow:",
           "Once upon a time, in a small village by the sea,",
           "Q: What is 12 times 7?\nA:",
           "Write a haiku about autumn leaves."]
NEW_TOKENS = 16
WORST_TOLERANCE = 1.0  # nats, on any one token of the exact mode's greedy continuation
MEAN_TOLERANCE = 0.1  # nats per token
EXACT_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def models(default_base):
    assert load_kernels()
    exact, int8 = copy.deepcopy(default_base.model), copy.deepcopy(default_base.model)
    quantize_from_gguf(exact, embedded_gguf_path())
    quantize_from_gguf(int8, embedded_gguf_path(), int8=True)
    return default_base.model, exact, int8


def greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return out[0].tolist()


def token_logprobs(model, ids: list[int], start: int) -> torch.Tensor:
    """Log-probabilities of ids[start:] given what precedes each."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, start - 1:-1]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[start:])[:, None])[:, 0]


def test_int8_logprobs_stay_within_the_stated_tolerance(models, default_base):
    float32, exact, int8 = models
    int8_errors, worst_exact, agree = [], 0.0, 0
    for prompt in PROMPTS:
        ids = default_base.tokenizer(prompt)["input_ids"]
        sequence = greedy(exact, ids)
        reference = token_logprobs(exact, sequence, len(ids))
        worst_exact = max(worst_exact, float((token_logprobs(float32, sequence, len(ids)) - reference).abs().max()))
        int8_errors.append((token_logprobs(int8, sequence, len(ids)) - reference).abs())
        agree += greedy(int8, ids) == sequence
    errors = torch.cat(int8_errors)
    print(f"int8: |d logprob| worst {float(errors.max()):.4f}, mean {float(errors.mean()):.4f}; greedy-identical "
          f"on {agree}/{len(PROMPTS)} prompts; exact vs float32: worst {worst_exact:.2e}")
    assert worst_exact <= EXACT_TOLERANCE
    assert 0 < float(errors.max()) <= WORST_TOLERANCE
    assert float(errors.mean()) <= MEAN_TOLERANCE
