"""Turning sampled tokens into deltas and finish reasons."""

from __future__ import annotations

from server.engine.request import Delta, TokenLogprob
from server.engine.sampler import SampleOutput
from server.engine.sequence import Sequence


def finish_reason(seq: Sequence, is_eos: bool, max_context: int) -> str | None:
    if (is_eos and not seq.params.ignore_eos) or seq.detokenizer.stopped:
        return "stop"
    if len(seq.output_ids) >= seq.params.max_tokens or len(seq.token_ids) >= max_context:
        return "length"
    return None


def make_delta(tokenizer, seq: Sequence, text: str, out: SampleOutput, reason: str | None) -> Delta:
    logprobs: tuple[TokenLogprob, ...] = ()
    if out.logprob is not None:
        top = tuple((tokenizer.decode([t]), lp) for t, lp in (out.top_logprobs or []))
        logprobs = (TokenLogprob(token=tokenizer.decode([out.token]), logprob=out.logprob, top=top),)
    return Delta(text=text, logprobs=logprobs, finish_reason=reason, prompt_tokens=seq.prompt_len,
                 completion_tokens=len(seq.output_ids))
