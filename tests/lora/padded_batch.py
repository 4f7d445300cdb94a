"""The LoRA layers in a left-padded batch where every row names its own adapter slot (row mode),
driven by plain transformers forward and `generate`: the PEFT comparison without the engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from server.lora.model import LoraModel


@contextmanager
def row_slots(lora: LoraModel, slots: list[int]) -> Iterator[None]:
    """Every forward of the model (one, or each of `generate`'s) gets a step context in which
    every token of row b uses slot `slots[b]`; single-token forwards count as decode rows."""
    rows = [lora.row_of[s] if s >= 0 else -1 for s in slots]

    def plan(module, args, kwargs):
        batch, width = kwargs["input_ids"].shape
        assert batch == len(rows)
        token_rows = [r for r in rows for _ in range(width)]
        lora.state.meta = lora.step_meta(token_rows, num_decode=batch if width == 1 else 0)
        # `generate` runs the output layer on each row's last position only.
        last = torch.arange(1, batch + 1) * width - 1
        lora.state.head_meta = lora.head_meta(lora.state.meta, last)

    handle = lora.model.register_forward_pre_hook(plan, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        lora.state.meta = lora.state.head_meta = None


@torch.inference_mode()
def forward_logits(lora: LoraModel, rows: list[list[int]], slots: list[int], pad_id: int) -> list[torch.Tensor]:
    """Logits [len(row), vocab] of every row, from one forward pass over the left-padded batch."""
    input_ids, mask = left_pad(rows, pad_id, lora.device)
    with row_slots(lora, slots):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = lora.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    width = input_ids.shape[1]
    return [logits[i, width - len(row):] for i, row in enumerate(rows)]


@torch.inference_mode()
def generate_batch(lora: LoraModel, rows: list[list[int]], slots: list[int], max_new_tokens: int,
                   eos_ids: list[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
                   generator_seed: int | None = None) -> list[list[int]]:
    """New token ids per row (up to and including the first EOS) from transformers `generate`."""
    input_ids, mask = left_pad(rows, pad_id, lora.device)
    sampling: dict = {"do_sample": False}
    if temperature > 0:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    with row_slots(lora, slots):
        out = lora.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  eos_token_id=eos_ids, pad_token_id=pad_id, **sampling)
    return [cut_at_eos(seq, eos_ids) for seq in out[:, input_ids.shape[1]:].tolist()]


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1]
    return tokens
