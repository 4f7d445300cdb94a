"""server/threads.py: pool tasks run in threads that end with them; the engine owns torch's thread count."""

from __future__ import annotations

import os
import threading

import pytest

from server.threads import FreshThreadPool, use_torch_threads


def test_fresh_thread_pool_runs_each_task_in_a_thread_that_ends():
    seen: list[threading.Thread] = []

    def task(value: int) -> int:
        seen.append(threading.current_thread())
        return value * 2

    with FreshThreadPool(max_workers=1, thread_name_prefix="t") as pool:
        assert [pool.submit(task, i).result() for i in range(3)] == [0, 2, 4]
    assert len({id(t) for t in seen}) == 3  # a new thread per task
    assert all(t.name.startswith("t") and t.name.endswith("-task") for t in seen)
    assert not any(t.is_alive() for t in seen)


def test_fresh_thread_pool_passes_errors_to_the_future():
    def boom() -> None:
        raise KeyError("nope")

    with FreshThreadPool(max_workers=1) as pool:
        with pytest.raises(KeyError, match="nope"):
            pool.submit(boom).result()


def test_use_torch_threads_sets_the_count():
    import torch

    before = torch.get_num_threads()
    try:
        assert use_torch_threads(1) == 1 and torch.get_num_threads() == 1
        assert use_torch_threads(None) == 1  # None keeps the count torch has (OMP_NUM_THREADS or every core)
        cores = len(os.sched_getaffinity(0))
        assert use_torch_threads(cores) == cores == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
