"""Turning sampled tokens into deltas and finish reasons, and prompt logits into prompt logprobs."""

from __future__ import annotations

import torch

from server.engine.request import Delta, TokenLogprob
from server.engine.runner import prompt_spans
from server.engine.sampler import SampleOutput, token_logprobs
from server.engine.scheduler import ScheduledSeq
from server.engine.sequence import Sequence


def finish_reason(seq: Sequence, is_eos: bool, max_context: int) -> str | None:
    if (is_eos and not seq.params.ignore_eos) or seq.detokenizer.stopped:
        return "stop"
    if len(seq.output_ids) >= seq.params.max_tokens or len(seq.token_ids) >= max_context:
        return "length"
    return None


def token_logprob(tokenizer, out: SampleOutput, k: int | None = None) -> TokenLogprob:
    """`out` (its logprob computed) as the API's TokenLogprob, keeping the first `k` alternatives."""
    top = (out.top_logprobs or [])[:k]
    return TokenLogprob(token=tokenizer.decode([out.token]), logprob=out.logprob, token_id=out.token,
                        rank=out.rank, top=tuple((tokenizer.decode([t]), lp) for t, lp in top),
                        top_ids=tuple(t for t, _ in top))


def make_delta(tokenizer, seq: Sequence, text: str, out: SampleOutput | None, reason: str | None) -> Delta:
    """The delta of one step (`out` None: a scoring request that ends without generating)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    if out is not None and out.logprob is not None:
        logprobs = (token_logprob(tokenizer, out),)
    first = len(seq.output_ids) <= 1  # the prompt goes with the first delta only
    prompt_logprobs = _computed(seq.prompt_logprobs) if first and seq.prompt_logprobs is not None else None
    return Delta(text=text, logprobs=logprobs, finish_reason=reason, prompt_tokens=seq.prompt_len,
                 completion_tokens=len(seq.output_ids), prompt_logprobs=prompt_logprobs,
                 prompt_text=seq.echo_text if first else None)


def record_prompt_logprobs(tokenizer, plan: list[ScheduledSeq], logits: torch.Tensor) -> None:
    """Fill the prompt logprobs of a step's prompt rows: `logits` are the runner's rows past the plan's own,
    in `prompt_spans` order; position p's row scores prompt token p + 1."""
    spans = prompt_spans(plan, advanced=True)
    if not spans:
        return
    asked = []
    for seq, start, count in spans:  # prompt_spans keeps the sequences that asked for prompt logprobs
        slots, k = seq.prompt_logprobs, seq.params.prompt_logprobs
        assert slots is not None and k is not None
        asked.append((seq.token_ids, slots, k, start, count))
    targets = torch.tensor([ids[p + 1] for ids, _, _, start, count in asked for p in range(start, start + count)])
    outs = iter(token_logprobs(logits, targets, max(k for _, _, k, _, _ in asked)))
    for _, slots, k, start, count in asked:
        for p in range(start, start + count):
            slots[p + 1] = token_logprob(tokenizer, next(outs), k)


def _computed(slots: list[TokenLogprob | None]) -> tuple[TokenLogprob, ...]:
    """A sequence's prompt logprobs once its prompt is computed (a delta comes only then): every slot is
    filled, the first (whose logprob is None) from the start, the others by `record_prompt_logprobs`."""
    filled = tuple(item for item in slots if item is not None)
    assert len(filled) == len(slots), "prompt logprobs sent before the prompt was computed"
    return filled
