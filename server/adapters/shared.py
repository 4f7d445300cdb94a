"""One adapter store shared by many servers (cluster replicas): a cross-process lock and a change counter.

Every server reads and writes the same store folder (a local disk, NFS or a cloud file system).
Two files in the store root make that safe and cheap:

- `.loraplex-store.lock`: writers (upload, overwrite, delete, start-up recovery) hold an
  exclusive `flock` on it across issuing the identity in `.loraplex-registry.json` and renaming
  the folder into place; a server that syncs its registry holds a shared lock, so it always sees
  the state file and the folders of one moment. (NFS: Linux maps `flock` to NFS byte-range locks.)
- `.loraplex-store-generation`: a counter every writer bumps, last, before its lock is released.
  Each request reads it (one small open + read: unlike a `stat`, an `open` revalidates on NFS,
  which caches attributes for seconds); only when it moved does the server re-read the state
  file and re-register the names whose generation changed. So once an upload, overwrite or
  delete has returned, the next request on any server sees it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.adapters.fsutil import fsync_dir
from server.adapters.store import AdapterStore

LOCK_FILE = ".loraplex-store.lock"
GENERATION_FILE = ".loraplex-store-generation"


class SharedAdapterStore(AdapterStore):
    """The disk store, with writes serialised across processes and announced in the generation file."""

    shared = True

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lock_path = root / LOCK_FILE
        self.generation_path = root / GENERATION_FILE

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the store for a write; the generation is bumped when the block ends without an error."""
        with self._flock(fcntl.LOCK_EX):
            yield
            self._write_generation(self.generation() + 1)

    @contextmanager
    def shared_lock(self) -> Iterator[None]:
        """No writer changes the store while this is held (readers do not block each other)."""
        with self._flock(fcntl.LOCK_SH):
            yield

    def generation(self) -> int:
        """The store's change counter now (0 before the first write)."""
        try:
            with open(self.generation_path, "rb") as handle:
                return int(handle.read() or b"0")
        except FileNotFoundError:
            return 0
        except ValueError:
            return -1  # never a counter's value: a torn or foreign file makes every reader sync

    @contextmanager
    def _flock(self, mode: int) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        # A new open file description per acquisition: flock then excludes threads of this process too.
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_generation(self, value: int) -> None:
        temp = self.generation_path.with_name(self.generation_path.name + ".tmp")
        with open(temp, "wb") as handle:
            handle.write(str(value).encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.generation_path)
        fsync_dir(self.root)
