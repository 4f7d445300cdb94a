"""The demo tasks: seeded generators, and checkers that tell the tasks' answers apart."""

from __future__ import annotations

import re

import pytest

from server.train.tasks import PROMPT_TEMPLATE, TASKS, Facts, parse_sentence, sentence_of, sentences


def test_at_least_four_tasks_with_valid_adapter_names():
    assert len(TASKS) >= 4
    assert all(re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name) for name in TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_deterministic_per_seed(name):
    task = TASKS[name]
    assert task.examples(50, seed=7) == task.examples(50, seed=7)
    assert task.examples(50, seed=7) != task.examples(50, seed=8)


def test_all_tasks_share_one_prompt():
    prompts = {name: [e["prompt"] for e in task.examples(20, seed=3)] for name, task in TASKS.items()}
    assert len({tuple(p) for p in prompts.values()}) == 1
    assert all(p.startswith("Input: ") and p.endswith("\nOutput:") for p in next(iter(prompts.values())))


def test_exclude_keeps_held_out_apart():
    train = frozenset(text for text, _ in sentences(300, seed=1))
    held = sentences(200, seed=2, exclude=train)
    assert len(held) == 200 and not train & {text for text, _ in held}


def test_sentences_parse_back_to_their_facts():
    for text, facts in sentences(500, seed=5):
        assert parse_sentence(text) == facts
        assert parse_sentence(PROMPT_TEMPLATE.format(text=text)) == facts
    assert parse_sentence("Hello there.") is None


@pytest.mark.parametrize("name", sorted(TASKS))
def test_checker_accepts_its_answer_and_rejects_the_others(name):
    for record in TASKS[name].examples(100, seed=11):
        for other_name, other in TASKS.items():
            # the checker takes the full prompt or the bare sentence
            for given in (record["prompt"], sentence_of(record["prompt"])):
                assert other.check(given, record["completion"]) == (other_name == name), (name, other_name, record)


def test_checkers_reject_wrong_facts_and_base_model_noise():
    text = "Maria, 34, from Lisbon thinks the new phone is wonderful."
    assert TASKS["extract-json"].check(text, '{"name": "Maria", "age": 34, "city": "Lisbon"}')
    assert not TASKS["extract-json"].check(text, '{"name": "Maria", "age": 35, "city": "Lisbon"}')
    assert TASKS["sentiment"].check(text, " Positive.") and not TASKS["sentiment"].check(text, "negative")
    assert TASKS["shout"].check(text, text.upper()) and not TASKS["shout"].check(text, text)
    assert TASKS["template"].check(text, "City: Lisbon | Name: Maria")
    assert not TASKS["template"].check(text, "City: Paris | Name: Maria")
    for task in TASKS.values():
        assert not task.check(text, "") and not task.check(text, "\nOutput:\nOutput:")


def test_checkers_fall_back_for_text_outside_the_grammar():
    text = "Zed, 40, of Rome, loves pizza."
    assert TASKS["extract-json"].check(text, '{"name": "Zed", "age": 40, "city": "Rome"}')
    assert TASKS["sentiment"].check(text, "positive")
    assert TASKS["shout"].check(text, text.upper())
    assert TASKS["template"].check(text, "City: Rome | Name: Zed")
    assert Facts("Maria", 34, "Lisbon", "the hotel", "awful").sentiment == "negative"
