"""One validated Settings object, from `LORAPLEX_*` environment variables and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loraplex"


class Settings(BaseSettings):
    """Every knob of the server. CLI flags override environment variables."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str | None = Field(None, description="local transformers causal-LM folder; None = embedded default")
    served_model_name: str | None = Field(None, description="name of the base model in the API")
    cache_dir: Path = DEFAULT_CACHE_DIR
    adapters_dir: Path = Path("adapters")
    max_loras: int = Field(8, ge=1, le=1024, description="adapter slots on the device")
    max_lora_rank: int = Field(16, ge=1, le=1024)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_cpu_loras: int = Field(32, ge=1, description="parsed adapters kept in CPU memory (LRU)")
    kv_cache_tokens: int = Field(16384, ge=16, description="KV cache size in tokens, allocated once")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block")
    max_batched_tokens: int = Field(512, ge=1, description="tokens per engine step (prefill chunk budget)")
    max_running: int = Field(64, ge=1, description="sequences decoding at once")
    max_queue: int = Field(256, ge=0, description="waiting requests beyond which new ones get 429")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith("cuda"):
            raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value
