"""Request and response bodies of the OpenAI-compatible routes.

Unknown fields are rejected (400), as OpenAI does. Fields OpenAI defines but this server
does not implement are accepted only at their neutral value, and refused otherwise with
a message that names them, so a request never silently means something else.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from server.adapters.contract import ResponseFormatSpec

MAX_CHOICES = 16                 # n x prompts of one request
MAX_STOP = 4
MAX_PROMPT_LOGPROBS = 20         # vLLM's default ceiling
MAX_LOGIT_BIAS = 100.0
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="an adapter name or the base model's served name")
    max_tokens: int | None = Field(None, ge=0, description="tokens to generate at most (0 only to score the "
                                   "prompt: with echo or prompt_logprobs)")
    max_completion_tokens: int | None = Field(None, ge=0, description="same as max_tokens; wins when both are given")
    min_tokens: int = Field(0, ge=0, description="vLLM extension: end-of-sequence is forbidden before this many "
                            "tokens")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_PROMPT_LOGPROBS, description="vLLM extension: each "
                                        "prompt token's logprob, rank and decoded text, plus the top k")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="extension: keep the k most likely tokens; 0 or -1 = off")
    ignore_eos: bool = Field(False, description="extension: generate exactly max_tokens, past end-of-sequence")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="choice i uses seed + i")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings, cut from the output")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100], added to "
                                                "the token's logit before sampling")
    response_format: ResponseFormatSpec | None = Field(
        None, description='structured output: {"type": "json_object"} or {"type": "json_schema", "json_schema": '
        '{"name", "schema", "strict"}}, enforced while sampling; {"type": "text"} turns off an adapter\'s bound schema')
    apply_template: bool = Field(True, description="extension: apply the adapter contract's prompt template "
                                 "(completions) or system prompt (chat)")

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit() or not key.isascii():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias for token {key} is {bias}; it must lie in [-100, 100]")
        return value

    def token_count_error(self) -> tuple[str, str] | None:
        """(param, message) when max_tokens and min_tokens do not fit together; None when they do."""
        max_tokens = self.requested_max_tokens()
        if max_tokens == 0 and not self.scores_prompt():
            return "max_tokens", "max_tokens may be 0 only to score the prompt (with echo or prompt_logprobs)"
        if max_tokens is not None and self.min_tokens > max_tokens:
            return "min_tokens", f"min_tokens ({self.min_tokens}) is larger than max_tokens ({max_tokens})"
        return None

    def scores_prompt(self) -> bool:
        """Whether the response carries the prompt's logprobs (so max_tokens 0 makes sense)."""
        return self.prompt_logprobs is not None

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


PromptInput = str | list[int]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a prompt or a list of prompts, each a string or a list of token ids (fed as is); choices are "
        "grouped per prompt")
    logprobs: int | None = Field(None, ge=0, le=5, description="log probabilities of the chosen token plus the "
                                 "top k")
    echo: bool = Field(False, description="the prompt is sent back before the completion (with logprobs: the "
                       "prompt tokens' logprobs too, the first null)")
    suffix: str | None = Field(None, description="not supported: only null is accepted")
    best_of: int | None = Field(None, ge=1, description="only null or equal to n is accepted")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list) -> str | list:
        if isinstance(value, list) and not value:
            raise ValueError("at least one prompt is needed")
        if isinstance(value, list) and any(isinstance(p, list) and not p for p in value):
            raise ValueError("a prompt of token ids needs at least one token")
        return value

    def scores_prompt(self) -> bool:
        return self.prompt_logprobs is not None or self.echo

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported by this server (leave it unset or equal to n)")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n must be at most {MAX_CHOICES}")
        return self

    def prompts(self) -> list[PromptInput]:
        """Each prompt: a string, or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(cast(list[PromptInput], self.prompt))

    def engine_prompt_logprobs(self) -> int | None:
        """How many alternatives the engine computes per prompt token: for prompt_logprobs, and for echo with
        logprobs (the larger of the two; each field is cut to its own size)."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="text, or a list of text parts (other part types are refused)")
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = Field(None, description="not supported: only null or [] is accepted")
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available on streamed chat completions")
        return self

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptTokenLogprob(BaseModel):
    """vLLM's entry of one token in `prompt_logprobs` (keyed by token id)."""

    logprob: float
    rank: int | None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


class WithPromptLogprobs(BaseModel):
    """A body whose `prompt_logprobs` (vLLM's extension) is left out unless the request asked for it."""

    @model_serializer(mode="wrap")
    def _drop_unasked(self, handler):
        data = handler(self)
        if data.get("prompt_logprobs", 0) is None:
            del data["prompt_logprobs"]
        return data


class CompletionChoice(WithPromptLogprobs):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    prompt_logprobs: PromptLogprobs | None = Field(None, description="vLLM extension, with prompt_logprobs: one "
                                                   "entry per prompt token (the first null)")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(WithPromptLogprobs):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = Field(None, description="vLLM extension, with prompt_logprobs: one "
                                                   "entry per token of the rendered prompt (the first null)")


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraplex"
    root: str | None = Field(None, description="where it was loaded from: the base model's folder (or name), "
                             "an adapter's folder in the store")
    parent: str | None = None
    sha256: str | None = Field(None, description="SHA-256 identity of the adapter's current weights and config "
                               "(None for the base model); `model: \"name@<prefix>\"` pins it")
    version: int | None = Field(None, description="the adapter's version (bumped by every overwrite)")
    contract: dict[str, Any] | None = Field(None, description="the adapter's loraplex.json: prompt template, "
                                            "system prompt, sampling defaults, response_format, examples")

    @classmethod
    def from_card(cls, card: Any) -> ModelObject:
        return cls(id=card.id, created=card.created, parent=card.parent, root=getattr(card, "root", None),
                   sha256=getattr(card, "sha256", None),
                   version=getattr(card, "version", None), contract=getattr(card, "contract", None))


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
