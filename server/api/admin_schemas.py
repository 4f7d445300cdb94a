"""Bodies of the adapter admin routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class AdapterObject(BaseModel):
    id: str = Field(description="the adapter's name, usable as `model` in inference requests")
    object: Literal["adapter"] = "adapter"
    parent: str = Field(description="the base model")
    version: int = Field(description="bumped by every overwrite; requests in flight finish on their version")
    sha256: str | None = Field(None, description="SHA-256 identity of the current version's config and weights")
    generation: int | None = Field(None, description="registry generation of this version: never reused, "
                                   "even across deletes and restarts")
    status: str = Field(description="loading, ready or error")
    error: str | None = Field(None, description="why the adapter is in status error")
    tier: str = Field(description="where its weights are now: device, cpu or disk")
    rank: int
    alpha: float
    target_modules: list[str] = Field(description="the kinds of module it adapts (q_proj, v_proj, ...)")
    num_modules: int = Field(description="how many modules of the base it adapts (e.g. 30 layers x 2 kinds = 60)")
    size_bytes: int
    created: int = Field(description="Unix time the current version was registered")
    requests: int = Field(0, description="requests served")
    tokens: int = Field(0, description="tokens generated")
    contract: dict[str, Any] | None = Field(None, description="the version's loraplex.json (prompt template, "
                                            "system prompt, sampling defaults, response_format, examples)")

    @classmethod
    def from_info(cls, info: Any, parent: str) -> AdapterObject:
        return cls(id=info.name, parent=parent, version=info.version, sha256=getattr(info, "sha256", None),
                   generation=getattr(info, "generation", None), status=info.status, error=info.error,
                   tier=info.tier, rank=info.rank, alpha=info.alpha,
                   target_modules=sorted({m.rsplit(".", 1)[-1] for m in info.target_modules}),
                   num_modules=len(info.target_modules),
                   size_bytes=info.size_bytes, created=info.created, requests=info.requests, tokens=info.tokens,
                   contract=getattr(info, "contract", None))


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterObject]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


class LoadLoraRequest(BaseModel):
    """vLLM's body for `/v1/load_lora_adapter`."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str = Field(description="an adapter folder under --allowed-adapter-root (absolute or relative to it)")
    load_inplace: bool = Field(False, description="replace an adapter of the same name (a new version)")


class UnloadLoraRequest(BaseModel):
    """vLLM's body for `/v1/unload_lora_adapter`."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_int_id: int | None = Field(None, description="accepted for vLLM compatibility and ignored")


UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$",
                         "description": "the adapter's name (not starting with '.', not the base model's name)"},
                "overwrite": {"type": "boolean", "default": False,
                              "description": "replace an existing adapter (a new version)"},
                "adapter_config.json": {"type": "string", "format": "binary", "description": "PEFT config"},
                "adapter_model.safetensors": {"type": "string", "format": "binary",
                                              "description": "PEFT weights (safetensors only; pickle is refused)"},
                "loraplex.json": {"type": "string", "format": "binary",
                                  "description": "optional: the adapter's contract (template, defaults, schema)"},
                "archive": {"type": "string", "format": "binary",
                            "description": "instead of the files: a .zip, .tar or .tar.gz holding them"},
            },
        }}},
    },
}
