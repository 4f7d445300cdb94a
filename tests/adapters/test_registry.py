"""Registry and store: a rejected adapter registers nothing and leaves the store as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.layout import BaseLayout
from server.adapters.names import AdapterNameError
from server.adapters.peft_format import AdapterFormatError
from server.adapters.registry import AdapterExists, AdapterRegistry
from server.adapters.store import AdapterStore


def tamper_nan(folder: Path) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")


def tamper_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def tamper_pickle(folder: Path) -> None:
    os.replace(folder / "adapter_model.safetensors", folder / "adapter_model.bin")


TAMPERS = {
    "nan": (tamper_nan, "nan"),
    "dora": (lambda f: tamper_config(f, use_dora=True), "dora"),
    "rank": (lambda f: tamper_config(f, r=128, lora_alpha=8), "rank"),
    "pickle": (tamper_pickle, "pickle"),
    "target": (lambda f: tamper_config(f, target_modules=["not_a_module"]), "not_a_module"),
}


def registry(root: Path, layout: BaseLayout) -> AdapterRegistry:
    return AdapterRegistry(AdapterStore(root), layout, max_rank=16, max_cpu_loras=4)


@pytest.mark.parametrize("case", TAMPERS)
def test_rejected_folder_registers_nothing(case, make_adapter, layout, tmp_path):
    folder, _ = make_adapter()
    tamper, word = TAMPERS[case]
    tamper(folder)
    reg = registry(tmp_path / "store", layout)
    with pytest.raises(AdapterFormatError, match=f"(?i){word}"):
        reg.register_folder("bad", folder)
    assert reg.records() == []


def test_rejected_upload_leaves_store_unchanged(make_adapter, layout, tmp_path):
    good, _ = make_adapter()
    reg = registry(tmp_path / "store", layout)
    config, weights = (good / "adapter_config.json").read_bytes(), (good / "adapter_model.safetensors").read_bytes()
    first = reg.add("task", config, weights)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file()}
    with pytest.raises(AdapterFormatError):
        reg.add("task", config, weights[: len(weights) // 2], overwrite=True)  # truncated
    with pytest.raises(AdapterExists):
        reg.add("task", config, weights)  # no overwrite
    with pytest.raises(AdapterNameError, match="invalid adapter name"):
        reg.add("../escape", config, weights)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file()}
    assert after == before and reg.get("task") is first


def test_overwrite_makes_a_new_version_and_old_record_is_superseded(make_adapter, layout, tmp_path):
    one, _ = make_adapter()
    two, _ = make_adapter()
    reg = registry(tmp_path / "store", layout)
    read = lambda f: ((f / "adapter_config.json").read_bytes(), (f / "adapter_model.safetensors").read_bytes())
    v1 = reg.add("task", *read(one))
    v2 = reg.add("task", *read(two), overwrite=True)
    assert (v1.version, v2.version) == (1, 2) and v1.deleted and not v2.deleted
    assert not reg.in_cpu(v1) and reg.in_cpu(v2)
    stored = load_file(tmp_path / "store" / "task" / "adapter_model.safetensors")
    assert all(torch.equal(t, load_file(two / "adapter_model.safetensors")[k]) for k, t in stored.items())


def test_store_recovers_an_interrupted_replace(make_adapter, layout, tmp_path):
    good, _ = make_adapter()
    root = tmp_path / "store"
    root.mkdir()
    # A crash after the old folder was renamed aside and before the new one landed.
    os.rename(good, root / ".old-task")
    (root / ".tmp-task-123").mkdir()
    reg = registry(root, layout)
    assert reg.scan() == {}
    assert [r.name for r in reg.records()] == ["task"]
    assert sorted(p.name for p in root.iterdir()) == [".loraplex-registry.json", "task"]
