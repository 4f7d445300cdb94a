"""A store shared by several servers: what one writes, every other one serves at its next request."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from server.adapters.layout import BaseLayout
from server.adapters.registry import AdapterExists, AdapterRegistry
from server.adapters.shared import GENERATION_FILE, SharedAdapterStore
from server.adapters.store_sync import StoreSync


def server(root: Path, layout: BaseLayout) -> tuple[AdapterRegistry, StoreSync]:
    """One server's view of the shared store: its own registry (as in its own process) and its sync."""
    store = SharedAdapterStore(root)
    registry = AdapterRegistry(store, layout, max_rank=16, max_cpu_loras=4)
    return registry, StoreSync(store=store, registry=registry)


def files(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


def test_upload_overwrite_and_delete_reach_another_server(make_adapter, layout, tmp_path):
    root = tmp_path / "store"
    (writer, _), (reader, sync) = server(root, layout), server(root, layout)
    one, two = make_adapter()[0], make_adapter()[0]
    sync.refresh()
    assert not sync.stale() and reader.records() == []

    v1 = writer.add("task", *files(one))
    assert sync.stale()
    sync.refresh()
    seen = reader.get("task")
    assert (seen.version, seen.generation, seen.sha256) == (v1.version, v1.generation, v1.sha256)
    assert reader.in_cpu(seen)  # parsed, ready to serve

    v2 = writer.add("task", *files(two), overwrite=True)
    sync.refresh()
    assert reader.get("task").sha256 == v2.sha256 and reader.get("task").version == 2
    assert seen.deleted and not reader.in_cpu(seen)  # the old version is retired on the reader too

    assert writer.remove("task") is not None
    sync.refresh()
    assert reader.get("task") is None


def test_unchanged_store_costs_one_small_read(make_adapter, layout, tmp_path):
    root = tmp_path / "store"
    (writer, _), (reader, sync) = server(root, layout), server(root, layout)
    writer.add("task", *files(make_adapter()[0]))
    sync.refresh()
    calls = []
    sync._sync = lambda: calls.append(1)
    started = time.perf_counter()
    for _ in range(1000):
        if sync.stale():
            sync.refresh()
    per_check = (time.perf_counter() - started) / 1000
    assert calls == [] and per_check < 1e-3
    assert (root / GENERATION_FILE).stat().st_size < 32


def test_a_name_taken_on_another_server_is_a_conflict_there_too(make_adapter, layout, tmp_path):
    root = tmp_path / "store"
    (first, _), (second, _) = server(root, layout), server(root, layout)
    folder = make_adapter()[0]
    first.add("task", *files(folder))
    with pytest.raises(AdapterExists):
        second.add("task", *files(folder))  # second never synced: the check under the store lock reads the store
    record = second.add("task", *files(folder), overwrite=True)
    assert record.version == 2
    assert second.remove("task") is not None
    # first still holds the name locally; its delete syncs under the lock and finds it gone
    assert first.remove("task") is None


def test_concurrent_writers_on_two_servers_never_share_a_generation(make_adapter, layout, tmp_path):
    root = tmp_path / "store"
    servers = [server(root, layout) for _ in range(2)]
    folders = [make_adapter()[0] for _ in range(2)]
    issued: list[tuple[str, int, int]] = []
    errors: list[BaseException] = []

    def upload(index: int) -> None:
        registry = servers[index][0]
        try:
            for round_ in range(4):
                name = f"a{index}-{round_ % 2}"
                record = registry.add(name, *files(folders[index]), overwrite=True)
                issued.append((name, record.version, record.generation))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    generations = [g for _, _, g in issued]
    assert len(set(generations)) == len(generations) == 8
    for registry, sync in servers:
        sync.refresh()
        assert sorted(r.name for r in registry.records()) == ["a0-0", "a0-1", "a1-0", "a1-1"]
        assert all(r.version == 2 for r in registry.records())
