"""The adapter store on disk: one PEFT folder per adapter, replaced atomically.

A write goes to a hidden temp folder whose files and the folder itself are fsynced, then it
is renamed into place and the store root is fsynced. Replacing an existing adapter renames
the old folder aside first (to a unique `.old-<name>-<random>` name, so a leftover of an
earlier crash never blocks a later overwrite). `recover()` at start-up finishes or undoes
every interrupted step, so a crash at any moment leaves the old adapter or the new one,
never a half-written folder. The store does no locking: the registry serialises work on
one name and never holds its own lock across these calls.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.adapters.fsutil import copy_synced, fsync_dir, write_synced
from server.adapters.names import CONFIG_FILE, CONTRACT_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

__all__ = ["AdapterStore", "CONFIG_FILE", "WEIGHTS_FILE"]

_OLD, _TMP = ".old-", ".tmp-"
_ASIDE = re.compile(r"(.+)-[0-9a-f]{8}")


class AdapterStore:
    shared = False  # True: other servers write this store too (see shared.py)

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held across a write (identity issued + folder renamed). One process: its name locks suffice."""
        yield

    @contextmanager
    def shared_lock(self) -> Iterator[None]:
        yield

    def folder(self, name: str) -> Path:
        return self.root / name

    def recover(self) -> list[str]:
        """Finish or undo interrupted writes and deletes; returns (and logs) what was done.

        - `.old-<name>-*` with no `<name>`: the replacement never landed, so the old folder is restored.
        - `.old-<name>-*` next to `<name>`: the replacement landed, the old copy is removed.
        - `.tmp-*` (a write or delete in progress) and stray temp files: removed.
        - a visible folder missing a file (half-written by something else): left for the scan to reject.
        """
        actions: list[str] = []
        if not self.root.is_dir():
            return actions
        for aside in sorted(self.root.glob(f"{_OLD}*")):
            name = _name_of_aside(aside.name)
            target = self.folder(name)
            if name and not target.exists() and _complete(aside):
                os.replace(aside, target)
                actions.append(f"restored {name} from {aside.name} (its replacement never landed)")
            else:
                _remove(aside)
                actions.append(f"removed {aside.name} (left over from a replace)")
        for temp in sorted(self.root.glob(f"{_TMP}*")):
            _remove(temp)
            actions.append(f"removed {temp.name} (an interrupted write or delete)")
        for stray in sorted(self.root.glob(".loraplex-registry.json.tmp")):
            stray.unlink(missing_ok=True)
            actions.append(f"removed {stray.name} (an interrupted state write)")
        if actions:
            fsync_dir(self.root)
        for action in actions:
            log.warning("adapter store recovery: %s", action)
        return actions

    def write(self, name: str, config_bytes: bytes, weights: bytes | Path, contract_bytes: bytes | None = None) -> Path:
        """Atomically create or replace adapter `name` (weights as bytes, or a file to copy, and an optional
        loraplex.json); returns its folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f"{_TMP}{name}-", dir=self.root))
        aside: Path | None = None
        try:
            write_synced(temp / CONFIG_FILE, config_bytes)
            if isinstance(weights, Path):
                copy_synced(weights, temp / WEIGHTS_FILE)
            else:
                write_synced(temp / WEIGHTS_FILE, weights)
            if contract_bytes is not None:
                write_synced(temp / CONTRACT_FILE, contract_bytes)
            fsync_dir(temp)
            fsync_dir(self.root)  # the temp folder's own entry
            target = self.folder(name)
            if target.exists():
                aside = self.root / f"{_OLD}{name}-{secrets.token_hex(4)}"
                os.replace(target, aside)
            os.replace(temp, target)
            fsync_dir(self.root)
            return target
        finally:
            if temp.exists():
                _remove(temp)
            if aside is not None:
                _remove(aside)

    def remove(self, name: str) -> None:
        """Delete adapter `name`: renamed aside first, so a crash never leaves half a folder."""
        target = self.folder(name)
        if not target.exists():
            return
        doomed = Path(tempfile.mkdtemp(prefix=f"{_TMP}deleted-{name}-", dir=self.root))
        os.replace(target, doomed / name)
        fsync_dir(self.root)
        _remove(doomed)


def _name_of_aside(folder_name: str) -> str:
    """`.old-<name>-<random>` (or the older `.old-<name>`) -> `<name>`."""
    body = folder_name.removeprefix(_OLD)
    match = _ASIDE.fullmatch(body)
    return match.group(1) if match else body


def _complete(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
