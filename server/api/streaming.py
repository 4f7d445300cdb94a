"""Server-sent events: `data: {chunk}` per delta, an optional usage chunk, then `data: [DONE]`.

`EventStreamResponse` watches the connection while it streams: when the client goes away
it cancels the stream and closes the event generator, whose `finally` aborts the engine
requests at once (their KV blocks and adapter pins are freed within one engine step).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, suppress
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import engine_error_body, error_body
from server.api.formatting import chat_logprobs, completion_logprobs, echoed_logprobs, prompt_logprobs
from server.api.generation import Choice, Generation
from server.api.schemas import CompletionRequest
from server.engine.request import Delta, EngineError

log = logging.getLogger(__name__)


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class EventStreamResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[str], gen: Generation, log_info: dict) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen, self.log_info = gen, log_info

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        streaming = asyncio.ensure_future(self.stream_response(send))
        watching = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
            if streaming.done():
                with suppress(OSError):  # the client went away between two sends
                    streaming.result()
            else:
                self.log_info["outcome"] = "client_closed"
        finally:
            for task in (streaming, watching):
                task.cancel()
                with suppress(asyncio.CancelledError, OSError):
                    await task
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.gen.aclose()  # also when the events never started


def _usage_chunk(base: dict, gen: Generation) -> dict:
    return {**base, "choices": [], "usage": gen.usage().model_dump()}


def _error_event(exc: Exception) -> str:
    if isinstance(exc, EngineError):
        return sse(engine_error_body(exc))
    log.error("stream failed: %s", type(exc).__name__, exc_info=exc)
    return sse(error_body(500, "The server had an error while processing your request.", code="internal_error"))


Deltas = AsyncGenerator[tuple[Choice, Delta], None]


async def started_deltas(gen: Generation) -> Deltas:
    """`gen`'s deltas with the first one already awaited, so an engine error before any token (an
    adapter deleted while the request waited for its weights) becomes the response's HTTP status
    rather than an error event in a 200 stream."""
    deltas = gen.deltas()
    try:
        first = await anext(deltas)
    except StopAsyncIteration:
        return _chain(None, deltas)
    return _chain(first, deltas)


async def _chain(first: tuple[Choice, Delta] | None, rest: Deltas) -> Deltas:
    try:
        if first is not None:
            yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


def completion_chunk_choice(choice: Choice, delta: Delta, body: CompletionRequest) -> dict:
    """A choice's piece of one chunk; its first carries the echoed prompt and the prompt logprobs."""
    start = len(choice.text) - len(delta.text)
    echoed = delta.prompt_text if body.echo else None  # the echoed prompt, on the choice's first delta
    logprobs = None
    if body.logprobs is not None:
        logprobs = (echoed_logprobs(delta.prompt_logprobs, echoed, delta.logprobs, body.logprobs)
                    if echoed is not None else completion_logprobs(delta.logprobs, start + len(choice.prompt_text or "")
                                                                   if body.echo else start)).model_dump()
    out = {"index": choice.index, "text": delta.text if echoed is None else echoed + delta.text,
           "logprobs": logprobs, "finish_reason": delta.finish_reason}
    prompt = None if body.prompt_logprobs is None else prompt_logprobs(delta.prompt_logprobs, body.prompt_logprobs)
    if prompt is not None:
        out["prompt_logprobs"] = [e if e is None else {k: v.model_dump() for k, v in e.items()} for e in prompt]
    return out


async def _events(gen: Generation, deltas: Deltas, base: dict, include_usage: bool,
                  choice_of: Callable[[Choice, Delta], dict], opening: list[dict] | None = None) -> AsyncIterator[str]:
    """One chunk per delta (`choice_of` writes its choice), the usage chunk when asked for, then `[DONE]`; an
    error after the first event is sent as an error event before `[DONE]`."""
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    try:
        for first in opening or ():
            yield sse({**base, "choices": [first], **extra})
        async with aclosing(deltas):
            async for choice, delta in deltas:
                yield sse({**base, "choices": [choice_of(choice, delta)], **extra})
        if include_usage:
            yield sse(_usage_chunk(base, gen))
    except Exception as exc:
        yield _error_event(exc)
    yield sse("[DONE]")


def completion_events(gen: Generation, deltas: Deltas, base: dict, body: CompletionRequest,
                      include_usage: bool) -> AsyncIterator[str]:
    return _events(gen, deltas, base, include_usage, lambda choice, delta: completion_chunk_choice(choice, delta, body))


def chat_events(gen: Generation, deltas: Deltas, base: dict, want_logprobs: bool, include_usage: bool
                ) -> AsyncIterator[str]:
    def chunk_choice(choice: Choice, delta: Delta) -> dict:
        logprobs = chat_logprobs(delta.logprobs).model_dump() if want_logprobs else None
        content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
        return {"index": choice.index, "delta": content, "logprobs": logprobs, "finish_reason": delta.finish_reason}

    # OpenAI opens every choice with the role.
    opening = [{"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None} for choice in gen.choices]
    return _events(gen, deltas, base, include_usage, chunk_choice, opening)
