"""The adapter registry: names, versions, identities, status, and the CPU tier of parsed weights.

Tiers: device slots (see `slots.py`, owned by the adapter manager), an LRU of parsed adapters
in CPU memory (bounded by `max_cpu_loras` and `max_cpu_bytes`), and the disk store (everything registered). Every name maps
to its current version; a request holds on to the version it started with, so replacing or
deleting an adapter never changes a generation in flight.

Locking: `_lock` guards only in-memory maps and is never held across disk I/O, so the engine's
admission, `submit` and stats never wait on a store write, fsync or rmtree. Work on one name
(add, overwrite, delete) is serialised by that name's own lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

from server.adapters.contract import AdapterContract, ContractError, parse_contract
from server.adapters.identity import AdapterKey, adapter_sha256, file_sha256
from server.adapters.layout import BaseLayout
from server.adapters.names import CONFIG_FILE, CONTRACT_FILE, WEIGHTS_FILE, AdapterNameError, check_adapter_name
from server.adapters.peft_format import AdapterFormatError, ParsedAdapter, load_peft_adapter, parse_peft_adapter
from server.adapters.state import RegistryState
from server.adapters.store import AdapterStore
from server.threads import FreshThreadPool

log = logging.getLogger(__name__)

LOADING, READY, ERROR = "loading", "ready", "error"

__all__ = ["ERROR", "LOADING", "READY", "AdapterExists", "AdapterKey", "AdapterNameError", "AdapterProtected",
           "AdapterRecord", "AdapterRegistry"]


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


class AdapterRegistry:
    """Thread-safe: the API registers and deletes, the engine thread reads and loads."""

    def __init__(self, store: AdapterStore, layout: BaseLayout, max_rank: int, max_cpu_loras: int,
                 reserved_names: frozenset[str] = frozenset(), max_bytes: int = 1 << 40,
                 max_cpu_bytes: int = 1 << 62, protect_found: bool = False, max_saved_bytes: int = 1 << 62) -> None:
        """`protect_found`: folders found in the store that the server did not write (the shipped adapters,
        when the store is the checkout's default `adapters/`) are never deleted or replaced."""
        self.store = store
        self.protect_found = protect_found
        self.layout = layout
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self.max_cpu_bytes = max_cpu_bytes
        self.reserved_names = reserved_names
        self.max_bytes = max_bytes
        self.max_saved_bytes = max_saved_bytes  # modules_to_save copies of one adapter, as saved
        self.state = RegistryState(store.root, shared=store.shared)
        self._records: dict[str, AdapterRecord] = {}
        self._cpu: OrderedDict[Hashable, ParsedAdapter] = OrderedDict()  # AdapterKey, or a derived key
        self._derived: dict[Hashable, frozenset[AdapterKey]] = {}  # derived key (a composition) -> its parts
        self._cpu_bytes = 0  # sum of size_bytes over self._cpu
        self._lock = threading.RLock()
        self._name_locks: dict[str, threading.RLock] = {}
        self._loader = FreshThreadPool(max_workers=1, thread_name_prefix="adapter-loader")
        # Called (outside the lock) with every version that stops being current: replaced or deleted.
        self.on_retired: Callable[[AdapterRecord], None] = lambda record: None

    # Registration -----------------------------------------------------------------------------

    def check_name(self, name: str) -> None:
        """Raises `AdapterNameError` (a ValueError) for a name the registry refuses."""
        check_adapter_name(name, self.reserved_names)

    def register_folder(self, name: str, folder: Path, overwrite: bool = False) -> AdapterRecord:
        """Validate a store folder in place and register it (start-up); keeps a known identity."""
        self.check_name(name)
        with self.store.exclusive(), self._name_lock(name):
            return self._register_folder(name, folder, overwrite)

    def _register_folder(self, name: str, folder: Path, overwrite: bool) -> AdapterRecord:
        self._check_free(name, overwrite)
        contract_bytes = _read_contract(folder)
        contract = None if contract_bytes is None else parse_contract(contract_bytes)
        adapter = self._within_budget(load_peft_adapter(folder, self.layout, self.max_rank))
        sha = file_sha256(_read(folder / CONFIG_FILE), folder / WEIGHTS_FILE, contract_bytes=contract_bytes)
        issued = self.state.known(name, sha) or self.state.issue(name, sha)
        return self._insert(name, folder, adapter, sha, issued.generation, issued.version, contract)

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

    def replace_contract(self, name: str, contract: AdapterContract | None) -> AdapterRecord | None:
        """A new version of `name` with the same config and weights and this contract (None: none); None if
        `name` is not registered. The weights are copied from the current folder under the name's lock."""
        with self.store.exclusive(), self._name_lock(name):
            if self.store.shared:
                self._sync_unlocked()
            current = self.get(name)
            if current is None:
                return None
            self.check_writable(name)
            config, weights = _read(current.folder / CONFIG_FILE), current.folder / WEIGHTS_FILE
            contract_bytes = None if contract is None else contract.to_bytes()
            sha = file_sha256(config, weights, self.max_bytes, contract_bytes=contract_bytes)
            adapter = self.cached(current) or self._within_budget(parse_peft_adapter(config, weights, self.layout, self.max_rank))
            issued = self.state.issue(name, sha, written=True)
            folder = self.store.write(name, config, weights, contract_bytes)
            return self._insert(name, folder, adapter, sha, issued.generation, issued.version, contract)

    def scan(self) -> dict[str, str]:
        """Recover the store, then register every adapter folder; returns the rejected ones with errors."""
        with self.store.exclusive():  # a shared store: never while another server writes
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
        with self.store.exclusive(), self._name_lock(name):
            if self.store.shared:
                self._sync_unlocked()
            if self.get(name) is not None:
                self.check_writable(name)
            record = self._unregister(name)
            if record is not None:
                self.store.remove(name)
                self.state.forget(name)
            return record

    def unload(self, name: str) -> AdapterRecord | None:
        """Unregister `name` at once and keep its files; persisted, so a restart does not register it again."""
        with self.store.exclusive(), self._name_lock(name):
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
        with self.store.exclusive(), self._name_lock(name):
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

    def _unregister(self, name: str) -> AdapterRecord | None:
        with self._lock:
            record = self._records.pop(name, None)
            if record is None:
                return None
            record.deleted = True
            self._uncache(record.key)
        self.on_retired(record)
        return record

    # A store shared with other servers (shared.py) ------------------------------------------------

    def sync_from_store(self) -> None:
        """Register, replace and drop names so that they are the versions the shared store holds now."""
        with self.store.shared_lock():
            self._sync_unlocked()

    def _sync_unlocked(self) -> None:
        """`sync_from_store` for a caller that holds the store's lock. Versions and sha256 are the store's."""
        _, entries = self.state.entries()
        current = {name: entry for name, entry in entries.items() if entry.get("generation")}
        for record in self.records():
            if record.name not in current:
                self._drop(record.name)
        for name, entry in sorted(current.items()):
            record = self.get(name)
            if record is not None and record.generation == entry["generation"]:
                continue
            try:
                self._adopt(name, entry)
            except (AdapterFormatError, ContractError, AdapterNameError) as exc:
                log.error("adapter %s in the shared store not registered: %s", name, exc)

    def _adopt(self, name: str, entry: dict) -> AdapterRecord:
        self.check_name(name)
        folder = self.store.folder(name)
        contract_bytes = _read_contract(folder)
        contract = None if contract_bytes is None else parse_contract(contract_bytes)
        adapter = self._within_budget(load_peft_adapter(folder, self.layout, self.max_rank))
        sha = file_sha256(_read(folder / CONFIG_FILE), folder / WEIGHTS_FILE, contract_bytes=contract_bytes)
        if sha != entry.get("sha256"):
            raise AdapterFormatError(f"the folder's sha256 {sha[:12]} is not the {str(entry.get('sha256'))[:12]} "
                                     "the store's state names (a write that never finished)")
        with self._name_lock(name):
            record = self._insert(name, folder, adapter, sha, int(entry["generation"]), int(entry["version"]),
                                  contract)
        log.info("adapter %s v%d (generation %d) taken from the shared store", name, record.version,
                 record.generation)
        return record

    def _drop(self, name: str) -> None:
        """Unregister a name another server deleted (the store has no folder for it any more)."""
        with self._name_lock(name):
            with self._lock:
                record = self._records.pop(name, None)
                if record is None:
                    return
                record.deleted = True
                self._uncache(record.key)
        self.on_retired(record)
        log.info("adapter %s v%d deleted from the shared store", name, record.version)

    # Lookup and the CPU tier ------------------------------------------------------------------

    def get(self, name: str) -> AdapterRecord | None:
        with self._lock:
            return self._records.get(name)

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            return [self._records[n] for n in sorted(self._records)]

    def is_current(self, record: AdapterRecord) -> bool:
        with self._lock:
            return self._records.get(record.name) is record

    def cached(self, record: AdapterRecord) -> ParsedAdapter | None:
        with self._lock:
            adapter = self._cpu.get(record.key)
            if adapter is not None:
                self._cpu.move_to_end(record.key)
            return adapter

    def cached_derived(self, key: Hashable) -> ParsedAdapter | None:
        """A derived adapter (a composition) in the CPU tier, or None."""
        with self._lock:
            adapter = self._cpu.get(key)
            if adapter is not None:
                self._cpu.move_to_end(key)
            return adapter

    def cache_derived(self, key: Hashable, parts: list[AdapterRecord], adapter: ParsedAdapter) -> bool:
        """Keep a derived adapter in the CPU tier (LRU like any adapter) while all its parts are current;
        it leaves the tier with the first part that is replaced or deleted. False if one already is."""
        with self._lock:
            if any(self._records.get(p.name) is not p for p in parts):
                return False
            self._insert_cpu(key, adapter)
            self._derived[key] = frozenset(p.key for p in parts)
            return True

    def in_cpu(self, record: AdapterRecord) -> bool:
        with self._lock:
            return record.key in self._cpu

    def cpu_keys(self) -> list[AdapterKey]:
        with self._lock:
            return list(self._cpu)

    def request_load(self, record: AdapterRecord) -> None:
        """Parse the adapter from disk into the CPU tier in the background (no-op if cached or loading)."""
        with self._lock:
            if record.key in self._cpu or record.status == LOADING or record.deleted:
                return
            record.status, record.error = LOADING, None
        self._loader.submit(self._load, record)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # Internals --------------------------------------------------------------------------------

    def _add(self, name: str, config: bytes, weights: bytes | Path, sha: str, overwrite: bool,
             contract_bytes: bytes | None = None, contract: AdapterContract | None = None) -> AdapterRecord:
        adapter = self._within_budget(parse_peft_adapter(config, weights, self.layout, self.max_rank))
        # One writer per name (per store when shared); the registry lock is free meanwhile.
        with self.store.exclusive(), self._name_lock(name):
            if self.store.shared:
                self._sync_unlocked()
            self._check_free(name, overwrite)
            self.check_writable(name)
            issued = self.state.issue(name, sha, written=True)
            folder = self.store.write(name, config, weights, contract_bytes)
            return self._insert(name, folder, adapter, sha, issued.generation, issued.version, contract)

    def _load(self, record: AdapterRecord) -> None:
        """Background parse; the result is cached only if the bytes read are still this version's."""
        try:
            config, weights = _read(record.folder / CONFIG_FILE), record.folder / WEIGHTS_FILE
            hashed = _file_id(weights)
            if file_sha256(config, weights, contract_bytes=_read_contract(record.folder)) != record.sha256:
                if record.deleted:
                    raise _Superseded
                raise AdapterFormatError("the stored files changed since registration (sha256 mismatch)")
            adapter = self._within_budget(parse_peft_adapter(config, weights, self.layout, self.max_rank))
            if _file_id(weights) != hashed:  # an overwrite renamed another file in between
                raise _Superseded
        except _Superseded:
            with self._lock:
                record.status = READY
            log.info("discarded a load of %s v%d: the store holds another version now", record.name, record.version)
            return
        except (AdapterFormatError, OSError) as exc:
            with self._lock:
                record.status, record.error = ERROR, str(exc)
            log.error("adapter %s failed to load: %s", record.name, exc)
            return
        with self._lock:
            record.status = READY
            if record.deleted or self._records.get(record.name) is not record:
                log.info("discarded a load of %s v%d: no longer current", record.name, record.version)
                return
            self._cache(record, adapter)

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

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.RLock())  # re-entered by a shared store's sync

    def _insert(self, name: str, folder: Path, adapter: ParsedAdapter, sha: str, generation: int,
                version: int, contract: AdapterContract | None = None) -> AdapterRecord:
        record = AdapterRecord(name=name, version=version, generation=generation, sha256=sha, folder=folder,
                               rank=adapter.rank, alpha=adapter.alpha, target_modules=adapter.target_modules,
                               size_bytes=adapter.size_bytes, contract=contract, kinds=adapter.kinds())
        with self._lock:
            previous = self._records.get(name)
            if previous is not None:
                previous.deleted = True  # superseded: its slot is freed once its last request ends
                self._uncache(previous.key)
            self._records[name] = record
            self._cache(record, adapter)
        if previous is not None:
            self.on_retired(previous)
        return record

    def cpu_bytes(self) -> int:
        """Bytes of parsed adapters held in the CPU tier now."""
        with self._lock:
            return self._cpu_bytes

    def _cache(self, record: AdapterRecord, adapter: ParsedAdapter) -> None:
        """Insert (caller holds `_lock`), then evict least recently used entries while the tier holds more
        than `max_cpu_loras` adapters or `max_cpu_bytes` bytes; the adapter just inserted always stays."""
        self._insert_cpu(record.key, adapter)

    def _insert_cpu(self, key: Hashable, adapter: ParsedAdapter) -> None:
        self._drop_cpu(key)
        self._cpu[key] = adapter
        self._cpu_bytes += adapter.size_bytes
        while len(self._cpu) > 1 and (len(self._cpu) > self.max_cpu_loras or self._cpu_bytes > self.max_cpu_bytes):
            evicted_key, evicted = self._cpu.popitem(last=False)
            self._cpu_bytes -= evicted.size_bytes
            self._derived.pop(evicted_key, None)

    def _uncache(self, key: AdapterKey) -> None:
        """Drop a version from the CPU tier, with every derived adapter built from it."""
        self._drop_cpu(key)
        for derived in [d for d, parts in self._derived.items() if key in parts]:
            self._drop_cpu(derived)

    def _drop_cpu(self, key: Hashable) -> None:
        self._derived.pop(key, None)
        adapter = self._cpu.pop(key, None)
        if adapter is not None:
            self._cpu_bytes -= adapter.size_bytes


class _Superseded(Exception):
    """The store's bytes for a name are not the version being loaded."""


def _file_id(path: Path) -> tuple[int, int, int, int]:
    """Which file `path` names now: a rename in of another file changes it."""
    try:
        st = path.stat()
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {path.name}: {exc.strerror}") from None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_contract(folder: Path) -> bytes | None:
    """The folder's loraplex.json bytes, or None when it has none."""
    path = folder / CONTRACT_FILE
    return _read(path) if path.is_file() else None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {path.name}: {exc.strerror}") from None
