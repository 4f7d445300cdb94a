"""The adapter manager: identity, tiers (disk, CPU, device slots) and the scheduler's admission callbacks.

It owns the registry and the device slot table; both are keyed by `AdapterKey`, so a deleted or
replaced version can never hand its slot or cached weights to a newer one. Admin calls run on
worker threads (the API uses `asyncio.to_thread`); `admit`, `release` and `evict_if_idle` run on
the engine thread only.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from server.adapters.identity import AdapterKey
from server.adapters.layout import BaseLayout
from server.adapters.names import AdapterNameError
from server.adapters.peft_format import AdapterFormatError
from server.adapters.registry import ERROR, AdapterExists, AdapterRecord, AdapterRegistry
from server.adapters.shared import SharedAdapterStore, StoreSync
from server.adapters.slots import NoFreeSlotError, SlotTable
from server.adapters.store import AdapterStore
from server.config import Settings
from server.engine.request import (AdapterExistsError, AdapterInfo, AdapterRejectedError, AdapterUnavailableError,
                                   AdapterVersionMismatchError, EngineError, UnknownModelError)
from server.engine.scheduler import Admission
from server.engine.sequence import Sequence
from server.lora.model import LoraModel

_SHA_PREFIX = re.compile(r"[0-9a-fA-F]{8,64}")


class AdapterManager:
    def __init__(self, lora: LoraModel, layout: BaseLayout, settings: Settings, base_name: str) -> None:
        self.lora = lora
        self.base_name = base_name
        store_class = SharedAdapterStore if settings.shared_store else AdapterStore
        self.registry = AdapterRegistry(store_class(settings.adapters_dir), layout, settings.max_lora_rank,
                                        settings.max_cpu_loras, reserved_names=frozenset({base_name}),
                                        max_bytes=settings.max_adapter_bytes,
                                        max_cpu_bytes=settings.max_cpu_lora_bytes)
        self.slots = SlotTable(settings.max_loras)
        self.post_evict: Callable[[AdapterKey], None] = lambda key: None  # set by the engine: runs evict_if_idle
        self.registry.on_retired = lambda record: self.post_evict(record.key)
        # A shared store: what other servers wrote is taken in before a name is resolved.
        self.store_sync = (StoreSync(self.registry.store, self.registry.sync_from_store)
                           if isinstance(self.registry.store, SharedAdapterStore) else None)

    # Resolution (any thread) ------------------------------------------------------------------

    def resolve(self, model: str) -> tuple[AdapterRecord | None, str | None]:
        """`model` -> (record or None for the base, the sha256 prefix it was pinned to, if any)."""
        if model == self.base_name:
            return None, None
        name, prefix = model, None
        if "@" in model:
            name, _, prefix = model.rpartition("@")
            if not _SHA_PREFIX.fullmatch(prefix):
                raise UnknownModelError(f"The model '{model}' does not exist: after '@' give at least 8 hex "
                                        "characters of the adapter's sha256")
            prefix = prefix.lower()
        record = self.registry.get(name)
        if record is None:
            raise UnknownModelError(f"The model '{name}' does not exist: it is neither the base model "
                                    f"'{self.base_name}' nor a registered adapter")
        if prefix is not None and not record.sha256.startswith(prefix):
            raise AdapterVersionMismatchError(f"adapter '{name}' is now version {record.version} with sha256 "
                                              f"{record.sha256}, which does not start with {prefix!r}")
        if record.status == ERROR:
            raise AdapterUnavailableError(f"adapter '{name}' failed to load: {record.error}")
        return record, prefix

    # Admin (worker threads) -------------------------------------------------------------------

    def load_store(self) -> dict[str, str]:
        return self.registry.scan()

    def add(self, name: str, config_bytes: bytes, weights_path: Path, overwrite: bool) -> AdapterInfo:
        try:
            record = self.registry.add_file(name, config_bytes, weights_path, overwrite)
        except (AdapterFormatError, AdapterNameError) as exc:
            raise AdapterRejectedError(str(exc)) from exc
        except AdapterExists as exc:
            raise AdapterExistsError(str(exc)) from exc
        return self.info(record)

    def delete(self, name: str) -> AdapterRecord:
        record = self.registry.remove(name)
        if record is None:
            raise UnknownModelError(f"adapter '{name}' does not exist")
        return record

    def get_info(self, name: str) -> AdapterInfo:
        record = self.registry.get(name)
        if record is None:
            raise UnknownModelError(f"adapter '{name}' does not exist")
        return self.info(record)

    def info(self, record: AdapterRecord) -> AdapterInfo:
        return AdapterInfo(name=record.name, version=record.version, status=record.status, error=record.error,
                           tier=self.tier(record), rank=record.rank, alpha=record.alpha,
                           target_modules=record.target_modules, size_bytes=record.size_bytes,
                           created=int(record.created), requests=record.requests, tokens=record.tokens,
                           loads=record.loads, load_seconds=record.load_seconds, sha256=record.sha256,
                           generation=record.generation)

    def tier(self, record: AdapterRecord) -> str:
        if self.slots.slot_of(record.key) is not None:
            return "device"
        return "cpu" if self.registry.in_cpu(record) else "disk"

    def counts(self) -> tuple[int, int]:
        """(adapters on the device, adapters in the CPU tier) among the current versions."""
        records = self.registry.records()
        return (sum(self.slots.slot_of(r.key) is not None for r in records),
                sum(self.registry.in_cpu(r) for r in records))

    # Engine thread ----------------------------------------------------------------------------

    def waiting_error(self, seq: Sequence) -> EngineError | None:
        """Why a waiting sequence can never start, or None; rebinds a superseded unpinned one to the current version.

        A request that has not started and whose version was replaced before its weights were
        read answers from the version now registered under its name (it names the adapter, not a
        version), unless it pinned a sha256 prefix.
        """
        record = seq.record
        if record is None or seq.adapter is not None:
            return None
        if record.status == ERROR:
            return AdapterUnavailableError(f"adapter '{record.name}' failed to load: {record.error}")
        if not record.deleted or self.registry.in_cpu(record):
            return None
        current = self.registry.get(record.name)
        if current is None:
            return UnknownModelError(f"adapter '{record.name}' was deleted before the request started")
        if seq.sha_prefix is not None and not current.sha256.startswith(seq.sha_prefix):
            return AdapterVersionMismatchError(f"adapter '{record.name}' was replaced before the request started; "
                                               f"its sha256 is now {current.sha256}")
        seq.record = current
        current.requests += 1
        return None

    def admit(self, seq: Sequence) -> Admission:
        """Pin a device slot for the sequence's adapter."""
        if seq.record is None:
            seq.slot = -1
            return Admission.ADMITTED
        if seq.adapter is None:
            seq.adapter = self.registry.cached(seq.record)
            if seq.adapter is None:
                self.registry.request_load(seq.record)
                return Admission.LOADING
        try:
            seq.slot = self.slots.acquire(seq.record.key, lambda slot: self._load_slot(slot, seq))
        except NoFreeSlotError:
            return Admission.NO_SLOT
        return Admission.ADMITTED

    def release(self, seq: Sequence) -> None:
        if seq.slot is not None and seq.slot >= 0:
            self.slots.release(seq.slot)
            if seq.record is not None and seq.record.deleted:
                self.evict_if_idle(seq.record.key)
        seq.slot = None

    def evict_if_idle(self, key: AdapterKey) -> None:
        """Free the slot of a deleted or superseded version once nothing runs on it."""
        slot = self.slots.forget(key)
        if slot is not None:
            self.lora.clear_slot(slot)

    def _load_slot(self, slot: int, seq: Sequence) -> None:
        started = time.perf_counter()
        self.lora.write_slot(slot, seq.adapter)
        seq.record.loads += 1
        seq.record.load_seconds = time.perf_counter() - started
