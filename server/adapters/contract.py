"""`loraplex.json`: the contract an adapter folder carries beside its PEFT files.

A task adapter knows its own prompt format, stop strings, sampling settings and output
schema; with the contract a client names the task and sends only its input. Every field is
optional; unknown keys are refused by name. The file is untrusted (uploads): every failure is
a `ContractError` whose message names the field. No torch here: the API validates PATCH
bodies with the same model.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

INPUT_PLACEHOLDER = "{input}"
MAX_CONTRACT_BYTES = 256 * 1024
MAX_STOP = 4
MAX_EXAMPLES = 16


class ContractError(ValueError):
    """A `loraplex.json` that cannot be served; the message names the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingDefaults(_Strict):
    """Used for every request field the client does not send."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = Field(None, max_length=MAX_STOP)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class JsonSchemaSpec(_Strict):
    """OpenAI's `response_format.json_schema`."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormatSpec(_Strict):
    """OpenAI's `response_format`: text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormatSpec:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object: {\"name\", \"schema\", \"strict\"}")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is only allowed with type json_schema, not {self.type}")
        return self


class AdapterContract(_Strict):
    description: str | None = Field(None, max_length=2000)
    prompt_template: str | None = Field(None, max_length=16_384,
                                        description="completions: the prompt sent is this with {input} replaced")
    system_prompt: str | None = Field(None, max_length=16_384,
                                      description="chat: a system message put first unless the request has one")
    defaults: SamplingDefaults | None = None
    response_format: ResponseFormatSpec | None = None
    examples: list[str] | None = Field(None, max_length=MAX_EXAMPLES, description="example inputs")

    @field_validator("prompt_template")
    @classmethod
    def _placeholder(cls, value: str | None) -> str | None:
        if value is not None and value.count(INPUT_PLACEHOLDER) != 1:
            raise ValueError(f"prompt_template must hold the placeholder {INPUT_PLACEHOLDER} exactly once")
        return value

    def render_prompt(self, text: str) -> str:
        """The prompt with the template applied (the input is inserted verbatim, braces and all)."""
        if self.prompt_template is None:
            return text
        head, _, tail = self.prompt_template.partition(INPUT_PLACEHOLDER)
        return head + text + tail

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_bytes(self) -> bytes:
        return (json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n").encode()


def describe(error: ValidationError) -> str:
    """One sentence per problem, naming the field (unknown keys by name)."""
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ())) or "(top level)"
        if item.get("type") == "extra_forbidden":
            problems.append(f"unknown key '{where}'")
        else:
            problems.append(f"{where}: {str(item.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return "; ".join(problems)


def parse_contract_obj(value: Any) -> AdapterContract:
    if not isinstance(value, dict):
        raise ContractError("loraplex.json must hold a JSON object")
    try:
        return AdapterContract.model_validate(value)
    except ValidationError as exc:
        raise ContractError(f"loraplex.json: {describe(exc)}") from None


def parse_contract(data: bytes) -> AdapterContract:
    if len(data) > MAX_CONTRACT_BYTES:
        raise ContractError(f"loraplex.json is larger than {MAX_CONTRACT_BYTES} bytes")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ContractError(f"loraplex.json is not valid JSON: {exc}") from None
    return parse_contract_obj(value)


def patched(current: AdapterContract | None, patch: dict[str, Any]) -> AdapterContract:
    """JSON merge patch (RFC 7396) of the current contract: objects merge, null removes a key."""
    return parse_contract_obj(_merge(current.as_dict() if current else {}, patch))


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif key == "schema":  # a JSON schema is replaced whole, never merged into the old one
            merged[key] = value
        else:
            merged[key] = _merge(merged.get(key), value)
    return merged
