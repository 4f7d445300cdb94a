"""The adapter side's lock order (server/adapters/locks.py): the checker, and the registry run under it.

The reliability suites run their server with the checker on too (tests/reliability/server_proc.py);
the churn suite then asserts the server never logged a lock taken out of order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from server.adapters import locks
from server.adapters.locks import NAME, REGISTRY, STORE, TIER, LockOrderError, held, ordered_lock
from server.adapters.registry import AdapterRegistry
from server.adapters.shared import SharedAdapterStore
from server.adapters.store import AdapterStore
from server.adapters.store_sync import StoreSync


@pytest.fixture(autouse=True)
def checking(monkeypatch):
    monkeypatch.setenv(locks.CHECK_ENV, "1")


def files(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


def test_out_of_order_acquisition_raises_before_waiting():
    registry_lock, tier_lock, name_lock = ordered_lock(REGISTRY), ordered_lock(TIER), ordered_lock(NAME, True)
    with registry_lock, tier_lock:  # in order
        pass
    with name_lock, name_lock, registry_lock:  # a reentrant lock taken again is fine
        pass
    with tier_lock, pytest.raises(LockOrderError, match="REGISTRY taken while holding TIER"):
        with registry_lock:
            pass
    with name_lock, pytest.raises(LockOrderError, match="NAME taken while holding NAME"):
        with ordered_lock(NAME):  # two names at once: never
            pass
    with registry_lock, pytest.raises(LockOrderError, match="STORE taken while holding REGISTRY"):
        with held(STORE, threading.Lock()):
            pass
    with registry_lock:  # a failed acquisition left nothing behind
        pass


def test_plain_locks_when_checking_is_off(monkeypatch):
    monkeypatch.delenv(locks.CHECK_ENV)
    assert type(ordered_lock(TIER)) is type(threading.Lock())


def write(registry: AdapterRegistry, folders: list[Path], index: int, errors: list[BaseException]) -> None:
    for round_ in range(6):
        name = f"a{(index + round_) % 3}"
        try:
            registry.add(name, *files(folders[round_ % 3]), overwrite=True)
            if round_ % 3 == 2:
                registry.remove(name)
            elif round_ % 3 == 1:
                registry.unload(name)
                registry.reload(name)
        except LockOrderError as exc:
            errors.append(exc)
        except Exception:  # noqa: BLE001 - a name another thread changed meanwhile
            pass


def read(registry: AdapterRegistry, sync: StoreSync | None, errors: list[BaseException]) -> None:
    try:
        for _ in range(60):
            for record in registry.records():
                registry.request_load(record)
                registry.cached(record)
            if sync is not None:
                sync.refresh()
            time.sleep(0.001)
    except LockOrderError as exc:
        errors.append(exc)


def test_registry_churn_keeps_the_order(make_adapter, layout, tmp_path, caplog):
    """Uploads, overwrites, deletes, unloads, background loads and reads from threads at once, on one store of
    this server and on a shared one with a second server syncing: a lock out of order would raise."""
    folders = [make_adapter()[0] for _ in range(3)]
    for store in (AdapterStore(tmp_path / "own"), SharedAdapterStore(tmp_path / "shared")):
        registry = AdapterRegistry(store, layout, max_rank=16, max_cpu_loras=2)
        other = AdapterRegistry(type(store)(store.root), layout, max_rank=16, max_cpu_loras=2)
        sync = StoreSync(store=store, registry=other) if isinstance(store, SharedAdapterStore) else None
        errors: list[BaseException] = []
        threads = [threading.Thread(target=write, args=(registry, folders, i, errors)) for i in range(3)]
        threads.append(threading.Thread(target=read, args=(registry, sync, errors)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        registry.close()
        other.close()
        assert errors == [] and "lock order" not in caplog.text  # the loader thread's errors are logged
