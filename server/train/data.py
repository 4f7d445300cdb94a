"""Training data: JSONL records -> (prompt, completion) text -> token ids with masked labels."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that cross-entropy skips


class DataError(ValueError):
    """A data file or record is malformed."""


@dataclass(frozen=True)
class Example:
    """One training pair. `special_tokens`: whether the tokenizer may add BOS & co to the prompt
    (False for chat-rendered prompts, whose template already holds every special token)."""

    prompt: str
    completion: str
    special_tokens: bool = True


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def record_to_example(record: Any, tokenizer: PreTrainedTokenizerBase) -> Example:
    """A `{"prompt", "completion"}` or chat `{"messages": [...]}` record as an Example."""
    if not isinstance(record, dict):
        raise DataError("each line must be a JSON object")
    if "messages" in record:
        return chat_to_example(record["messages"], tokenizer)
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError('a record needs string "prompt" and "completion" fields, or "messages"')
    return Example(prompt, completion)


def chat_to_example(messages: Any, tokenizer: PreTrainedTokenizerBase) -> Example:
    """Everything before the final assistant message is the prompt (rendered with the chat
    template and its generation prompt); only the final assistant message is learned."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError('"messages" must be a list of at least two messages')
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise DataError('every message needs a string "content"')
    if messages[-1].get("role") != "assistant":
        raise DataError('the last message must have role "assistant"')
    if tokenizer.chat_template is None:
        raise DataError("chat records need a tokenizer with a chat template")
    prompt = cast(str, tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False))
    return Example(prompt, messages[-1]["content"], special_tokens=False)


def load_jsonl(path: Path, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """Read every non-blank line; errors name the file and line."""
    examples = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                examples.append(record_to_example(json.loads(line), tokenizer))
            except (json.JSONDecodeError, DataError) as exc:
                raise DataError(f"{path}:{number}: {exc}") from exc
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def encode_prompt(example: Example, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return tokenizer(example.prompt, add_special_tokens=example.special_tokens).input_ids


def encode(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded | None:
    """Prompt and completion are tokenized apart, as a server tokenizes the prompt alone and then
    generates; EOS ends the completion so the adapter learns to stop. Prompt tokens get label -100.
    A long prompt loses its start; None if the completion alone does not fit."""
    completion = tokenizer(example.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    room = max_length - len(completion)
    if room < 1:
        return None
    prompt = encode_prompt(example, tokenizer)[-room:]
    return Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


def encode_all(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[Encoded], int]:
    """Encoded examples and how many were dropped for length."""
    encoded = [encode(example, tokenizer, max_length) for example in examples]
    kept = [item for item in encoded if item is not None]
    return kept, len(encoded) - len(kept)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for training; padding is masked out of attention and loss."""
    width = max(len(item.input_ids) for item in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
