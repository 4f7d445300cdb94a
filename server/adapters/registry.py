"""The adapter registry: names, versions, status, and the CPU tier of parsed weights.

Tiers: device slots (see `slots.py`, owned by the engine), an LRU of parsed adapters in
CPU memory (`max_cpu_loras`), and the disk store (everything registered). Every name maps
to its current version; a request holds on to the version it started with, so replacing
or deleting an adapter never changes a generation in flight.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from server.adapters.layout import BaseLayout
from server.adapters.peft_format import AdapterFormatError, ParsedAdapter, load_peft_adapter, parse_peft_adapter
from server.adapters.store import AdapterStore

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
LOADING, READY, ERROR = "loading", "ready", "error"


class AdapterExists(Exception):
    """The name is taken and overwrite was not asked for."""


@dataclass(eq=False)
class AdapterRecord:
    name: str
    version: int
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

    @property
    def key(self) -> tuple[str, int]:
        """Identity of this exact version, used for device slots and the CPU cache."""
        return (self.name, self.version)


class AdapterRegistry:
    """Thread-safe: the API registers and deletes, the engine thread reads and loads."""

    def __init__(self, store: AdapterStore, layout: BaseLayout, max_rank: int, max_cpu_loras: int,
                 reserved_names: frozenset[str] = frozenset()) -> None:
        self.store = store
        self.layout = layout
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self.reserved_names = reserved_names
        self._records: dict[str, AdapterRecord] = {}
        self._cpu: OrderedDict[tuple[str, int], ParsedAdapter] = OrderedDict()
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")

    # Registration -----------------------------------------------------------------------------

    def check_name(self, name: str) -> None:
        if not ADAPTER_NAME.fullmatch(name) or name in (".", ".."):
            raise AdapterFormatError(f"invalid adapter name {name!r}: use 1-64 characters of [A-Za-z0-9._-]")
        if name in self.reserved_names:
            raise AdapterFormatError(f"adapter name {name!r} is reserved for the base model")

    def register_folder(self, name: str, folder: Path, overwrite: bool = False) -> AdapterRecord:
        """Validate a PEFT folder in place and register it (the store's own folders, at start-up)."""
        self.check_name(name)
        self._check_free(name, overwrite)
        return self._insert(name, folder, load_peft_adapter(folder, self.layout, self.max_rank))

    def add(self, name: str, config_bytes: bytes, weights_bytes: bytes, overwrite: bool = False) -> AdapterRecord:
        """Validate uploaded bytes in full, then write them to the store atomically and register."""
        self.check_name(name)
        self._check_free(name, overwrite)
        adapter = parse_peft_adapter(config_bytes, weights_bytes, self.layout, self.max_rank)
        with self._lock:  # check and write under one lock: two uploads of one name cannot interleave
            self._check_free(name, overwrite)
            folder = self.store.write(name, config_bytes, weights_bytes)
            return self._insert(name, folder, adapter)

    def scan(self) -> dict[str, str]:
        """Register every adapter folder of the store; returns the rejected ones with their errors."""
        self.store.recover()
        rejected: dict[str, str] = {}
        root = self.store.root
        if not root.is_dir():
            log.warning("adapter store %s does not exist; no adapters registered", root)
            return rejected
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                record = self.register_folder(folder.name, folder)
                log.info("registered adapter %s (rank %d, %d modules)", record.name, record.rank,
                         len(record.target_modules))
            except (AdapterFormatError, AdapterExists) as exc:
                rejected[folder.name] = str(exc)
                log.error("adapter %s rejected: %s", folder.name, exc)
        return rejected

    def remove(self, name: str) -> AdapterRecord | None:
        """Unregister `name` and delete it from the store; running requests keep their own copy."""
        with self._lock:
            record = self._records.pop(name, None)
            if record is None:
                return None
            record.deleted = True
            for key in [k for k in self._cpu if k[0] == name]:
                del self._cpu[key]
            self.store.remove(name)
            return record

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

    def in_cpu(self, record: AdapterRecord) -> bool:
        with self._lock:
            return record.key in self._cpu

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

    def _load(self, record: AdapterRecord) -> None:
        try:
            adapter = load_peft_adapter(record.folder, self.layout, self.max_rank)
        except (AdapterFormatError, OSError) as exc:
            with self._lock:
                record.status, record.error = ERROR, str(exc)
            log.error("adapter %s failed to load: %s", record.name, exc)
            return
        with self._lock:
            self._cache(record, adapter)
            record.status = READY

    def _check_free(self, name: str, overwrite: bool) -> None:
        if not overwrite and self.get(name) is not None:
            raise AdapterExists(f"adapter {name!r} already exists; pass overwrite=true to replace it")

    def _insert(self, name: str, folder: Path, adapter: ParsedAdapter) -> AdapterRecord:
        with self._lock:
            previous = self._records.get(name)
            record = AdapterRecord(name=name, version=previous.version + 1 if previous else 1, folder=folder,
                                   rank=adapter.rank, alpha=adapter.alpha, target_modules=adapter.target_modules,
                                   size_bytes=adapter.size_bytes)
            if previous is not None:
                previous.deleted = True  # superseded: its slot is freed once its last request ends
                self._cpu.pop(previous.key, None)
            self._records[name] = record
            self._cache(record, adapter)
            return record

    def _cache(self, record: AdapterRecord, adapter: ParsedAdapter) -> None:
        self._cpu[record.key] = adapter
        self._cpu.move_to_end(record.key)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)
