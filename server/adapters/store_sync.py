"""Store sync: one server's registry kept equal to a store that other servers write too (shared.py).

`StoreSync` checks per request: `stale()` costs one read of the store's generation file, `refresh()`
re-registers what changed. `sync_registry` is the sync itself, for a caller that holds the store's
lock (the registry's writers run it before they write, so a name taken on another server is seen).
"""

from __future__ import annotations

import logging
from typing import Protocol

from server.adapters.contract import ContractError
from server.adapters.locks import STORE, STORE_SYNC, held, ordered_lock
from server.adapters.names import AdapterNameError
from server.adapters.peft_format import AdapterFormatError
from server.adapters.records import AdapterRecord
from server.adapters.shared import SharedAdapterStore
from server.adapters.state import RegistryState

log = logging.getLogger(__name__)


class SyncedRegistry(Protocol):
    """What the sync needs of the registry."""

    state: RegistryState

    def records(self) -> list[AdapterRecord]: ...
    def get(self, name: str) -> AdapterRecord | None: ...
    def adopt(self, name: str, generation: int, version: int, sha256: str | None) -> AdapterRecord: ...
    def drop(self, name: str) -> AdapterRecord | None: ...


def sync_registry(registry: SyncedRegistry) -> None:
    """Register, replace and drop names so that they are the versions the store's state file holds now
    (versions and sha256 are the store's). The caller holds the store's lock."""
    _, entries = registry.state.entries()
    current = {name: entry for name, entry in entries.items() if entry.get("generation")}
    for name in [r.name for r in registry.records() if r.name not in current]:
        dropped = registry.drop(name)
        if dropped is not None:
            log.info("adapter %s v%d deleted from the shared store", name, dropped.version)
    for name, entry in sorted(current.items()):
        record = registry.get(name)
        if record is not None and record.generation == entry["generation"]:
            continue
        try:
            adopted = registry.adopt(name, int(entry["generation"]), int(entry["version"]), entry.get("sha256"))
        except (AdapterFormatError, ContractError, AdapterNameError) as exc:
            log.error("adapter %s in the shared store not registered: %s", name, exc)
            continue
        log.info("adapter %s v%d (generation %d) taken from the shared store", name, adopted.version,
                 adopted.generation)


class StoreSync:
    """Keeps one server's registry equal to a shared store, checked per request."""

    def __init__(self, *, store: SharedAdapterStore, registry: SyncedRegistry) -> None:
        self.store = store
        self.registry = registry
        self._seen: int | None = None
        self._lock = ordered_lock(STORE_SYNC)

    def stale(self) -> bool:
        return self.store.generation() != self._seen

    def refresh(self) -> None:
        with self._lock:  # one sync at a time; a second caller finds it done
            generation = self.store.generation()
            if generation == self._seen:
                return
            self._sync()
            self._seen = generation

    def _sync(self) -> None:
        with held(STORE, self.store.shared_lock()):
            sync_registry(self.registry)
