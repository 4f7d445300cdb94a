"""Runs one engine step on the model: a single packed forward pass over every scheduled sequence."""

from __future__ import annotations

import torch

from server.engine.attention import packed_forward
from server.engine.kv_cache import KVCache
from server.engine.scheduler import ScheduledSeq
from server.lora.model import LoraModel


class ModelRunner:
    def __init__(self, lora: LoraModel, kv_cache: KVCache) -> None:
        self.lora = lora
        self.kv_cache = kv_cache

    @torch.inference_mode()
    def step(self, plan: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Feed every planned sequence its tokens; returns the plan in packed order and the
        last-token logits `[len(plan), vocab]` in that order.

        Sequences are packed grouped by adapter slot, base last, so the LoRA op sees tokens
        already sorted and needs no permutation.
        """
        plan = sorted(plan, key=lambda p: p.seq.slot if p.seq.slot >= 0 else self.lora.max_loras)
        seqs, slots = [], []
        for item in plan:
            seq = item.seq
            start, end = seq.num_computed, seq.num_computed + item.num_tokens
            seqs.append((seq.token_ids[start:end], end, seq.blocks))
            slots.extend([seq.slot] * item.num_tokens)
        self.lora.context.set_token_slots(torch.tensor(slots, dtype=torch.long))
        try:
            logits = packed_forward(self.lora.model, self.kv_cache, seqs)
        finally:
            self.lora.context.clear()
        for item in plan:
            item.seq.num_computed += item.num_tokens
        return plan, logits
