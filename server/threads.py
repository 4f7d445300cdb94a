"""Worker threads at a lower CPU priority than inference, and the one thread that may run torch on many cores.

On Linux a thread is its own scheduling entity, so a pool thread can raise its own `nice`
value: when cores are scarce the kernel then runs the generation loop and the event loop
first. Elsewhere this is a no-op. The work such pools run (file I/O, hashing, torch copies,
the tokenizer's Rust code) mostly releases the GIL, so a lower priority does not hold up
Python code in other threads.

Torch's intra-op parallelism (OpenMP) keeps a team of worker threads per calling thread for as
long as that thread lives. Once a process holds more such workers than it has cores, OpenMP
stops spinning between parallel regions and every small op of the engine pays a thread
wake-up: measured here, a decode step of 4 sequences on 4 adapters went from 89 to 107 ms
(base) and its LoRA share from 10 to 26 ms as soon as one other long-lived thread had run a
single multi-threaded matmul (a thread that ends takes its team with it). So the engine
thread is the only long-lived thread that runs torch (`use_torch_threads`); pools that may run
torch work run each task in a thread of its own (`FreshThreadPool`), and the model is loaded in
a thread that ends. (torch's thread count is process-wide, so it cannot be lowered per thread.)
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


def use_torch_threads(threads: int | None) -> int:
    """Give torch `threads` intra-op threads (None: keep torch's own count, which follows
    `OMP_NUM_THREADS` and defaults to the cores this process may use); returns the count.

    Called by the engine thread only: torch's thread count is one value for the whole process."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class FreshThreadPool(ThreadPoolExecutor):
    """A thread pool whose tasks each run in a new thread that ends with the task.

    The pool's own threads queue and bound the work as usual but never run it, so no long-lived
    thread but the engine's ever owns torch worker threads, whatever torch work a task does.
    A task's thread inherits its pool thread's priority (Linux threads inherit nice values).
    """

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(run_in_fresh_thread, fn, *args, **kwargs)


def run_in_fresh_thread(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a new thread that ends with the call; its result, or its exception raised here."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"{threading.current_thread().name}-task", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def low_priority_pool(workers: int, name: str, niceness: int) -> ThreadPoolExecutor:
    """A `FreshThreadPool` whose threads run `niceness` levels below the process."""
    return FreshThreadPool(max_workers=workers, thread_name_prefix=name, initializer=lower_thread_priority,
                           initargs=(niceness,))
