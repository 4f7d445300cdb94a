"""Admin work off the event loop, at a lower CPU priority than inference (`server/threads.py`).

Uploads, adapter validation, hashing, store writes and deletes are CPU- and disk-heavy (a
200 MB upload is parsed, hashed, checked for NaN/Inf and fsynced) but nobody waits on them
token by token, so when cores are scarce they yield to the streams in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from server.threads import low_priority_pool

T = TypeVar("T")


class BackgroundPool:
    """`await pool.run(func, *args)` runs `func` on a low-priority worker thread."""

    def __init__(self, workers: int, niceness: int) -> None:
        self._executor = low_priority_pool(workers, "loraplex-admin", niceness)

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)
