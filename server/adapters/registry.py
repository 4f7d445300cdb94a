"""The adapter registry: names, versions and parsed weights of every servable adapter."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.adapters.layout import BaseLayout
from server.adapters.peft_format import AdapterFormatError, ParsedAdapter, load_peft_adapter

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class AdapterRecord:
    name: str
    folder: Path
    adapter: ParsedAdapter
    version: int = 1
    created: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, int]:
        """Identity of this exact version, used for device slots."""
        return (self.name, self.version)


class AdapterRegistry:
    """Thread-safe map from adapter name to its current validated version."""

    def __init__(self, layout: BaseLayout, max_rank: int, reserved_names: frozenset[str] = frozenset()) -> None:
        self.layout = layout
        self.max_rank = max_rank
        self.reserved_names = reserved_names
        self._records: dict[str, AdapterRecord] = {}
        self._lock = threading.Lock()

    def register(self, name: str, folder: Path) -> AdapterRecord:
        """Validate the PEFT folder and register it; raises AdapterFormatError, registering nothing."""
        if not ADAPTER_NAME.fullmatch(name) or name in (".", ".."):
            raise AdapterFormatError(f"invalid adapter name {name!r}: use 1-64 characters of [A-Za-z0-9._-]")
        if name in self.reserved_names:
            raise AdapterFormatError(f"adapter name {name!r} is reserved for the base model")
        adapter = load_peft_adapter(folder, self.layout, self.max_rank)
        with self._lock:
            previous = self._records.get(name)
            version = previous.version + 1 if previous else 1
            record = AdapterRecord(name=name, folder=folder, adapter=adapter, version=version)
            self._records[name] = record
        return record

    def scan(self, store: Path) -> dict[str, str]:
        """Register every adapter folder in `store`; returns the rejected ones with their errors."""
        rejected: dict[str, str] = {}
        if not store.is_dir():
            log.warning("adapter store %s does not exist; no adapters registered", store)
            return rejected
        for folder in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                record = self.register(folder.name, folder)
                log.info("registered adapter %s (rank %d, %d modules)", record.name,
                         record.adapter.rank, len(record.adapter.modules))
            except AdapterFormatError as exc:
                rejected[folder.name] = str(exc)
                log.error("adapter %s rejected: %s", folder.name, exc)
        return rejected

    def get(self, name: str) -> AdapterRecord | None:
        with self._lock:
            return self._records.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._records)
