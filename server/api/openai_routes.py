"""OpenAI-compatible inference routes: `model` names an adapter or the base model.

An unknown model is a 404 from the engine, never a silent fallback to the base model.
Non-streamed requests are aborted when the client disconnects, like streamed ones. The
API key is checked by `auth.AuthGate` before the body is read; the prompt's length in
characters is checked here before the engine renders or tokenizes anything.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.api.errors import ApiError
from server.api.formatting import chat_logprobs, completion_logprobs, echoed_logprobs, prompt_logprobs
from server.api.generation import Choice, Generation
from server.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    ModelObject,
    SamplingFields,
)
from server.api.streaming import EventStreamResponse, chat_events, completion_events, started_deltas
from server.engine.contract import output_format
from server.engine.request import SamplingParams

# Request fields an adapter contract's defaults stand in for when the client leaves them out.
CONTRACT_FIELDS = ("temperature", "top_p", "top_k", "stop", "presence_penalty", "frequency_penalty",
                   "response_format")

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid field, or prompt plus max_tokens longer than the context"},
    401: {"description": "missing or wrong API key"}, 404: {"description": "unknown model"},
    409: {"description": "the adapter is registered but failed to load"},
    429: {"description": "queue full; see Retry-After"},
    503: {"description": "engine not ready, or shutting down; see Retry-After"}}
STREAM_DOC = {"text/event-stream": {"schema": {"type": "string", "description": "with stream=true: `data: {chunk}` "
                                               "events (object text_completion or chat.completion.chunk), an "
                                               "optional usage chunk, then `data: [DONE]`"}}}
router = APIRouter(prefix="/v1", tags=["inference"], responses=ERRORS)


def check_prompt_chars(texts: list[str], limit: int, param: str) -> None:
    """A cheap bound before any rendering or tokenizing: characters, summed over the request's texts."""
    total = sum(len(t) for t in texts)
    if total > limit:
        raise ApiError(400, f"the {param} are {total} characters long; the limit is {limit} (--max-prompt-chars)",
                       code="context_length_exceeded", param=param)


def sampling_params(body: SamplingFields, default_max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None, echo: bool = False) -> SamplingParams:
    error = body.token_count_error()
    if error is not None:
        raise ApiError(400, error[1], code="invalid_value", param=error[0])
    max_tokens = body.requested_max_tokens()
    given = {f for f in CONTRACT_FIELDS if f in body.model_fields_set}
    if max_tokens is not None:
        given.add("max_tokens")
    return SamplingParams(max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
                          temperature=body.temperature, top_p=body.top_p, top_k=max(0, body.top_k), seed=body.seed,
                          stop=body.stop_list(), presence_penalty=body.presence_penalty,
                          frequency_penalty=body.frequency_penalty, logprobs=logprobs, ignore_eos=body.ignore_eos,
                          response_format=output_format(body.response_format), given=frozenset(given),
                          min_tokens=body.min_tokens, logit_bias=body.bias_pairs(), prompt_logprobs=prompt_logprobs,
                          echo=echo)


def _generation(request: Request, body: SamplingFields, prefix: str) -> tuple[Generation, dict, dict]:
    state = request.app.state
    info = request.scope.setdefault("loraplex", {})
    request_id = f"{prefix}-{info.get('id') or int(time.time() * 1e6)}"
    gen = Generation(state.engine, state.metrics, info, body.model, request_id)
    return gen, info, {"id": request_id, "created": int(time.time()), "model": body.model}


async def _run_unless_disconnected(request: Request, gen: Generation, info: dict) -> list[Choice] | None:
    """Run every choice to its end; None (and everything aborted) if the client goes away first."""
    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    running = asyncio.ensure_future(gen.run())
    watching = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({running, watching}, return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            return running.result()
        info["outcome"] = "client_closed"
        return None
    finally:
        for task in (running, watching):
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await gen.aclose()


def _client_closed() -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


@router.post("/completions", response_model=CompletionResponse, summary="Text completion",
             responses={200: {"content": STREAM_DOC}})
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    settings = request.app.state.settings
    prompts = body.prompts()
    check_prompt_chars([p for p in prompts if isinstance(p, str)], settings.max_prompt_chars, "prompt")
    gen, info, base = _generation(request, body, "cmpl")
    params = sampling_params(body, settings.max_tokens_default, body.logprobs, body.engine_prompt_logprobs(),
                             body.echo)
    await gen.submit(prompts, body.n, params, apply_template=body.apply_template)
    base["object"] = "text_completion"
    if body.stream:
        deltas = await started_deltas(gen)
        return EventStreamResponse(completion_events(gen, deltas, base, body, body.include_usage()), gen, info)
    choices = await _run_unless_disconnected(request, gen, info)
    if choices is None:
        return _client_closed()
    return CompletionResponse(**base, usage=gen.usage(), choices=[completion_choice(c, body) for c in choices])


def completion_choice(c: Choice, body: CompletionRequest) -> CompletionChoice:
    """One finished choice: the echoed prompt first when asked for, with its logprobs."""
    logprobs = None
    if body.logprobs is not None:
        logprobs = (echoed_logprobs(c.prompt_logprobs, c.prompt_text or "", c.logprobs, body.logprobs)
                    if body.echo else completion_logprobs(c.logprobs))
    text = (c.prompt_text or "") + c.text if body.echo else c.text
    return CompletionChoice(index=c.index, text=text, finish_reason=c.finish_reason, logprobs=logprobs,
                            prompt_logprobs=_prompt_logprobs(c, body))


def _prompt_logprobs(c: Choice, body: SamplingFields):
    return None if body.prompt_logprobs is None else prompt_logprobs(c.prompt_logprobs, body.prompt_logprobs)


@router.post("/chat/completions", response_model=ChatCompletionResponse, summary="Chat completion",
             responses={200: {"content": STREAM_DOC}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    settings = request.app.state.settings
    messages = tuple(m.as_template_message() for m in body.messages)
    check_prompt_chars([_text(m) for m in messages], settings.max_prompt_chars, "messages")
    gen, info, base = _generation(request, body, "chatcmpl")
    params = sampling_params(body, settings.chat_max_tokens_default, body.logprobs_k(), body.prompt_logprobs)
    await gen.submit(None, body.n, params, messages=messages, apply_template=body.apply_template)
    if body.stream:
        base["object"] = "chat.completion.chunk"
        deltas = await started_deltas(gen)
        return EventStreamResponse(chat_events(gen, deltas, base, body.logprobs, body.include_usage()), gen, info)
    choices = await _run_unless_disconnected(request, gen, info)
    if choices is None:
        return _client_closed()
    return ChatCompletionResponse(**base, usage=gen.usage(), prompt_logprobs=_prompt_logprobs(choices[0], body),
                                  choices=[ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                                                      finish_reason=c.finish_reason,
                                                      logprobs=chat_logprobs(c.logprobs) if body.logprobs else None)
                                           for c in choices])


def _text(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else str(content or "")


@router.get("/models", response_model=ModelList, summary="The base model and every registered adapter")
async def list_models(request: Request) -> ModelList:
    cards = await asyncio.to_thread(request.app.state.engine.models)
    return ModelList(data=[ModelObject.from_card(c) for c in cards])


@router.get("/models/{model}", response_model=ModelObject, responses={404: {"description": "unknown model"}},
            summary="One model: the base model or an adapter, with its contract")
async def get_model(model: str, request: Request) -> ModelObject:
    cards = await asyncio.to_thread(request.app.state.engine.models)
    for card in cards:
        if card.id == model:
            return ModelObject.from_card(card)
    raise ApiError(404, f"The model '{model}' does not exist", code="model_not_found", param="model")
