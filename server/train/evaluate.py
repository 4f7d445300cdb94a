"""Held-out evaluation: batched greedy generation (left padding) scored by exact match, and mean loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.train.data import Encoded, Example, collate, encode_prompt, pad_id_of

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class EvalReport:
    examples: int
    accuracy: float  # exact match after normalising whitespace
    mean_loss: float | None  # per completion token, EOS included
    samples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"examples": self.examples, "accuracy": self.accuracy, "mean_loss": self.mean_loss, "samples": self.samples}


def normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalise(prediction) == normalise(reference)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding puts every prompt's last token in the final column, where generation continues."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.inference_mode()
def generate_greedy(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of every prompt, cut at EOS, in input order."""
    device = next(model.parameters()).device
    prompts = [encode_prompt(example, tokenizer) for example in examples]
    # Similar lengths in a batch waste less compute on padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    pad_id = pad_id_of(tokenizer)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], pad_id)
        generated = model.generate(  # type: ignore[operator]  # transformers' decorated generate reads as a Tensor
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for i, row in zip(chunk, generated[:, ids.shape[1] :].tolist()):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            outputs[i] = str(tokenizer.decode(row, skip_special_tokens=True))
    return outputs


@torch.inference_mode()
def mean_loss(model: PreTrainedModel | PeftModel, data: list[Encoded], pad_id: int, batch_size: int = 64) -> float:
    """Token-weighted mean cross-entropy over all completion tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        tensors = {k: v.to(device) for k, v in collate(data[start : start + batch_size], pad_id).items()}
        tokens = int((tensors["labels"][:, 1:] != -100).sum())
        # The model's loss is the mean over this batch's shifted label tokens.
        total += model(**tensors).loss.item() * tokens
        count += tokens
    return total / max(1, count)


def max_new_tokens_for(examples: list[Example], tokenizer: PreTrainedTokenizerBase, margin: int = 2) -> int:
    """Enough tokens for the longest reference (+EOS); anything longer is wrong anyway."""
    return max(len(tokenizer(e.completion, add_special_tokens=False).input_ids) for e in examples) + 1 + margin


def score(predictions: list[str], examples: list[Example], keep_samples: int = 5) -> tuple[float, list[dict]]:
    hits = [exact_match(p, e.completion) for p, e in zip(predictions, examples)]
    samples = [
        {"prompt": e.prompt, "expected": e.completion.strip(), "output": p.strip(), "match": h}
        for p, e, h in list(zip(predictions, examples, hits))[:keep_samples]
    ]
    return sum(hits) / max(1, len(hits)), samples


def evaluate(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    encoded: list[Encoded] | None = None,
    batch_size: int = 32,
) -> EvalReport:
    """Exact-match accuracy of greedy generations, and the mean loss when `encoded` is given."""
    predictions = generate_greedy(model, tokenizer, examples, max_new_tokens_for(examples, tokenizer), batch_size)
    accuracy, samples = score(predictions, examples)
    loss = mean_loss(model, encoded, pad_id_of(tokenizer), batch_size) if encoded else None
    return EvalReport(len(examples), accuracy, loss, samples)
