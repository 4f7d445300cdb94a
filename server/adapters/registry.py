"""The adapter registry: names and their versions, each with its identity and status.

Every name maps to its current version; a request holds on to the version it started with, so
replacing or deleting an adapter never changes a generation in flight. The registry owns three
collaborators, each keyed by identity and knowing no names: the CPU tier of parsed weights
(`cpu_tier.py`), the background loader (`loader.py`) and the persisted counters (`state.py`); a
store shared with other servers is taken in by `store_sync.py` under the store's lock. Device slots
are the engine's (`slots.py`, owned by the adapter manager).

Locking (the order of every lock here is in `locks.py`): `_lock` guards only in-memory maps and is
never held across disk I/O, so the engine's admission, `submit` and stats never wait on a store
write, fsync or rmtree. Work on one name (add, overwrite, delete) is serialised by that name's lock,
taken inside the store's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from server.adapters.contract import AdapterContract, ContractError, parse_contract
from server.adapters.cpu_tier import CpuTier
from server.adapters.folder import read, read_folder
from server.adapters.identity import AdapterKey, adapter_sha256, file_sha256
from server.adapters.layout import BaseLayout
from server.adapters.loader import AdapterLoader
from server.adapters.locks import NAME, REGISTRY, STORE, Lock, held, ordered_lock
from server.adapters.names import CONFIG_FILE, WEIGHTS_FILE, AdapterNameError, check_adapter_name
from server.adapters.peft_format import AdapterFormatError, ParsedAdapter, load_peft_adapter, parse_peft_adapter
from server.adapters.records import ERROR, LOADING, READY, AdapterExists, AdapterProtected, AdapterRecord
from server.adapters.state import RegistryState
from server.adapters.store import AdapterStore
from server.adapters.store_sync import sync_registry

log = logging.getLogger(__name__)

__all__ = ["ERROR", "LOADING", "READY", "AdapterExists", "AdapterKey", "AdapterNameError", "AdapterProtected",
           "AdapterRecord", "AdapterRegistry"]


class AdapterRegistry:
    """Thread-safe: the API registers and deletes, the engine thread reads and loads."""

    def __init__(self, store: AdapterStore, layout: BaseLayout, max_rank: int, max_cpu_loras: int,
                 reserved_names: frozenset[str] = frozenset(), max_bytes: int = 1 << 40,
                 max_cpu_bytes: int = 1 << 62, protect_found: bool = False, max_saved_bytes: int = 1 << 62, *,
                 on_retired: Callable[[AdapterRecord], None] | None = None) -> None:
        """`protect_found`: folders found in the store that the server did not write (the shipped adapters,
        when the store is the checkout's default `adapters/`) are never deleted or replaced. `on_retired` is
        called (outside every lock) with each version that stops being current: replaced or deleted."""
        self.store = store
        self.protect_found = protect_found
        self.layout = layout
        self.max_rank = max_rank
        self.reserved_names = reserved_names
        self.max_bytes = max_bytes
        self.max_saved_bytes = max_saved_bytes  # modules_to_save copies of one adapter, as saved
        self.state = RegistryState(store.root, shared=store.shared)
        self.tier = CpuTier(max_count=max_cpu_loras, max_bytes=max_cpu_bytes)
        self.loader = AdapterLoader(parse=self._parse, settle=self._settle)
        self._on_retired = on_retired or (lambda record: None)
        self._records: dict[str, AdapterRecord] = {}
        self._lock = ordered_lock(REGISTRY, reentrant=True)
        self._name_locks: dict[str, Lock] = {}

    # Registration -----------------------------------------------------------------------------

    def check_name(self, name: str) -> None:
        """Raises `AdapterNameError` (a ValueError) for a name the registry refuses."""
        check_adapter_name(name, self.reserved_names)

    def register_folder(self, name: str, folder: Path, overwrite: bool = False) -> AdapterRecord:
        """Validate a store folder in place and register it (start-up); keeps a known identity."""
        self.check_name(name)
        with self._store_lock(), self._name_lock(name):
            return self._register_folder(name, folder, overwrite)

    def _register_folder(self, name: str, folder: Path, overwrite: bool) -> AdapterRecord:
        self._check_free(name, overwrite)
        found = read_folder(folder, self._load_folder)
        issued = self.state.known(name, found.sha256) or self.state.issue(name, found.sha256)
        return self._insert(name, folder, found.adapter, found.sha256, issued.generation, issued.version,
                            found.contract)

    def add_file(self, name: str, config_bytes: bytes, weights_path: Path, overwrite: bool = False,
                 contract_bytes: bytes | None = None) -> AdapterRecord:
        """Register an upload whose weights are a file (the caller's private copy, unchanged until this
        returns): hashed in chunks and memory-mapped, never read whole into memory; copied into the store."""
        self.check_name(name)
        self._check_free(name, overwrite)
        self.check_writable(name)
        contract = None if contract_bytes is None else parse_contract(contract_bytes)
        weights_path = Path(weights_path)
        sha = file_sha256(config_bytes, weights_path, self.max_bytes, contract_bytes=contract_bytes)
        return self._add(name, config_bytes, weights_path, sha, overwrite, contract_bytes, contract)

    def add(self, name: str, config_bytes: bytes, weights_bytes: bytes, overwrite: bool = False,
            contract_bytes: bytes | None = None) -> AdapterRecord:
        """Validate uploaded bytes in full, then write them to the store atomically and register."""
        self.check_name(name)
        self._check_free(name, overwrite)
        self.check_writable(name)
        contract = None if contract_bytes is None else parse_contract(contract_bytes)
        sha = adapter_sha256(config_bytes, weights_bytes, contract_bytes)
        return self._add(name, config_bytes, weights_bytes, sha, overwrite, contract_bytes, contract)

    def _add(self, name: str, config: bytes, weights: bytes | Path, sha: str, overwrite: bool,
             contract_bytes: bytes | None = None, contract: AdapterContract | None = None) -> AdapterRecord:
        adapter = self._parse(config, weights)
        # One writer per name (per store when shared); the registry lock is free meanwhile.
        with self._store_write(), self._name_lock(name):
            self._check_free(name, overwrite)
            self.check_writable(name)
            issued = self.state.issue(name, sha, written=True)
            folder = self.store.write(name, config, weights, contract_bytes)
            return self._insert(name, folder, adapter, sha, issued.generation, issued.version, contract)

    def replace_contract(self, name: str, contract: AdapterContract | None) -> AdapterRecord | None:
        """A new version of `name` with the same config and weights and this contract (None: none); None if
        `name` is not registered. The weights are copied from the current folder under the name's lock."""
        with self._store_write(), self._name_lock(name):
            current = self.get(name)
            if current is None:
                return None
            self.check_writable(name)
            config, weights = read(current.folder / CONFIG_FILE), current.folder / WEIGHTS_FILE
            contract_bytes = None if contract is None else contract.to_bytes()
            sha = file_sha256(config, weights, self.max_bytes, contract_bytes=contract_bytes)
            adapter = self.cached(current) or self._parse(config, weights)
            issued = self.state.issue(name, sha, written=True)
            folder = self.store.write(name, config, weights, contract_bytes)
            return self._insert(name, folder, adapter, sha, issued.generation, issued.version, contract)

    def scan(self) -> dict[str, str]:
        """Recover the store, then register every adapter folder; returns the rejected ones with errors."""
        with self._store_lock():  # a shared store: never while another server writes
            self.store.recover()
        rejected: dict[str, str] = {}
        root = self.store.root
        if not root.is_dir():
            log.warning("adapter store %s does not exist; no adapters registered", root)
            return rejected
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if self.state.unloaded(folder.name):
                log.info("adapter %s is unloaded (its files stay in %s); POST /v1/load_lora_adapter with "
                         "lora_path %s registers it again", folder.name, folder, folder)
                continue
            try:
                record = self.register_folder(folder.name, folder)
                log.info("registered adapter %s v%d (generation %d, sha256 %s, rank %d, %d modules)", record.name,
                         record.version, record.generation, record.sha256[:12], record.rank,
                         len(record.target_modules))
            except (AdapterFormatError, ContractError, AdapterExists, AdapterNameError) as exc:
                rejected[folder.name] = str(exc)
                log.error("adapter %s rejected: %s", folder.name, exc)
        return rejected

    def remove(self, name: str) -> AdapterRecord | None:
        """Unregister `name` at once, then delete it from the store; running requests keep their copy."""
        with self._store_write(), self._name_lock(name):
            if self.get(name) is not None:
                self.check_writable(name)
            record = self._unregister(name)
            if record is not None:
                self.store.remove(name)
                self.state.forget(name)
            return record

    def unload(self, name: str) -> AdapterRecord | None:
        """Unregister `name` at once and keep its files; persisted, so a restart does not register it again."""
        with self._store_lock(), self._name_lock(name):
            record = self._unregister(name)
            if record is not None:
                self.state.mark_unloaded(name)
            return record

    def reload(self, name: str) -> AdapterRecord:
        """Register again, from its own store folder, an adapter that was unloaded (or is not registered)."""
        self.check_name(name)
        folder = self.store.folder(name)
        if not folder.is_dir():
            raise AdapterFormatError(f"the store has no folder {name!r}")
        with self._store_lock(), self._name_lock(name):
            return self._register_folder(name, folder, overwrite=False)

    def is_protected(self, name: str) -> bool:
        """A store folder the server may not delete or replace (see `protect_found`)."""
        return (self.protect_found and self.store.folder(name).exists() and not self.state.written(name))

    def check_writable(self, name: str) -> None:
        if self.is_protected(name):
            raise AdapterProtected(
                f"adapter {name!r} ships in {self.store.root}/ and is read-only while the adapter store is that "
                "default folder: upload it under another name, unload it with /v1/unload_lora_adapter (its files "
                "stay), or start the server with --adapters-dir (LORAPLEX_ADAPTERS_DIR) set to a store of your own")

    # What another server wrote to a shared store (store_sync.py, under the store's lock) -------------

    def adopt(self, name: str, generation: int, version: int, sha256: str | None) -> AdapterRecord:
        """Register `name`'s store folder under the identity the shared store's state gives it."""
        self.check_name(name)
        folder = self.store.folder(name)
        found = read_folder(folder, self._load_folder)
        if found.sha256 != sha256:
            raise AdapterFormatError(f"the folder's sha256 {found.sha256[:12]} is not the {str(sha256)[:12]} "
                                     "the store's state names (a write that never finished)")
        with self._name_lock(name):
            return self._insert(name, folder, found.adapter, found.sha256, generation, version, found.contract)

    def drop(self, name: str) -> AdapterRecord | None:
        """Unregister a name another server deleted (the store has no folder for it any more)."""
        with self._name_lock(name):
            return self._unregister(name)

    # Lookup, the CPU tier and loads -------------------------------------------------------------

    def get(self, name: str) -> AdapterRecord | None:
        with self._lock:
            return self._records.get(name)

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            return [self._records[n] for n in sorted(self._records)]

    def cached(self, record: AdapterRecord) -> ParsedAdapter | None:
        return self.tier.get(record.key)

    def cached_derived(self, key: Hashable) -> ParsedAdapter | None:
        """A derived adapter (a composition) in the CPU tier, or None."""
        return self.tier.get(key)

    def cache_derived(self, key: Hashable, parts: list[AdapterRecord], adapter: ParsedAdapter) -> bool:
        """Keep a derived adapter in the CPU tier (LRU like any adapter) while all its parts are current;
        it leaves the tier with the first part that is replaced or deleted. False if one already is."""
        with self._lock:
            if any(self._records.get(p.name) is not p for p in parts):
                return False
            self.tier.put(key, adapter, parts=[p.key for p in parts])
            return True

    def in_cpu(self, record: AdapterRecord) -> bool:
        return self.tier.holds(record.key)

    def cpu_keys(self) -> list[Hashable]:
        return self.tier.keys()

    def cpu_bytes(self) -> int:
        """Bytes of parsed adapters held in the CPU tier now."""
        return self.tier.bytes

    def request_load(self, record: AdapterRecord) -> None:
        """Parse the adapter from disk into the CPU tier in the background (no-op if cached or loading)."""
        with self._lock:
            if self.tier.holds(record.key) or record.status == LOADING or record.deleted:
                return
            record.status, record.error = LOADING, None
        self.loader.submit(record)

    def close(self) -> None:
        self.loader.close()

    # Internals --------------------------------------------------------------------------------

    def _settle(self, record: AdapterRecord, adapter: ParsedAdapter | None, error: str | None) -> None:
        """A background load's end: cached only if the version is still current."""
        with self._lock:
            if error is not None:
                record.status, record.error = ERROR, error
                return
            record.status = READY
            if adapter is None:
                return
            if record.deleted or self._records.get(record.name) is not record:
                log.info("discarded a load of %s v%d: no longer current", record.name, record.version)
                return
            self.tier.put(record.key, adapter)

    def _parse(self, config: bytes, weights: bytes | Path) -> ParsedAdapter:
        return self._within_budget(parse_peft_adapter(config, weights, self.layout, self.max_rank))

    def _load_folder(self, folder: Path) -> ParsedAdapter:
        return self._within_budget(load_peft_adapter(folder, self.layout, self.max_rank))

    def _within_budget(self, adapter: ParsedAdapter) -> ParsedAdapter:
        """The adapter, unless its fully trained copies alone exceed what the device slots may hold."""
        if adapter.saved_bytes > self.max_saved_bytes:
            raise AdapterFormatError(
                f"the adapter's fully trained module copies (modules_to_save: {', '.join(sorted(adapter.saved))}) "
                f"take {adapter.saved_bytes} bytes, more than this server's --max-saved-module-bytes of "
                f"{self.max_saved_bytes}; raise that limit, or save the adapter with LoRA on those modules instead")
        return adapter

    def _check_free(self, name: str, overwrite: bool) -> None:
        if not overwrite and self.get(name) is not None:
            raise AdapterExists(f"adapter {name!r} already exists; pass overwrite=true to replace it")

    def _store_lock(self) -> AbstractContextManager:
        return held(STORE, self.store.exclusive())

    @contextmanager
    def _store_write(self) -> Iterator[None]:
        """The store's lock for a write; a shared store's changes by other servers are taken in first."""
        with self._store_lock():
            if self.store.shared:
                sync_registry(self)
            yield

    def _name_lock(self, name: str) -> Lock:
        with self._lock:
            lock = self._name_locks.get(name)
            if lock is None:
                lock = self._name_locks[name] = ordered_lock(NAME, reentrant=True)
            return lock

    def _insert(self, name: str, folder: Path, adapter: ParsedAdapter, sha: str, generation: int,
                version: int, contract: AdapterContract | None = None) -> AdapterRecord:
        record = AdapterRecord(name=name, version=version, generation=generation, sha256=sha, folder=folder,
                               rank=adapter.rank, alpha=adapter.alpha, target_modules=adapter.target_modules,
                               size_bytes=adapter.size_bytes, contract=contract, kinds=adapter.kinds())
        with self._lock:
            previous = self._records.get(name)
            if previous is not None:
                previous.deleted = True  # superseded: its slot is freed once its last request ends
                self.tier.drop(previous.key)
            self._records[name] = record
            self.tier.put(record.key, adapter)
        if previous is not None:
            self._on_retired(previous)
        return record

    def _unregister(self, name: str) -> AdapterRecord | None:
        with self._lock:
            record = self._records.pop(name, None)
            if record is None:
                return None
            record.deleted = True
            self.tier.drop(record.key)
        self._on_retired(record)
        return record
