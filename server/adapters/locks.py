"""The adapter side's locks and the one order in which they are taken.

A thread that holds some of these locks takes only locks of a later rank; re-entering one it already
holds (the reentrant ones) is allowed, a second lock of the same rank is not:

  1. STORE_SYNC  `StoreSync`: one refresh of a shared store at a time
  2. STORE       the store's own lock (`AdapterStore.exclusive` across a write, `shared_lock` across a
                 sync: an flock on a shared store, nothing for a store of one server)
  3. NAME        one name's lock: an add, overwrite, contract change, delete, unload or reload of it
  4. REGISTRY    the registry's names -> records map and the records' load status
  5. TIER        the CPU tier's LRU of parsed weights (keyed by identity)
  6. STATE       the persisted counters (`RegistryState`, `.loraplex-registry.json`)

REGISTRY and TIER are never held across disk I/O, so the engine thread (which takes only TIER, or
REGISTRY then TIER) never waits on a store write; `on_retired` runs after every lock is released.

With LORAPLEX_CHECK_LOCK_ORDER=1 in the environment when a lock is made, it records what each thread
holds and raises `LockOrderError` (after logging it) on an acquisition out of this order; the
reliability suites run their server so. Otherwise the locks are plain `threading` ones: no cost.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

log = logging.getLogger(__name__)

STORE_SYNC, STORE, NAME, REGISTRY, TIER, STATE = 1, 2, 3, 4, 5, 6
RANK_NAMES = {STORE_SYNC: "STORE_SYNC", STORE: "STORE", NAME: "NAME", REGISTRY: "REGISTRY", TIER: "TIER",
              STATE: "STATE"}
CHECK_ENV = "LORAPLEX_CHECK_LOCK_ORDER"

_held = threading.local()  # .stack: (rank, identity) of every lock this thread holds, in acquisition order


class LockOrderError(RuntimeError):
    """A lock taken against the documented order: a possible deadlock."""


Lock = AbstractContextManager[Any]


def checking() -> bool:
    return os.environ.get(CHECK_ENV, "") not in ("", "0")


def ordered_lock(rank: int, reentrant: bool = False) -> Lock:
    """A lock of `rank`: a plain `threading` lock, or a checked one when checking is on."""
    lock = threading.RLock() if reentrant else threading.Lock()
    return _CheckedLock(rank, lock) if checking() else lock


def held(rank: int, guard: AbstractContextManager) -> AbstractContextManager:
    """`guard` (a lock that is not a `threading` one, such as the store's flock) entered at `rank`."""
    return _checked(rank, guard) if checking() else guard


@contextmanager
def _checked(rank: int, guard: AbstractContextManager) -> Iterator[None]:
    _check(rank, id(guard))  # before waiting on it: an out-of-order wait may never end
    with guard:
        _stack().append((rank, id(guard)))
        try:
            yield
        finally:
            _pop(id(guard))


class _CheckedLock:
    def __init__(self, rank: int, lock: threading.Lock | threading.RLock) -> None:
        self.rank = rank
        self._lock = lock

    def __enter__(self) -> _CheckedLock:
        _check(self.rank, id(self))
        self._lock.acquire()
        _stack().append((self.rank, id(self)))
        return self

    def __exit__(self, *exc: object) -> None:
        _pop(id(self))
        self._lock.release()


def _stack() -> list[tuple[int, int]]:
    if not hasattr(_held, "stack"):
        _held.stack = []
    return _held.stack


def _check(rank: int, identity: int) -> None:
    stack = _stack()
    if not stack or any(i == identity for _, i in stack):  # nothing held, or a reentrant lock taken again
        return
    top = max(r for r, _ in stack)
    if rank <= top:
        message = (f"lock order: {RANK_NAMES[rank]} taken while holding {RANK_NAMES[top]} "
                   f"(held: {', '.join(RANK_NAMES[r] for r, _ in stack)}); see server/adapters/locks.py")
        log.error("%s", message)
        raise LockOrderError(message)


def _pop(identity: int) -> None:
    stack = _stack()
    for index in range(len(stack) - 1, -1, -1):
        if stack[index][1] == identity:
            del stack[index]
            return
