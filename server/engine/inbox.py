"""The engine thread's inbox: the one way other threads reach sequences, KV blocks and device slots.

The event loop posts new requests ("add") and aborts ("abort"); the adapter registry posts the
identity of every version it retires ("evict"), whose device slot the engine thread frees once no
running sequence pins it. Built first, so that the adapter manager and the core both get it at
construction.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator


class Inbox:
    def __init__(self) -> None:
        self._messages: deque[tuple[str, object]] = deque()
        self._wake = threading.Event()

    def post(self, kind: str, payload: object) -> None:
        """Any thread: hand the engine thread a message and wake it."""
        self._messages.append((kind, payload))
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def wait(self, timeout: float) -> None:
        """The engine thread: sleep until a message comes or `timeout` seconds pass."""
        self._wake.wait(timeout=timeout)
        self._wake.clear()

    def take(self) -> Iterator[tuple[str, object]]:
        """The engine thread: every message posted so far, oldest first."""
        while self._messages:
            yield self._messages.popleft()

    def pending(self, kind: str) -> list[object]:
        """Any thread: the payloads of `kind` not taken yet."""
        return [payload for k, payload in list(self._messages) if k == kind]
