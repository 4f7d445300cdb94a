"""What the HTTP layer hands the engine and gets back: plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OutputFormat:
    """Structured output a sequence must follow: any JSON object, or one JSON schema (as JSON text)."""

    kind: str                       # "json_object" or "json_schema"
    schema_json: str | None = None  # the schema, for "json_schema"
    name: str | None = None


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
    min_tokens: int = 0             # end-of-sequence tokens are forbidden before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias) added to the logits before sampling
    prompt_logprobs: int | None = None   # None = off; k = each prompt token's logprob plus the top k
    echo: bool = False              # the first delta carries the prompt's text
    response_format: OutputFormat | None = None   # None = free text
    # Fields the client set itself: an adapter contract's defaults fill in the others.
    # None = every field counts as set (callers that know nothing of contracts).
    given: frozenset[str] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str                      # an adapter name, "name@<sha256 prefix>", or the base model's served name
    prompt: str | None = None       # exactly one of prompt / messages
    params: SamplingParams = field(default_factory=SamplingParams)
    add_special_tokens: bool = True   # ignored with `messages` (the rendered template has its own)
    n: int = 1                      # choices of this prompt; choice j is seeded seed + j
    messages: tuple[dict, ...] | None = None   # chat messages: the engine renders the chat template
    apply_template: bool = True     # the adapter contract's prompt template / system prompt, if it has one
    prompt_ids: tuple[int, ...] | None = None   # a prompt given as token ids, fed as is (instead of prompt)


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float | None           # None only for a prompt's first token: nothing predicts it
    top: tuple[tuple[str, float], ...] = ()   # the most likely tokens, most likely first
    token_id: int = -1
    rank: int = 0                   # 1 = the most likely token (0: not computed)
    top_ids: tuple[int, ...] = ()   # the token ids of `top`


@dataclass(frozen=True)
class Delta:
    """One streamed piece of a generation; the last one has `finish_reason` set."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None     # "stop" or "length" on the last delta
    prompt_tokens: int = 0
    completion_tokens: int = 0           # generated so far
    # First delta only, when asked for: the prompt's text (echo) and its tokens' logprobs, one per prompt token
    # (the first's `logprob` None: nothing predicts it).
    prompt_text: str | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


class EngineError(Exception):
    """A request the engine cannot serve. `code` names the failure; the API maps it to an HTTP status."""

    code = "invalid_request"
    retry_after: int | None = None


class InvalidRequestError(EngineError):
    code = "invalid_request"


class UnknownModelError(EngineError):
    code = "model_not_found"


class PromptTooLongError(EngineError):
    code = "context_length_exceeded"


class AdapterUnavailableError(EngineError):
    """The adapter is registered but failed to load (status `error`), or vanished before it started."""

    code = "adapter_unavailable"


class AdapterVersionMismatchError(EngineError):
    """`model` named `name@<sha256 prefix>` and the current version's sha256 differs."""

    code = "adapter_version_mismatch"


class EngineFaultError(EngineError):
    """The engine failed while computing a step (a fault of the server, not of the request)."""

    code = "internal_error"


class QueueFullError(EngineError):
    code = "queue_full"
    retry_after = 1


class EngineNotReadyError(EngineError):
    code = "engine_not_ready"


class ShuttingDownError(EngineError):
    code = "shutting_down"


class AdapterRejectedError(EngineError):
    """An adapter (or adapter name) that fails validation; the message names the problem."""

    code = "invalid_adapter"


class AdapterExistsError(EngineError):
    code = "adapter_exists"


class AdapterProtectedError(EngineError):
    """A shipped adapter in the default store: it is never deleted or replaced."""

    code = "adapter_protected"


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
    sha256: str = ""             # identity hash of the stored config + weights bytes
    generation: int = 0          # registry generation: unique per registered version, only grows
    contract: dict | None = None  # the version's loraplex.json, as JSON data
