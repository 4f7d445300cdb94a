"""What the HTTP layer hands the engine and gets back: plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    seed: int | None = None         # same seed, same output, whatever else is in the batch
    stop: tuple[str, ...] = ()      # cut from the output, never sent
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None     # None = off; k = chosen token's logprob plus the top k
    ignore_eos: bool = False        # generate exactly max_tokens (benchmarks)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str                      # an adapter name or the base model's served name
    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    add_special_tokens: bool = True   # False for prompts rendered by the chat template


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """One streamed piece of a generation; the last one has `finish_reason` set."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None     # "stop" or "length" on the last delta
    prompt_tokens: int = 0
    completion_tokens: int = 0           # generated so far


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


class EngineError(Exception):
    """A request the engine cannot serve; `status` is the HTTP status the API maps it to."""

    status = 400
    code = "invalid_request"
    retry_after: int | None = None


class UnknownModelError(EngineError):
    status = 404
    code = "model_not_found"


class PromptTooLongError(EngineError):
    status = 400
    code = "context_length_exceeded"


class AdapterUnavailableError(EngineError):
    """The adapter is registered but failed to load (status `error`)."""

    status = 409
    code = "adapter_unavailable"


class QueueFullError(EngineError):
    status = 429
    code = "queue_full"
    retry_after = 1


class EngineNotReadyError(EngineError):
    status = 503
    code = "engine_not_ready"


class AdapterRejectedError(EngineError):
    """An adapter that fails validation; the message names the problem."""

    status = 400
    code = "invalid_adapter"


class AdapterExistsError(EngineError):
    status = 409
    code = "adapter_exists"


@dataclass(frozen=True)
class AdapterInfo:
    """What `GET /v1/adapters/{name}` shows of one adapter."""

    name: str
    version: int
    status: str                  # "loading", "ready" or "error"
    error: str | None
    tier: str                    # "device", "cpu" or "disk"
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    created: int
    requests: int = 0
    tokens: int = 0
    loads: int = 0               # times written into a device slot
    load_seconds: float = 0.0    # duration of the last such write
