"""vLLM's tokenizer routes, `POST /tokenize` and `POST /detokenize`, behind the API key like `/v1`.

`/tokenize` returns what a completion (`prompt`) or a chat completion (`messages`) would feed the
model; with `apply_template: true` the adapter contract's prompt template or system prompt is
applied first, exactly as the inference routes do by default.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.errors import ApiError
from server.api.schemas import ChatMessage
from server.engine.protocol import EngineAPI

MAX_DETOKENIZE_TOKENS = 1 << 20
router = APIRouter(tags=["tokenizer"], responses={400: {"description": "invalid field"},
                                                  401: {"description": "missing or wrong API key"},
                                                  404: {"description": "unknown model"},
                                                  503: {"description": "engine not ready; see Retry-After"}})


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="an adapter name or the base model's served name")
    prompt: str | None = Field(None, description="completions input (give this or messages)")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="chat input, rendered with the "
                                               "chat template")
    add_special_tokens: bool = Field(True, description="prompt only: let the tokenizer add BOS and the like")
    add_generation_prompt: bool = Field(True, description="messages only: end with the assistant turn's header")
    apply_template: bool = Field(False, description="extension: apply the adapter contract's prompt template "
                                 "or system prompt, as the inference routes do")
    return_token_strs: bool = Field(False, description="also return each token as a string")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = Field(None, description="each token as a string, with return_token_strs "
                                        "(null otherwise, as vLLM sends it)")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class DetokenizeResponse(BaseModel):
    prompt: str


def _engine(request: Request) -> EngineAPI:
    engine = request.app.state.engine
    if engine is None:
        raise ApiError(503, "the engine is not running yet", code="engine_not_ready", headers={"Retry-After": "5"})
    return engine


@router.post("/tokenize", response_model=TokenizeResponse,
             summary="Token ids of a prompt or of chat messages (vLLM's route)")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    engine = _engine(request)
    limit = request.app.state.settings.max_prompt_chars
    chars = len(body.prompt or "") + sum(len(m.as_template_message()["content"]) for m in body.messages or ())
    if chars > limit:
        raise ApiError(400, f"the input is {chars} characters long; the limit is {limit} (--max-prompt-chars)",
                       code="context_length_exceeded")
    messages = None if body.messages is None else tuple(m.as_template_message() for m in body.messages)
    tokens = await engine.tokenize(body.model, body.prompt, messages, body.add_special_tokens,
                                   body.add_generation_prompt, body.apply_template)
    strs = await engine.detokenize(body.model, tokens, as_strings=True) if body.return_token_strs else None
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=engine.max_context(), token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, summary="Text of token ids (vLLM's route)")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    engine = _engine(request)
    return DetokenizeResponse(prompt=await engine.detokenize(body.model, body.tokens))
