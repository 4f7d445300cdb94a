"""OpenAI-compatible inference routes: `model` names an adapter or the base model."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from server.api.schemas import (CompletionChoice, CompletionRequest, CompletionResponse, ModelList,
                                ModelObject, Usage)
from server.engine.request import GenerationRequest, SamplingParams

router = APIRouter(prefix="/v1")


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> CompletionResponse:
    engine = request.app.state.engine
    request_id = f"cmpl-{uuid.uuid4().hex}"
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                            seed=body.seed, stop=body.stop_list())
    result = await engine.generate(GenerationRequest(request_id, body.model, body.prompt_text(), params))
    usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                  total_tokens=result.prompt_tokens + result.completion_tokens)
    choice = CompletionChoice(index=0, text=result.text, finish_reason=result.finish_reason)
    return CompletionResponse(id=request_id, created=int(time.time()), model=body.model,
                              choices=[choice], usage=usage)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    cards = request.app.state.engine.models()
    return ModelList(data=[ModelObject(id=c.id, created=c.created, parent=c.parent) for c in cards])
