"""The engine's token log probabilities in OpenAI's two shapes (completions and chat)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from server.api.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from server.engine.request import TokenLogprob


def _finite(value: float) -> float:
    # JSON has no -inf; OpenAI uses -9999.0 for "impossible".
    return value if math.isfinite(value) else -9999.0


def completion_logprobs(items: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """`{tokens, token_logprobs, top_logprobs, text_offset}`; offsets count from `offset` in the completion."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return CompletionLogprobs(tokens=[i.token for i in items], token_logprobs=[_finite(i.logprob) for i in items],
                              top_logprobs=[{t: _finite(lp) for t, lp in i.top} for i in items],
                              text_offset=offsets)


def chat_logprobs(items: Sequence[TokenLogprob]) -> ChatLogprobs:
    """`{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal}`."""
    content = [ChatTokenLogprob(token=i.token, logprob=_finite(i.logprob), bytes=list(i.token.encode("utf-8")),
                                top_logprobs=[TopLogprob(token=t, logprob=_finite(lp), bytes=list(t.encode("utf-8")))
                                              for t, lp in i.top])
               for i in items]
    return ChatLogprobs(content=content)
