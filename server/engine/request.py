"""What the HTTP layer hands the engine and gets back (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str                      # an adapter name or the base model's served name
    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str              # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class EngineError(Exception):
    """A request the engine cannot serve; `status` is the HTTP status the API maps it to."""

    status = 400
    code = "invalid_request"


class UnknownModelError(EngineError):
    status = 404
    code = "model_not_found"


class PromptTooLongError(EngineError):
    status = 400
    code = "context_length_exceeded"


class AdapterUnavailableError(EngineError):
    status = 409
    code = "adapter_unavailable"
