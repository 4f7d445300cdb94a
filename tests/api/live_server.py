"""Serve an app object with a real uvicorn in a background thread (for a fake engine, no subprocess)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import uvicorn

from tests.e2e.server_process import free_port


@contextmanager
def serve_in_thread(app, timeout: float = 20.0, **config):
    """`config`: more uvicorn.Config arguments (say, the server's own `http` protocol class)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()

