"""One real server for every reliability suite (its start-up dominates the short form's time).

Flags are small on purpose: 4 device slots and 8 CPU-tier adapters so churn evicts, and a
queue of 8 behind 8 running sequences so a burst overflows it.
"""

from __future__ import annotations

import httpx
import pytest

from tests.reliability.server_proc import ServerProcess

QUEUE = 8
RUNNING = 8
SERVER_FLAGS = ("--max-loras", "4", "--max-cpu-loras", "8", "--max-running", str(RUNNING), "--max-queue", str(QUEUE),
                "--max-lora-rank", "16")


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    root = tmp_path_factory.mktemp("reliability")
    proc = ServerProcess(root / "store", root / "server.log", *SERVER_FLAGS)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> httpx.Client:
    if not server.alive():
        server.start()
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http
