"""What the registry holds per version: the record, its load status, and the registry's refusals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from server.adapters.contract import AdapterContract
from server.adapters.identity import AdapterKey

LOADING, READY, ERROR = "loading", "ready", "error"


class AdapterExists(Exception):
    """The name is taken and overwrite was not asked for."""


class AdapterProtected(Exception):
    """The name's folder is one the server did not write, in a store it was not told it may change."""


@dataclass(eq=False)
class AdapterRecord:
    name: str
    version: int
    generation: int
    sha256: str
    folder: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    status: str = READY
    error: str | None = None
    created: float = field(default_factory=time.time)
    deleted: bool = False
    requests: int = 0
    tokens: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    contract: AdapterContract | None = None   # the folder's loraplex.json, if any
    kinds: tuple[str, ...] = ()  # beyond plain LoRA: "dora", "saved:<module>", "tokens:<module>" (ParsedAdapter.kinds)

    @property
    def key(self) -> AdapterKey:
        """Identity of this exact version: device slots and the CPU tier are keyed by it."""
        return AdapterKey(self.generation, self.sha256)
