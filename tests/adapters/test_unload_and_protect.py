"""Unload keeps an adapter's files and survives a restart; shipped folders in the default store are read-only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from server.adapters.layout import BaseLayout
from server.adapters.names import CONFIG_FILE, WEIGHTS_FILE
from server.adapters.registry import AdapterProtected, AdapterRegistry
from server.adapters.store import AdapterStore


def registry(root: Path, layout: BaseLayout, protect_found: bool = False) -> AdapterRegistry:
    return AdapterRegistry(AdapterStore(root), layout, max_rank=16, max_cpu_loras=4, protect_found=protect_found)


def files(folder: Path) -> tuple[bytes, Path]:
    return (folder / CONFIG_FILE).read_bytes(), folder / WEIGHTS_FILE


def shipped_store(root: Path, *folders: tuple[str, Path]) -> Path:
    """A store holding folders copied in by hand (as a checkout's adapters/ holds the shipped ones)."""
    for name, folder in folders:
        shutil.copytree(folder, root / name)
    return root


def test_unload_keeps_the_files_and_a_restart_keeps_it_unloaded(make_adapter, layout, tmp_path):
    folder, _ = make_adapter()
    root = tmp_path / "store"
    reg = registry(root, layout)
    first = reg.add_file("task", *files(folder))
    assert reg.unload("task") is first and first.deleted
    assert reg.get("task") is None and (root / "task" / WEIGHTS_FILE).is_file()
    assert reg.unload("task") is None
    reg.close()

    again = registry(root, layout)  # a restart does not register it silently
    assert again.scan() == {} and again.get("task") is None
    back = again.reload("task")
    assert back.sha256 == first.sha256 and back.generation > first.generation and back.version == first.version + 1
    again.close()
    third = registry(root, layout)
    third.scan()
    assert third.get("task").key == back.key  # loaded again: registered at the next start


def test_shipped_folders_are_read_only_in_the_default_store(make_adapter, layout, tmp_path):
    shipped, _ = make_adapter()
    other, _ = make_adapter()
    root = shipped_store(tmp_path / "adapters", ("shipped", shipped))
    reg = registry(root, layout, protect_found=True)
    assert reg.scan() == {}
    for refused in (lambda: reg.remove("shipped"), lambda: reg.add_file("shipped", *files(other), overwrite=True)):
        with pytest.raises(AdapterProtected, match="--adapters-dir"):
            refused()
    assert reg.get("shipped") is not None and files(root / "shipped")[0] == files(shipped)[0]
    reg.unload("shipped")  # unloading never touches the files
    with pytest.raises(AdapterProtected):
        reg.add_file("shipped", *files(other))  # the name is free, the folder is not
    assert reg.reload("shipped").name == "shipped"
    uploaded = reg.add_file("mine", *files(other))  # what the server wrote it may delete, even after a restart
    reg.close()
    again = registry(root, layout, protect_found=True)
    assert again.scan() == {} and again.get("mine").key == uploaded.key
    assert again.remove("mine") is not None and not (root / "mine").exists()
    with pytest.raises(AdapterProtected):
        again.remove("shipped")


def test_an_explicit_store_may_change_every_folder(make_adapter, layout, tmp_path):
    shipped, _ = make_adapter()
    root = shipped_store(tmp_path / "mine", ("shipped", shipped))
    reg = registry(root, layout, protect_found=False)
    reg.scan()
    assert reg.remove("shipped") is not None and not (root / "shipped").exists()
