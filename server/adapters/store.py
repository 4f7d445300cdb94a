"""The adapter store on disk: one PEFT folder per adapter, replaced atomically.

A write goes to a hidden temp folder, is fsynced, then renamed into place. Replacing an
existing adapter renames the old folder aside first; `recover()` at start-up finishes or
undoes an interrupted replace, so a crash at any moment leaves the old adapter or the new
one, never a half-written folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, name: str) -> Path:
        return self.root / name

    def recover(self) -> None:
        """Finish interrupted writes: restore an old folder whose replacement never landed."""
        if not self.root.is_dir():
            return
        for aside in self.root.glob(".old-*"):
            name = aside.name.removeprefix(".old-")
            if self.folder(name).exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(aside, self.folder(name))
        for temp in self.root.glob(".tmp-*"):
            shutil.rmtree(temp, ignore_errors=True)

    def write(self, name: str, config_bytes: bytes, weights_bytes: bytes) -> Path:
        """Atomically create or replace adapter `name`; returns its folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            _write_synced(temp / CONFIG_FILE, config_bytes)
            _write_synced(temp / WEIGHTS_FILE, weights_bytes)
            target, aside = self.folder(name), self.root / f".old-{name}"
            if target.exists():
                os.replace(target, aside)
            os.replace(temp, target)
            _fsync_dir(self.root)
            shutil.rmtree(aside, ignore_errors=True)
            return target
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Delete adapter `name`: renamed aside first, so a crash never leaves half a folder."""
        target = self.folder(name)
        if not target.exists():
            return
        doomed = Path(tempfile.mkdtemp(prefix=f".tmp-deleted-{name}-", dir=self.root))
        os.replace(target, doomed / name)
        shutil.rmtree(doomed, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
