"""Start the real `loraplex serve` (uvicorn) on a free port, as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(*flags: str, env: dict[str, str] | None = None, timeout: float = 180.0):
    """Yields the base URL of a server started with `flags`; stops it afterwards."""
    with server_process(*flags, env=env, timeout=timeout) as (_, url, _):
        yield url


@contextmanager
def server_process(*flags: str, env: dict[str, str] | None = None, timeout: float = 180.0):
    """Yields (process, base URL, log file) of a ready server; stops it afterwards if still running."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"loraplex-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, timeout, log)
        yield proc, url, log
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, grace: float = 40.0) -> None:
    """SIGTERM (the server drains), then SIGKILL after `grace` seconds; a no-op if it has exited."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Until `/ready` is 200: the server listens at once (`/health`) and loads the model behind it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server not healthy after {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")
