"""The async stream of deltas that `Engine.submit` returns to the HTTP layer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from server.engine.request import Delta, EngineError, GenerationResult, TokenLogprob


class RequestStream:
    """Deltas of one request, fed from the engine thread, consumed by one asyncio task.

    Closing the stream before the last delta (client gone, task cancelled) aborts the
    request, which frees its KV cache and adapter pin within one engine step.
    """

    def __init__(self, request_id: str, abort: Callable[[str], None], index: int = 0,
                 abort_key: str | None = None) -> None:
        self.request_id = request_id
        self.index = index                            # the choice this stream carries
        self._abort_key = abort_key or request_id     # what `abort` is called with (unique per choice)
        self._abort = abort
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta | EngineError] = asyncio.Queue()
        self._finished = False

    # Called from the engine thread.
    def put(self, item: Delta | EngineError) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is gone: nobody will read this request
            self._finished = True
            self._abort(self._abort_key)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if isinstance(item, EngineError):
            self._finished = True
            raise item
        if item.finish_reason is not None:
            self._finished = True
        return item

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self._abort(self._abort_key)

    async def collect(self) -> GenerationResult:
        """Run the stream to its end and join the deltas into one result."""
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        last: Delta | None = None
        try:
            async for delta in self:
                parts.append(delta.text)
                logprobs.extend(delta.logprobs)
                last = delta
        finally:
            await self.aclose()
        assert last is not None and last.finish_reason is not None
        return GenerationResult(text="".join(parts), finish_reason=last.finish_reason,
                                prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                                logprobs=tuple(logprobs))
