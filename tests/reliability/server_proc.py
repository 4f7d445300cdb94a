"""A real `python -m server.cli serve` subprocess on 127.0.0.1 that a suite can restart or kill -9.

Its stdout and stderr go to one log file, so a suite can read every line the server wrote
(the auth suite greps it for secrets). The store folder outlives restarts: crash safety
restarts the same process flags on the same store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from server.adapters.locks import CHECK_ENV
from tests.e2e.server_process import free_port, stop_process, wait_until_healthy

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "loraplex"
ADMIN = "rel-admin-token-5f2c9e"
KEY = "rel-api-key-81d04b"
BASE_NAME = "SmolLM2-135M-Instruct"


class ServerProcess:
    """One server: `start()`, `kill9()`, `restart()`, `stop()`; `rss_bytes()` from /proc/<pid>/status."""

    def __init__(self, store: Path, log: Path, *flags: str, admin: str | None = ADMIN, key: str | None = KEY) -> None:
        self.store, self.log, self.flags = store, log, list(flags)
        self.admin, self.key = admin, key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--adapters-dir", str(self.store), "--cache-dir", str(CACHE), "--device", "cpu", *self.flags]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
        env.setdefault("OMP_NUM_THREADS", "1")
        env[CHECK_ENV] = "1"  # every adapter lock checks the documented order (server/adapters/locks.py)
        if self.admin:
            env["LORAPLEX_ADMIN_TOKEN"] = self.admin
        if self.key:
            env["LORAPLEX_API_KEY"] = self.key
        return env

    def start(self, timeout: float = 240.0) -> float:
        """Start and wait for /ready; returns the seconds it took."""
        started = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                         env=self.environment())
        self.starts += 1
        wait_until_healthy(self.url, self.proc, timeout, self.log)
        return time.monotonic() - started

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL: no shutdown hook runs, as in a power cut of the process."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30)

    def restart(self, kill: bool = False) -> float:
        self.kill9() if kill else self.stop()
        return self.start()

    def rss_bytes(self) -> int:
        """Resident set size of the server process (VmRSS), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
