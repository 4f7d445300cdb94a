"""Runs one engine step on the model: a single packed forward pass over every scheduled sequence."""

from __future__ import annotations

import dataclasses

import torch

from server.engine.attention import PagedModel, StepAttention, StepForward, forward_step, pack
from server.engine.kv_cache import KVCache
from server.engine.probe import lean_forward_for
from server.engine.scheduler import ScheduledSeq
from server.engine.sequence import Sequence
from server.lora.model import LoraModel


class ModelRunner:
    def __init__(self, lora: LoraModel, paged: PagedModel, kv_cache: KVCache, decode_kernel: bool = False,
                 lean: bool = True) -> None:
        """`paged`: the LoRA-wrapped model switched to paged attention; `decode_kernel`: decode attention by
        the compiled CPU kernel (`decode_kernel_applies` said so). `lean`: run the lean decoder forward
        (server/engine/lean_forward.py) where it applies and passes its start-up check."""
        self.lora = lora
        self.paged = paged
        self.kv_cache = kv_cache
        self.decode_kernel = decode_kernel
        self.lean: StepForward | None = lean_forward_for(paged, kv_cache, decode_kernel) if lean else None

    @torch.inference_mode()
    def step(self, plan: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Feed every planned sequence its tokens; returns the plan in packed order and the
        last-token logits `[len(plan), vocab]` in that order, followed by the logits of the prompt
        positions whose next token's logprob was asked for (`prompt_spans` of the returned plan, in order).

        The step context is built here, once: the attention plan (`StepAttention`), passed to the forward,
        and the LoRA plan (`LoraStepMeta`), set on the model's `StepState` for the length of the forward
        (`LoraModel.stepping`): the lean decoder reads it once and passes it to each projection group, the
        transformers path's LoRA layers read it there. Sequences are packed
        decode rows first, then prefill chunks, each grouped by adapter row with base last, after
        `LoraModel.place` has moved the step's adapters into a dense prefix of rows.
        """
        rows = self.lora.place(slot for item in plan if (slot := _slot(item.seq)) >= 0)
        last = self.lora.max_loras
        plan = sorted(plan, key=lambda p: (p.num_tokens != 1, rows.get(_slot(p.seq), last)))
        seqs, token_rows, num_decode = [], [], 0
        for item in plan:
            seq = item.seq
            start, end = seq.num_computed, seq.num_computed + item.num_tokens
            seqs.append((seq.token_ids[start:end], end, seq.blocks))
            token_rows.extend([rows.get(_slot(seq), -1)] * item.num_tokens)
            num_decode += item.num_tokens == 1
        slices, tokens = pack(seqs)
        device = self.kv_cache.device
        attention = StepAttention.build(slices, self.kv_cache.block_size, device, self.kv_cache.dtype,
                                        self.decode_kernel)
        meta = self.lora.step_meta(token_rows, num_decode) if rows else None
        extra = _prompt_rows(plan, slices)
        if extra is not None:  # the output head also runs on these rows, and on no other prompt row
            attention = dataclasses.replace(attention, last_rows=torch.cat([attention.last_rows, extra.to(
                attention.last_rows.device)]))
        with self.lora.stepping(meta, head_rows=attention.last_rows):
            ids = torch.tensor(tokens, dtype=torch.long, device=device)
            logits = forward_step(self.paged, self.kv_cache, attention, ids) if self.lean is None else \
                self.lean(self.kv_cache, attention, ids)
        return plan, logits  # the scheduler advances each sequence's num_computed (Scheduler.computed)


def _slot(seq: Sequence) -> int:
    """A scheduled sequence's device slot (-1: the base); the scheduler binds one before it runs."""
    if seq.slot is None:
        raise RuntimeError("a sequence was scheduled without a device slot")
    return seq.slot


def prompt_spans(plan: list[ScheduledSeq], advanced: bool) -> list[tuple[Sequence, int, int]]:
    """(sequence, first position, count) of each step's prompt positions whose logits give the logprob of
    the next prompt token, for sequences that asked for prompt logprobs. `advanced`: the step already moved
    `num_computed` past its tokens. A prompt's last position is left out: it is the sampling row."""
    spans = []
    for item in plan:
        seq = item.seq
        if seq.prompt_logprobs is None:
            continue
        start = seq.num_computed - (item.num_tokens if advanced else 0)
        end = min(start + item.num_tokens, seq.prompt_len - 1)
        if end > start:
            spans.append((seq, start, end - start))
    return spans


def _prompt_rows(plan: list[ScheduledSeq], slices) -> torch.Tensor | None:
    """Packed rows of `prompt_spans(plan)`, in that order; None when there are none."""
    by_seq = {id(item.seq): s.query_start for item, s in zip(plan, slices)}
    rows = [by_seq[id(seq)] + i for seq, start, count in prompt_spans(plan, advanced=False)
            for i in range(count)]
    return torch.tensor(rows, dtype=torch.long) if rows else None
