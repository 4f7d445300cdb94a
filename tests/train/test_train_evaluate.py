"""Held-out evaluation: batched left-padded greedy decoding equals one prompt at a time."""

from __future__ import annotations

from server.train.data import Example
from server.train.evaluate import exact_match, generate_greedy, score


def test_batched_greedy_matches_one_by_one(tiny_base):
    prompts = [Example("Input: a\nOutput:", ""), Example("Input: a much longer prompt than the first one\nOutput:", ""),
               Example("Input: medium prompt\nOutput:", "")]
    model, tokenizer = tiny_base.model, tiny_base.tokenizer
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_greedy(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_exact_match_normalises_whitespace():
    assert exact_match(" positive\n", "positive")
    assert exact_match("City:  Lisbon |\tName: Maria", " City: Lisbon | Name: Maria")
    assert not exact_match("Positive", "positive")


def test_score_counts_matches():
    examples = [Example("p", " yes"), Example("p", " no")]
    accuracy, samples = score(["yes", "yes"], examples)
    assert accuracy == 0.5 and [s["match"] for s in samples] == [True, False]
