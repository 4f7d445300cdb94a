"""One HTTP request's engine requests: submitted together, consumed as one merged stream.

Each prompt (a completion may send several; a chat sends its messages) is one engine
request with `n` choices: `await engine.submit(request)` validates, renders and tokenizes
it once, off the event loop, and returns `n` streams (choice j seeded seed + j by the
engine). Every stream is aborted (`aclose`) as soon as the HTTP request ends early: client
gone, error, or cancelled task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from server.api.metrics import ApiMetrics
from server.api.schemas import Usage
from server.engine.protocol import EngineAPI
from server.engine.request import Delta, GenerationRequest, SamplingParams, TokenLogprob
from server.engine.stream import RequestStream

_END = object()


@dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    prompt_index: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_text: str | None = None           # echo: the prompt, as the first delta brought it
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Generation:
    def __init__(self, engine: EngineAPI, metrics: ApiMetrics, log_info: dict, model: str, request_id: str) -> None:
        self.engine, self.metrics, self.info = engine, metrics, log_info
        self.model, self.request_id = model, request_id
        self.streams: list[RequestStream] = []
        self.choices: list[Choice] = []
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self._finished = False
        log_info["model"] = model

    async def submit(self, prompts: list[str | list[int]] | None, n: int, params: SamplingParams,
                     messages: tuple[dict, ...] | None = None, apply_template: bool = True) -> None:
        """One engine request per prompt, text or token ids (or one for `messages`); engine errors raise here.

        Whatever was submitted before an error is aborted, so a refused request leaves nothing running.
        """
        inputs: list[tuple[str | list[int] | None, tuple[dict, ...] | None]] = (
            [(None, messages)] if messages is not None else [(p, None) for p in prompts or []])
        try:
            for p, (prompt, chat) in enumerate(inputs):
                rid = self.request_id if len(inputs) == 1 else f"{self.request_id}-{p}"
                text, ids = (None, tuple(prompt)) if isinstance(prompt, list) else (prompt, None)
                request = GenerationRequest(rid, self.model, prompt=text, params=params, n=n,
                                            messages=chat, apply_template=apply_template, prompt_ids=ids)
                streams = await self.engine.submit(request)
                for j, stream in enumerate(streams):
                    self.streams.append(stream)
                    self.choices.append(Choice(index=p * n + j, prompt_index=p))
        except BaseException:
            self._abort_submitted()
            raise
        self.metrics.generation_started(self.model)

    def _abort_submitted(self) -> None:
        for stream in self.streams:
            asyncio.ensure_future(stream.aclose())

    async def deltas(self) -> AsyncGenerator[tuple[Choice, Delta], None]:
        """Deltas of all choices as they come; aborts whatever is unfinished when left early."""
        source = self._single() if len(self.streams) == 1 else self._merged()
        try:
            async for index, delta in source:
                yield self._record(self.choices[index], delta), delta
            self._finished = True
        finally:
            await source.aclose()
            await self.aclose()

    async def _single(self) -> AsyncGenerator[tuple[int, Delta], None]:
        async for delta in self.streams[0]:
            yield 0, delta

    async def _merged(self) -> AsyncGenerator[tuple[int, Delta], None]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for delta in stream:
                    queue.put_nowait((index, delta))
            except Exception as exc:  # an engine error ends the whole request
                queue.put_nowait((index, exc))
            finally:
                queue.put_nowait((index, _END))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            open_streams = len(tasks)
            while open_streams:
                index, item = await queue.get()
                if item is _END:
                    open_streams -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _record(self, choice: Choice, delta: Delta) -> Choice:
        if self.first_token_at is None and (delta.text or delta.completion_tokens):
            self.first_token_at = time.perf_counter()
            self.metrics.ttft.observe(self.first_token_at - self.started)
            self.info["ttft_ms"] = round((self.first_token_at - self.started) * 1000, 1)
        if delta.prompt_text is not None:
            choice.prompt_text = delta.prompt_text
        if delta.prompt_logprobs is not None:
            choice.prompt_logprobs = delta.prompt_logprobs
        choice.parts.append(delta.text)
        choice.logprobs.extend(delta.logprobs)
        choice.prompt_tokens = delta.prompt_tokens or choice.prompt_tokens
        choice.completion_tokens = delta.completion_tokens or choice.completion_tokens
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
        return choice

    async def run(self) -> list[Choice]:
        """Consume every choice to its end (non-streamed responses)."""
        async for _ in self.deltas():
            pass
        return self.choices

    def usage(self) -> Usage:
        prompt_tokens: dict[int, int] = {}
        for c in self.choices:  # a prompt counts once, whatever n is
            prompt_tokens[c.prompt_index] = max(prompt_tokens.get(c.prompt_index, 0), c.prompt_tokens)
        prompt = sum(prompt_tokens.values())
        completion = sum(c.completion_tokens for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def aclose(self) -> None:
        """Abort unfinished engine requests and record the request's tokens and timings once."""
        streams, self.streams = self.streams, []
        for stream in streams:
            await stream.aclose()
        if not streams:
            return
        usage = self.usage()
        self.info.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
        if not self._finished:
            self.info.setdefault("outcome", "aborted")
        self.metrics.generation_finished(self.model, usage.prompt_tokens, usage.completion_tokens,
                                         self.started, self.first_token_at, aborted=not self._finished)
