"""Runs one engine step on the model: a single packed forward pass over every scheduled sequence."""

from __future__ import annotations

import torch

from server.engine.attention import PagedModel, StepAttention, forward_step, pack
from server.engine.kv_cache import KVCache
from server.engine.scheduler import ScheduledSeq
from server.lora.model import LoraModel


class ModelRunner:
    def __init__(self, lora: LoraModel, paged: PagedModel, kv_cache: KVCache, decode_kernel: bool = False) -> None:
        """`paged`: the LoRA-wrapped model switched to paged attention; `decode_kernel`: decode attention by
        the compiled CPU kernel (`decode_kernel_applies` said so)."""
        self.lora = lora
        self.paged = paged
        self.kv_cache = kv_cache
        self.decode_kernel = decode_kernel

    @torch.inference_mode()
    def step(self, plan: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Feed every planned sequence its tokens; returns the plan in packed order and the
        last-token logits `[len(plan), vocab]` in that order.

        The step context is built here, once: the attention plan (`StepAttention`) and the
        LoRA plan (`LoraStepMeta`), both passed explicitly to the forward. Sequences are packed
        decode rows first, then prefill chunks, each grouped by adapter row with base last, after
        `LoraModel.place` has moved the step's adapters into a dense prefix of rows.
        """
        rows = self.lora.place(item.seq.slot for item in plan if item.seq.slot >= 0)
        last = self.lora.max_loras
        plan = sorted(plan, key=lambda p: (p.num_tokens != 1, rows.get(p.seq.slot, last)))
        seqs, token_rows, num_decode = [], [], 0
        for item in plan:
            seq = item.seq
            start, end = seq.num_computed, seq.num_computed + item.num_tokens
            seqs.append((seq.token_ids[start:end], end, seq.blocks))
            token_rows.extend([rows.get(seq.slot, -1)] * item.num_tokens)
            num_decode += item.num_tokens == 1
        slices, tokens = pack(seqs)
        device = self.kv_cache.device
        attention = StepAttention.build(slices, self.kv_cache.block_size, device, self.kv_cache.dtype,
                                        self.decode_kernel)
        meta = self.lora.step_meta(token_rows, num_decode) if rows else None
        with self.lora.stepping(meta, head_rows=attention.last_rows):
            logits = forward_step(self.paged, self.kv_cache, attention,
                                  torch.tensor(tokens, dtype=torch.long, device=device))
        for item in plan:
            item.seq.num_computed += item.num_tokens
        return plan, logits
