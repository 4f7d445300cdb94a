"""Admin work runs on threads below the process's CPU priority; the caller's own priority is untouched."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from server.api.background import BackgroundPool


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_admin_pool_threads_run_niceness_levels_lower():
    before = own_nice()
    pool = BackgroundPool(workers=2, niceness=7)

    async def both() -> list[int]:
        return list(await asyncio.gather(pool.run(own_nice), pool.run(own_nice)))

    assert asyncio.run(both()) == [min(19, before + 7)] * 2
    assert own_nice() == before
    assert asyncio.run(BackgroundPool(workers=1, niceness=0).run(own_nice)) == before
