"""Turning records into token ids: what is learned (completion + EOS) and what is masked (prompt)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.train.data import (
    IGNORE_INDEX, DataError, Example, collate, encode, load_jsonl, record_to_example,
)


def test_prompt_tokens_are_masked_and_eos_is_learned(tokenizer):
    example = Example("Input: Maria, 34, from Lisbon.\nOutput:", " positive")
    prompt_ids = tokenizer(example.prompt).input_ids
    completion_ids = tokenizer(example.completion, add_special_tokens=False).input_ids
    encoded = encode(example, tokenizer, max_length=64)
    assert encoded.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert encoded.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert encoded.labels[len(prompt_ids) :] == completion_ids + [tokenizer.eos_token_id]


def test_chat_record_learns_only_the_final_assistant_message(tokenizer):
    messages = [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "Say bye"},
        {"role": "assistant", "content": "bye now"},
    ]
    example = record_to_example({"messages": messages}, tokenizer)
    assert example.completion == "bye now" and not example.special_tokens
    assert example.prompt == tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    assert "hi<|im_end|>" in example.prompt  # the earlier answer is context, not a target
    encoded = encode(example, tokenizer, max_length=256)
    learned = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert learned == tokenizer("bye now", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def test_long_prompt_is_cut_from_the_left_and_long_completion_dropped(tokenizer):
    example = Example("word " * 50, " yes")
    encoded = encode(example, tokenizer, max_length=10)
    assert len(encoded.input_ids) == 10
    assert encoded.labels[-2:] == encoded.input_ids[-2:]  # " yes" + EOS kept whole
    assert encode(Example("a", " word" * 20), tokenizer, max_length=10) is None


def test_collate_masks_padding(tokenizer):
    batch = [encode(Example("Input: a\nOutput:", " b"), tokenizer, 32), encode(Example("Input: a much longer prompt\nOutput:", " c d e"), tokenizer, 32)]
    tensors = collate(batch, pad_id=tokenizer.eos_token_id)
    short = len(batch[0].input_ids)
    assert tensors["input_ids"].shape == tensors["labels"].shape == tensors["attention_mask"].shape
    assert tensors["attention_mask"][0, short:].sum() == 0
    assert (tensors["labels"][0, short:] == IGNORE_INDEX).all()
    assert tensors["attention_mask"][1].all()


def test_load_jsonl_reads_both_formats_and_names_bad_lines(tokenizer, tmp_path: Path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "p", "completion": " c"}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}) + "\n")
    assert [e.completion for e in load_jsonl(good, tokenizer)] == [" c", "a"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": " c"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_jsonl(bad, tokenizer)
    last_user = tmp_path / "user_last.jsonl"
    last_user.write_text(json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]}) + "\n")
    with pytest.raises(DataError, match="assistant"):
        load_jsonl(last_user, tokenizer)
