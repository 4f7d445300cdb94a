"""Worker threads at a lower CPU priority than inference, for work nobody waits on token by token.

On Linux a thread is its own scheduling entity, so a pool thread can raise its own `nice`
value: when cores are scarce the kernel then runs the generation loop and the event loop
first. Elsewhere this is a no-op. The work such pools run (file I/O, hashing, torch copies,
the tokenizer's Rust code) mostly releases the GIL, so a lower priority does not hold up
Python code in other threads.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


def lower_thread_priority(niceness: int) -> None:
    """Raise the calling thread's nice value by `niceness` (Linux; elsewhere a no-op)."""
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except OSError as exc:  # a sandbox may forbid it; the work still runs, at normal priority
        log.warning("could not lower a worker thread's priority: %s", exc)


def low_priority_pool(workers: int, name: str, niceness: int) -> ThreadPoolExecutor:
    """A thread pool whose threads run `niceness` levels below the process."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=lower_thread_priority,
                              initargs=(niceness,))
