"""`EngineAPI`: what the HTTP layer may call on an engine, and the plain data it gets back (no torch).

The real engine (`engine.py`) and the API tests' fake (`tests/api/fake_engine.py`) both satisfy it,
checked by mypy; `server/api/` is typed against it, never against the engine class. Admin calls are
synchronous (the API runs them in worker threads); `submit`, `tokenize` and `detokenize` are async.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from server.engine.request import AdapterInfo, GenerationRequest
from server.engine.stream import RequestStream

if TYPE_CHECKING:  # torch-side modules: types only
    from server.engine.memory import MemoryUse
    from server.engine.pool_size import PoolStats


@dataclass(frozen=True)
class ModelCard:
    """One entry of `GET /v1/models`."""

    id: str
    created: int
    parent: str | None
    sha256: str | None = None    # None for the base model
    version: int | None = None   # None for the base model
    contract: dict | None = None  # the adapter's loraplex.json
    root: str | None = None      # where it was loaded from: the base model's folder, an adapter's store folder


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    adapters_on_device: int
    adapters_on_cpu: int
    prefill_tokens: int = 0
    kv_blocks_cached: int = 0          # blocks the prefix cache can find (held or free)
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    preemptions: int = 0               # sequences recomputed for want of KV blocks
    memory: MemoryUse | None = None
    adapter_pool: PoolStats | None = None


class EngineAPI(Protocol):
    @property
    def base_name(self) -> str: ...

    @property
    def ready(self) -> bool:
        """The model is loaded and the step loop runs."""

    # Requests
    async def submit(self, request: GenerationRequest) -> list[RequestStream]:
        """One stream per choice; raises `EngineError` subclasses (their codes map to HTTP statuses)."""

    async def tokenize(self, model: str, prompt: str | None = None, messages: tuple[dict, ...] | None = None,
                       add_special_tokens: bool = True, add_generation_prompt: bool = True,
                       apply_template: bool = False) -> list[int]: ...

    async def detokenize(self, model: str, tokens: list[int], as_strings: bool = False) -> str | list[str]: ...

    def models(self) -> list[ModelCard]: ...
    def max_context(self) -> int: ...
    def stats(self) -> EngineStats: ...

    # Lifecycle
    def num_active(self) -> int: ...
    def begin_shutdown(self) -> None: ...
    def stop(self) -> None: ...

    # Adapter admin (synchronous)
    def add_adapter(self, name: str, config_bytes: bytes, weights_path: Path, overwrite: bool = False,
                    contract_bytes: bytes | None = None) -> AdapterInfo: ...

    def patch_contract(self, name: str, patch: dict) -> AdapterInfo: ...
    def delete_adapter(self, name: str) -> None: ...
    def unload_adapter(self, name: str) -> None: ...
    def reload_adapter(self, name: str) -> AdapterInfo: ...
    def adapter_folder(self, name: str) -> Path: ...
    def adapter_info(self, name: str) -> AdapterInfo: ...
    def list_adapters(self) -> list[AdapterInfo]: ...
