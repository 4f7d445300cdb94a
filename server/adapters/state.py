"""The registry's persisted counters: `.loraplex-registry.json` in the store root.

Holds the generation counter (only grows) and, per name, the last version handed out, the
identity of the version on disk, whether the server wrote that folder (`written`: an upload or a
load, as opposed to a folder found in the store) and whether it was unloaded (`unloaded`: its
files stay, but the start-up scan leaves it out), so versions never restart at 1 after a delete
or a restart, an unchanged folder keeps its identity across restarts, and an unloaded adapter
stays unloaded. Written atomically (temp file,
fsync, rename, fsync of the folder). A hidden file: the store scan ignores it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from server.adapters.fsutil import fsync_dir
from server.adapters.locks import STATE, ordered_lock

log = logging.getLogger(__name__)

STATE_FILE = ".loraplex-registry.json"


@dataclass(frozen=True)
class Issued:
    """What the state hands a new version."""

    generation: int
    version: int


class RegistryState:
    """Thread-safe counters; `issue` and `forget` persist before they return."""

    def __init__(self, root: Path, shared: bool = False) -> None:
        self.path = root / STATE_FILE
        # shared: other processes write this file too (under the store's lock), so every change
        # starts from the file, not from this process's copy.
        self.shared = shared
        self._lock = ordered_lock(STATE)
        self.generation = 0
        self.names: dict[str, dict] = {}  # name -> {"version": int, "generation": int|None, "sha256": str|None}
        self._read()

    def issue(self, name: str, sha256: str, written: bool | None = None) -> Issued:
        """A new generation and the next version of `name`, persisted; registered again (not unloaded).
        `written`: whether the server wrote the folder (None keeps what is recorded)."""
        with self._lock:
            self._reread()
            self.generation += 1
            entry = self.names.setdefault(name, {"version": 0})
            entry.update(version=entry["version"] + 1, generation=self.generation, sha256=sha256)
            entry.pop("unloaded", None)
            if written is not None:
                entry["written"] = written
            issued = Issued(self.generation, entry["version"])
            self._write()
            return issued

    def known(self, name: str, sha256: str) -> Issued | None:
        """The identity recorded for `name` if its stored bytes are still `sha256` (a restart)."""
        with self._lock:
            self._reread()
            entry = self.names.get(name)
            if entry and entry.get("sha256") == sha256 and entry.get("generation"):
                return Issued(entry["generation"], entry["version"])
            return None

    def forget(self, name: str) -> None:
        """`name` is deleted: keep its version counter, drop its identity."""
        with self._lock:
            self._reread()
            entry = self.names.get(name)
            if entry is not None:
                entry.update(generation=None, sha256=None)
                entry.pop("unloaded", None)
                entry.pop("written", None)
                self._write()

    def mark_unloaded(self, name: str) -> None:
        """`name` is unregistered but its files stay: a restart must not register it again. Its identity is
        dropped, so loading it again issues a new generation (a device slot of the old one may still drain)."""
        with self._lock:
            entry = self.names.setdefault(name, {"version": 0})
            entry.update(generation=None, sha256=None, unloaded=True)
            self._write()

    def unloaded(self, name: str) -> bool:
        with self._lock:
            return bool(self.names.get(name, {}).get("unloaded"))

    def written(self, name: str) -> bool:
        """Whether the server itself wrote `name`'s folder (an upload or a load by path)."""
        with self._lock:
            return bool(self.names.get(name, {}).get("written"))

    def entries(self) -> tuple[int, dict[str, dict]]:
        """(generation, name -> entry) as the file holds them now (shared stores: what other processes wrote)."""
        with self._lock:
            self._reread()
            return self.generation, {name: dict(entry) for name, entry in self.names.items()}

    def _reread(self) -> None:
        if self.shared:
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            self.generation = int(data["generation"])
            self.names = {str(k): dict(v) for k, v in data.get("names", {}).items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("registry state %s is unreadable (%s); starting counters from 0", self.path, exc)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(self.path.name + ".tmp")
        with open(temp, "w") as handle:
            json.dump({"generation": self.generation, "names": self.names}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)
        fsync_dir(self.path.parent)
