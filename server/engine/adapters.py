"""The adapter manager: identity, tiers (disk, CPU, device slots) and the scheduler's admission callbacks.

It owns the registry and the device slot table; both are keyed by `AdapterKey` (a composition:
`CompositionKey`, its parts' keys and weights), so a deleted or replaced version can never hand its
slot or cached weights to a newer one. Admin calls run on worker threads (the API uses
`asyncio.to_thread`); `admit`, `release` and `evict_if_idle` run on the engine thread only: a version
the registry retires reaches `evict_if_idle` through the engine's inbox.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from server.adapters.composition import ComposedRecord, CompositionKey, compose
from server.adapters.contract import AdapterContract, ContractError, parse_contract, patched
from server.adapters.identity import AdapterKey
from server.adapters.layout import BaseLayout
from server.adapters.names import AdapterNameError
from server.adapters.peft_format import AdapterFormatError, ParsedAdapter
from server.adapters.records import ERROR, AdapterExists, AdapterProtected, AdapterRecord
from server.adapters.registry import AdapterRegistry
from server.adapters.shared import SharedAdapterStore
from server.adapters.slots import NoFreeSlotError, SlotTable
from server.adapters.store import AdapterStore
from server.adapters.store_sync import StoreSync
from server.config import Settings
from server.engine.contract import output_format
from server.engine.grammar import GrammarCompiler
from server.engine.inbox import Inbox
from server.engine.pool_size import PoolStats
from server.engine.request import (
    AdapterExistsError,
    AdapterInfo,
    AdapterProtectedError,
    AdapterRejectedError,
    AdapterUnavailableError,
    AdapterVersionMismatchError,
    EngineError,
    UnknownModelError,
)
from server.engine.resolve import ModelResolver, Resolved
from server.engine.scheduler import Admission
from server.engine.sequence import Sequence
from server.lora.model import LoraModel

SIZES_KEPT = 4096  # adapters whose device bytes are remembered


def uses_default_store(settings: Settings) -> bool:
    """True when the store is the implicit `adapters/` (the shipped adapters of a checkout), not one the
    operator chose with --adapters-dir or LORAPLEX_ADAPTERS_DIR."""
    return "adapters_dir" not in settings.model_fields_set


@contextmanager
def _engine_errors() -> Iterator[None]:
    """The registry's refusals as engine errors (the API maps their codes to HTTP statuses)."""
    try:
        yield
    except (AdapterFormatError, AdapterNameError, ContractError) as exc:
        raise AdapterRejectedError(str(exc)) from exc
    except AdapterExists as exc:
        raise AdapterExistsError(str(exc)) from exc
    except AdapterProtected as exc:
        raise AdapterProtectedError(str(exc)) from exc


class AdapterManager:
    def __init__(self, *, lora: LoraModel, layout: BaseLayout, settings: Settings, base_name: str, inbox: Inbox,
                 grammars: GrammarCompiler | None = None) -> None:
        """`inbox`: where a retired version's key goes, for the engine thread to free its slot; `grammars`:
        checks that an adapter contract's response_format compiles (None: no structured output)."""
        self.lora = lora
        self.base_name = base_name
        self.max_rank = settings.max_lora_rank
        self.grammars = grammars
        store_class = SharedAdapterStore if settings.shared_store else AdapterStore
        self.registry = AdapterRegistry(store_class(settings.adapters_dir), layout, settings.max_lora_rank,
                                        settings.max_cpu_loras, reserved_names=frozenset({base_name}),
                                        max_bytes=settings.max_adapter_bytes,
                                        max_cpu_bytes=settings.max_cpu_lora_bytes,
                                        protect_found=uses_default_store(settings),
                                        max_saved_bytes=settings.max_saved_module_bytes,
                                        on_retired=lambda record: inbox.post("evict", record.key))
        self.resolver = ModelResolver(registry=self.registry, base_name=base_name, max_rank=settings.max_lora_rank)
        # Residency within the pool's bytes (or, without a pool, the padded slots' count).
        self.slots = SlotTable(lora.max_loras, lora.capacity_bytes, unload=self._clear)
        self.pool_waits = 0  # admissions put off because running adapters held the pool (or every slot)
        self._sizes: dict[AdapterKey | CompositionKey, int] = {}  # device bytes per adapter identity
        # Bytes of fully trained module copies (modules_to_save) of the adapter in each slot, as saved.
        self.copies: dict[int, int] = {}
        self.max_copy_bytes = settings.max_saved_module_bytes
        # A shared store: what other servers wrote is taken in before a name is resolved.
        store = self.registry.store
        self.store_sync = (StoreSync(store=store, registry=self.registry)
                           if isinstance(store, SharedAdapterStore) else None)

    def resolve(self, model: str) -> Resolved:
        """Any thread: see `ModelResolver.resolve`."""
        return self.resolver.resolve(model)

    # Admin (worker threads) -------------------------------------------------------------------

    def load_store(self) -> dict[str, str]:
        return self.registry.scan()

    def add(self, name: str, config_bytes: bytes, weights_path: Path, overwrite: bool,
            contract_bytes: bytes | None = None) -> AdapterInfo:
        with _engine_errors():
            if contract_bytes is not None:
                self._checked(parse_contract(contract_bytes))
            record = self.registry.add_file(name, config_bytes, weights_path, overwrite, contract_bytes)
        return self.info(record)

    def patch_contract(self, name: str, patch: dict) -> AdapterInfo:
        record = self.registry.get(name)
        if record is None:
            raise UnknownModelError(f"adapter '{name}' does not exist")
        with _engine_errors():
            contract = self._checked(patched(record.contract, patch))
            updated = self.registry.replace_contract(name, contract)
        if updated is None:
            raise UnknownModelError(f"adapter '{name}' does not exist")
        return self.info(updated)

    def _checked(self, contract: AdapterContract) -> AdapterContract:
        """The contract, if its response_format compiles (raises ContractError otherwise)."""
        try:
            fmt = output_format(contract.response_format)
            if fmt is not None and self.grammars is not None:
                self.grammars.compile(fmt)
        except EngineError as exc:
            raise ContractError(f"loraplex.json: response_format: {exc}") from None
        return contract

    def delete(self, name: str) -> AdapterRecord:
        with _engine_errors():
            record = self.registry.remove(name)
        if record is None:
            raise UnknownModelError(f"adapter '{name}' does not exist")
        return record

    def unload(self, name: str) -> AdapterRecord:
        record = self.registry.unload(name)
        if record is None:
            raise UnknownModelError(f"adapter '{name}' does not exist")
        return record

    def reload(self, name: str) -> AdapterInfo:
        with _engine_errors():
            return self.info(self.registry.reload(name))

    def store_folder(self, name: str) -> Path:
        return self.registry.store.folder(name)

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
                           generation=record.generation,
                           contract=record.contract.as_dict() if record.contract else None)

    def tier(self, record: AdapterRecord) -> str:
        if self.slots.slot_of(record.key) is not None:
            return "device"
        return "cpu" if self.registry.in_cpu(record) else "disk"

    def counts(self) -> tuple[int, int]:
        """(adapters on the device, adapters in the CPU tier) among the current versions."""
        records = self.registry.records()
        return (sum(self.slots.slot_of(r.key) is not None for r in records),
                sum(self.registry.in_cpu(r) for r in records))

    def pool_stats(self) -> PoolStats:
        slots, pool = self.slots, self.lora.pool
        keys = slots.keys()
        pinned = sum(1 for key in keys if (slot := slots.slot_of(key)) is not None and slots.pinned(slot))
        if pool is None:
            size = self.lora.padded_slot_bytes
            return PoolStats(size * slots.num_slots, size * len(keys), slots.num_slots - len(keys), size, len(keys),
                             pinned, slots.evictions, self.pool_waits, 0)
        return PoolStats(pool.nbytes, pool.used_pages * pool.page_bytes, pool.free_pages, pool.page_bytes, len(keys),
                         pinned, slots.evictions, self.pool_waits, pool.compactions)

    def cached(self, record: AdapterRecord | ComposedRecord) -> ParsedAdapter | None:
        """The record's weights if the CPU tier holds them (a composition: already built)."""
        if isinstance(record, ComposedRecord):
            return self.registry.cached_derived(record.key)
        return self.registry.cached(record)

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
        if isinstance(record, ComposedRecord):
            return self._rebind_composition(seq, record)
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

    def prefetch(self, waiting: Iterable[Sequence]) -> None:
        """Start the disk loads of the adapters next in line, so that a slot freed by a finished
        sequence finds the next one's weights in memory instead of idling for a disk read.

        Looks ahead over at most half the CPU tier, by count and by bytes, so that prefetched
        adapters never push each other out before they are used. It only warms the tier: a
        waiting sequence still takes its weights at admission, after the delete checks.
        """
        ahead, budget = max(1, self.registry.tier.max_count // 2), self.registry.tier.max_bytes // 2
        seen: set[AdapterKey] = set()
        for seq in itertools.islice(waiting, 4 * ahead):  # bounded work per step whatever the queue
            if seq.record is None or seq.adapter is not None:
                continue
            parts = ([part for part, _ in seq.record.parts] if isinstance(seq.record, ComposedRecord)
                     else [seq.record])
            for record in parts:
                if record.key in seen or record.deleted or record.status == ERROR:
                    continue
                seen.add(record.key)
                budget -= record.size_bytes
                if len(seen) > ahead or budget < 0:
                    return
                self.registry.request_load(record)

    def admit(self, seq: Sequence) -> Admission:
        """Pin a device slot for the sequence's adapter."""
        if seq.record is None:
            seq.slot = -1
            return Admission.ADMITTED
        if seq.adapter is None:
            seq.adapter = self._weights(seq.record)
            if seq.adapter is None:
                return Admission.LOADING
        record, adapter = seq.record, seq.adapter
        if adapter.saved and self.slots.slot_of(record.key) is None:
            if not self._room_for_copies(adapter.saved_bytes):
                return Admission.NO_SLOT  # running adapters hold the copy budget: wait for one to end
        try:
            seq.slot = self.slots.acquire(record.key, partial(self._write, record=record, adapter=adapter),
                                          self._device_bytes(record.key, adapter))
        except NoFreeSlotError:
            self.pool_waits += 1
            return Admission.NO_SLOT
        return Admission.ADMITTED

    def preload(self, waiting: Iterable[Sequence], limit: int = 8) -> None:
        """Write the adapters of the requests next in line into free pool room (never evicting), so their
        admission finds them on the device; only adapters whose weights are already in memory."""
        for seq in itertools.islice(waiting, 4 * limit):
            record = seq.record
            if record is None or isinstance(record, ComposedRecord) or record.deleted or record.status == ERROR:
                continue
            adapter = self.registry.cached(record)
            if adapter is None or adapter.saved or self.slots.slot_of(record.key) is not None:
                continue
            fits = self.slots.preload(record.key, partial(self._write, record=record, adapter=adapter),
                                      self._device_bytes(record.key, adapter))
            limit -= 1
            if not fits or limit <= 0:
                return

    def _device_bytes(self, key: AdapterKey | CompositionKey, adapter: ParsedAdapter) -> int:
        """What the adapter takes on the device, remembered per identity: a request that waits for room asks
        again every step."""
        if self.slots.slot_of(key) is not None:
            return 0  # resident: nothing more is taken
        size = self._sizes.get(key)
        if size is None:
            size = self._sizes[key] = self.lora.slot_bytes(adapter)
            if len(self._sizes) > SIZES_KEPT:
                self._sizes.pop(next(iter(self._sizes)))
        return size

    def _room_for_copies(self, need: int) -> bool:
        """Make `need` more bytes of trained copies fit the budget by freeing idle slots that hold copies
        (least recently used first); False when the copies of running adapters leave too little."""
        excess = sum(self.copies.values()) + need - self.max_copy_bytes
        victims = []
        for key in self.slots.keys():
            slot = self.slots.slot_of(key)
            if excess <= 0:
                break
            if slot is not None and self.copies.get(slot) and not self.slots.pinned(slot):
                victims.append(key)
                excess -= self.copies[slot]
        if excess > 0:
            return False
        for key in victims:
            self._clear(self.slots.forget(key))
        return True

    def _clear(self, slot: int | None) -> None:
        if slot is not None:
            self.lora.clear_slot(slot)
            self.copies.pop(slot, None)

    def release(self, seq: Sequence) -> None:
        if seq.slot is not None and seq.slot >= 0:
            self.slots.release(seq.slot)
            if seq.record is not None and seq.record.deleted:
                self.evict_if_idle(seq.record.key)
        seq.slot = None

    def evict_if_idle(self, key: AdapterKey | CompositionKey) -> None:
        """Free the slot of a deleted or superseded version once nothing runs on it."""
        keys: list[AdapterKey | CompositionKey] = [key]
        if isinstance(key, AdapterKey):  # a retired part takes the compositions built from it along
            keys += [k for k in self.slots.keys() if isinstance(k, CompositionKey) and k.involves(key)]
        for k in keys:
            self._clear(self.slots.forget(k))

    def _weights(self, record: AdapterRecord | ComposedRecord) -> ParsedAdapter | None:
        """The record's weights from the CPU tier, else None with their load from disk requested.

        A composition is built from its parts' weights once all of them are in memory, then kept in
        the CPU tier under its own key like any adapter.
        """
        adapter = self.cached(record)
        if adapter is not None:
            return adapter
        if not isinstance(record, ComposedRecord):
            self.registry.request_load(record)
            return None
        cached = [self.registry.cached(part) for part, _ in record.parts]
        missing = [part for (part, _), weights in zip(record.parts, cached) if weights is None]
        for part in missing:
            self.registry.request_load(part)
        if missing:
            return None
        adapter = compose([weights for weights in cached if weights is not None], [w for _, w in record.parts])
        self.registry.cache_derived(record.key, [part for part, _ in record.parts], adapter)
        return adapter

    def _rebind_composition(self, seq: Sequence, record: ComposedRecord) -> EngineError | None:
        """A waiting composition whose part was replaced or deleted resolves its expression again."""
        if record.status == ERROR:
            return AdapterUnavailableError(f"a part of the composition '{record.name}' failed to load: "
                                           f"{record.error}")
        if not record.deleted:
            return None
        try:
            seq.record, _ = self.resolve(record.name)
        except EngineError as exc:
            return type(exc)(f"a part of the composition changed before the request started: {exc}")
        return None

    def _write(self, slot: int, record: AdapterRecord | ComposedRecord, adapter: ParsedAdapter) -> None:
        started = time.perf_counter()
        self.lora.write_slot(slot, adapter)
        self.copies[slot] = adapter.saved_bytes
        record.loads += 1
        record.load_seconds = time.perf_counter() - started
