"""Adapter identity and the crash-safe store, on real PEFT adapters and real files."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from server.adapters.identity import adapter_sha256
from server.adapters.layout import BaseLayout
from server.adapters.names import CONFIG_FILE, WEIGHTS_FILE, AdapterNameError
from server.adapters.registry import AdapterRegistry
from server.adapters.state import STATE_FILE
from server.adapters.store import AdapterStore


def registry(root: Path, layout: BaseLayout) -> AdapterRegistry:
    return AdapterRegistry(AdapterStore(root), layout, max_rank=16, max_cpu_loras=4)


def files(folder: Path) -> tuple[bytes, Path]:
    return (folder / CONFIG_FILE).read_bytes(), folder / WEIGHTS_FILE


def test_sha256_is_the_contract_formula_over_the_stored_bytes(make_adapter, layout, tmp_path):
    folder, _ = make_adapter()
    config, weights = files(folder)
    record = registry(tmp_path / "store", layout).add_file("task", config, weights)
    stored = tmp_path / "store" / "task"
    expected = hashlib.sha256(b"loraplex-adapter-v1\0" + len(config).to_bytes(8, "little") + config
                              + (stored / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert record.sha256 == expected == adapter_sha256(config, weights.read_bytes())
    assert (stored / WEIGHTS_FILE).read_bytes() == weights.read_bytes()


def test_generations_and_versions_never_repeat_across_delete_and_restart(make_adapter, layout, tmp_path):
    one, _ = make_adapter()
    two, _ = make_adapter()
    root = tmp_path / "store"
    reg = registry(root, layout)
    v1 = reg.add_file("task", *files(one))
    reg.remove("task")
    v2 = reg.add_file("task", *files(two))
    other = reg.add_file("other", *files(one))
    assert (v1.version, v2.version) == (1, 2)  # a delete does not restart the version
    assert v1.generation < v2.generation < other.generation
    assert v1.key != v2.key and v1.sha256 != v2.sha256
    reg.close()

    again = registry(root, layout)  # a restart: unchanged folders keep their identity
    assert again.scan() == {}
    assert again.get("task").key == v2.key and again.get("task").version == 2
    v3 = again.add_file("task", *files(one), overwrite=True)
    assert v3.version == 3 and v3.generation > other.generation
    assert json.loads((root / STATE_FILE).read_text())["generation"] == v3.generation


def test_superseded_background_load_is_discarded(make_adapter, layout, tmp_path):
    one, _ = make_adapter()
    two, _ = make_adapter()
    reg = AdapterRegistry(AdapterStore(tmp_path / "store"), layout, max_rank=16, max_cpu_loras=1)
    v1 = reg.add_file("task", *files(one))
    reg.add_file("filler", *files(two))  # pushes v1 out of the one-entry CPU tier
    assert not reg.in_cpu(v1)
    v2 = reg.add_file("task", *files(two), overwrite=True)
    reg.loader._run(v1)  # a load of v1 that finishes after the overwrite reads v2's bytes: never cached as v1
    assert not reg.in_cpu(v1) and v1.key not in reg.cpu_keys() and reg.in_cpu(v2)


def test_leading_dot_and_reserved_names_are_refused(make_adapter, layout, tmp_path):
    config, weights = files(make_adapter()[0])
    reg = AdapterRegistry(AdapterStore(tmp_path / "store"), layout, 16, 4, reserved_names=frozenset({"base"}))
    for bad in [".hidden", "..", "a/b", "base", "x" * 65, ""]:
        with pytest.raises(AdapterNameError):
            reg.add_file(bad, config, weights)
    assert reg.records() == []


def test_recovery_cleans_every_leftover_and_logs_it(make_adapter, layout, tmp_path, caplog):
    good, _ = make_adapter()
    root = tmp_path / "store"
    reg = registry(root, layout)
    reg.add_file("kept", *files(good))
    reg.add_file("landed", *files(good))
    reg.close()
    # Leftovers of crashes at every step: an old copy next to its landed replacement, an old copy
    # whose replacement never landed (old and new aside-name formats), temp folders, a state temp file.
    os.rename(root / "kept", root / ".old-restored-0123abcd")
    (root / ".old-landed-89abcdef").mkdir()
    (root / ".old-landed").mkdir()
    (root / ".tmp-landed-xyz").mkdir()
    (root / ".tmp-deleted-gone-abc").mkdir()
    (root / f"{STATE_FILE}.tmp").write_text("{")
    with caplog.at_level("WARNING"):
        again = registry(root, layout)
        assert again.scan() == {}
    assert sorted(p.name for p in root.iterdir()) == [STATE_FILE, "landed", "restored"]
    assert sorted(r.name for r in again.records()) == ["landed", "restored"]
    assert sum("adapter store recovery" in r.message for r in caplog.records) == 6


def test_leftover_old_folder_never_blocks_an_overwrite(make_adapter, layout, tmp_path):
    one, _ = make_adapter()
    two, _ = make_adapter()
    root = tmp_path / "store"
    reg = registry(root, layout)
    reg.add_file("task", *files(one))
    (root / ".old-task").mkdir()  # what an older server left behind after a crash
    (root / ".old-task" / "junk").write_bytes(b"x")
    v2 = reg.add_file("task", *files(two), overwrite=True)
    assert (root / "task" / WEIGHTS_FILE).read_bytes() == files(two)[1].read_bytes() and v2.version == 2


def test_store_io_happens_outside_the_registry_lock(make_adapter, layout, tmp_path, monkeypatch):
    config, weights = files(make_adapter()[0])
    reg = registry(tmp_path / "store", layout)
    reg.add_file("other", config, weights)
    writing, release = threading.Event(), threading.Event()
    real_write = reg.store.write

    def slow_write(*args):
        writing.set()
        release.wait(10)
        return real_write(*args)

    monkeypatch.setattr(reg.store, "write", slow_write)
    upload = threading.Thread(target=reg.add_file, args=("task", config, weights))
    upload.start()
    assert writing.wait(10)
    started = time.monotonic()
    assert [r.name for r in reg.records()] == ["other"] and reg.get("other") is not None
    assert reg.cached(reg.get("other")) is not None
    assert time.monotonic() - started < 0.5  # lookups did not wait for the disk write
    release.set()
    upload.join(10)
    assert reg.get("task") is not None


def test_file_hash_equals_the_bytes_hash_and_enforces_the_limit(tmp_path):
    from server.adapters.identity import file_sha256
    from server.adapters.peft_config import AdapterFormatError

    weights = tmp_path / WEIGHTS_FILE
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks and a partial one
    weights.write_bytes(data)
    assert file_sha256(b'{"r": 8}', weights) == adapter_sha256(b'{"r": 8}', data)
    assert file_sha256(b'{"r": 8}', weights, max_bytes=len(data)) == adapter_sha256(b'{"r": 8}', data)
    with pytest.raises(AdapterFormatError, match="limit"):
        file_sha256(b"{}", weights, max_bytes=len(data) - 1)
