"""Start the real `loraplex serve-cluster` (a local Ray instance) on a free port, inside a loopback-only namespace."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from server.deploy.netns import loopback_only
from tests.e2e.server_process import free_port

# Small settings: two replicas of the embedded model on a 2-core machine.
SMALL = ("--kv-cache-tokens", "2048", "--max-running", "4", "--max-queue", "16", "--max-loras", "4",
         "--max-cpu-loras", "4")
REPLICA_INFO = re.compile(r'loraplex_replica_info\{pid="(\d+)",replica="([^"]+)"\}')


def require_loopback_namespace() -> None:
    if not loopback_only():
        raise RuntimeError("a local Ray cluster may start only in a network namespace with loopback alone "
                           "(Ray talks over the external interface otherwise): run `make test-cluster`, or "
                           "`python -m server.deploy.netns python -m pytest -m cluster tests/cluster`")


def replica_pids(url: str) -> dict[str, int]:
    """replica id -> process id, from the merged metrics (every replica reports every 2 s)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {replica: int(pid) for pid, replica in REPLICA_INFO.findall(text)}


@contextmanager
def cluster_process(*flags: str, replicas: int = 2, extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
                    timeout: float = 300.0):
    """Yields (process, base URL) once every replica has reported; stops the cluster afterwards."""
    require_loopback_namespace()
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve-cluster", "--replicas", str(replicas), *extra, "--host", "127.0.0.1",
           "--port", str(port), *SMALL, *flags]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"loraplex-cluster-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cluster exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not up after {timeout} s:\n{log.read_text()[-4000:]}")
            try:
                if len(replica_pids(url)) >= replicas:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
