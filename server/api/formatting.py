"""The engine's token log probabilities in OpenAI's shapes (completions, chat) and vLLM's prompt_logprobs.

OpenAI semantics: a token's alternatives are the `k` most likely tokens plus the token itself (so
`logprobs: 0` gives the chosen token alone), most likely first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from server.api.schemas import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprobs,
    PromptTokenLogprob,
    TopLogprob,
)
from server.engine.request import TokenLogprob


def _finite(value: float) -> float:
    # JSON has no -inf; OpenAI uses -9999.0 for "impossible".
    return value if math.isfinite(value) else -9999.0


def _alternatives(item: TokenLogprob, k: int | None) -> dict[str, float] | None:
    """The top `k` (all the engine sent when None) and the token itself; None for a prompt's first token."""
    if item.logprob is None:
        return None
    top = {t: _finite(lp) for t, lp in item.top[:k]}
    top.setdefault(item.token, _finite(item.logprob))
    return top


def completion_logprobs(items: Sequence[TokenLogprob], offset: int = 0, k: int | None = None) -> CompletionLogprobs:
    """`{tokens, token_logprobs, top_logprobs, text_offset}`; offsets count from `offset` in the text."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return CompletionLogprobs(tokens=[i.token for i in items],
                              token_logprobs=[None if i.logprob is None else _finite(i.logprob) for i in items],
                              top_logprobs=[_alternatives(i, k) for i in items], text_offset=offsets)


def echoed_logprobs(prompt: Sequence[TokenLogprob] | None, prompt_text: str, completion: Sequence[TokenLogprob],
                    k: int, start: int = 0) -> CompletionLogprobs:
    """Completion logprobs behind an echoed prompt: the prompt's tokens first (cut to `k` alternatives), then
    the completion's from `start` characters into it, offsets counted over the echoed text."""
    head = completion_logprobs(prompt or (), 0, k)
    tail = completion_logprobs(completion, len(prompt_text) + start)
    return CompletionLogprobs(tokens=head.tokens + tail.tokens, token_logprobs=head.token_logprobs +
                              tail.token_logprobs, top_logprobs=head.top_logprobs + tail.top_logprobs,
                              text_offset=head.text_offset + tail.text_offset)


def prompt_logprobs(items: Sequence[TokenLogprob] | None, k: int) -> PromptLogprobs | None:
    """vLLM's `prompt_logprobs`: per prompt token (the first null), `{token id: {logprob, rank, decoded_token}}`
    for the token itself and the `k` most likely."""
    if items is None:
        return None
    entries: PromptLogprobs = []
    for item in items:
        if item.logprob is None:
            entries.append(None)
            continue
        entry = {str(t): PromptTokenLogprob(logprob=_finite(lp), rank=r + 1, decoded_token=s)
                 for r, (t, (s, lp)) in enumerate(zip(item.top_ids[:k], item.top[:k]))}
        entry.setdefault(str(item.token_id), PromptTokenLogprob(logprob=_finite(item.logprob), rank=item.rank,
                                                                decoded_token=item.token))
        entries.append(entry)
    return entries


def chat_logprobs(items: Sequence[TokenLogprob]) -> ChatLogprobs:
    """`{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal}`: top_logprobs
    are the `top_logprobs` most likely tokens, as OpenAI's chat sends them."""
    content = [ChatTokenLogprob(token=i.token, logprob=_finite(-math.inf if i.logprob is None else i.logprob), bytes=list(i.token.encode("utf-8")),
                                top_logprobs=[TopLogprob(token=t, logprob=_finite(lp), bytes=list(t.encode("utf-8")))
                                              for t, lp in i.top])
               for i in items]
    return ChatLogprobs(content=content)
