"""A 200 MB upload (limit 256 MB) streams through a real server process with bounded memory.

The server's peak resident memory (VmHWM) may grow by a few chunks and the parser, never by
the upload's size: the body goes to a temporary file as it arrives, and the temporary file
is gone afterwards.
"""

from __future__ import annotations

import json
import signal
import time

import httpx

from tests.api.conftest import ADMIN_HEADERS
from tests.api.test_lifecycle_process import fake_server, wait_for

UPLOAD_BYTES = 200 * 2**20
CHUNK = 1 << 20
MAX_GROWTH = 64 * 2**20


def memory_kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def body_parts(boundary: str):
    config = json.dumps({"r": 4, "lora_alpha": 8}).encode()
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"adapter_config.json\"; "
            f"filename=\"adapter_config.json\"\r\n\r\n").encode() + config + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"; "
            f"filename=\"adapter_model.safetensors\"\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head, tail


def test_200mb_upload_keeps_server_memory_flat(tmp_path):
    head, tail = body_parts("bound")
    total = len(head) + UPLOAD_BYTES + len(tail)

    def chunks():
        yield head
        block = b"\x01" * CHUNK
        for _ in range(UPLOAD_BYTES // CHUNK):
            yield block
        yield tail

    with fake_server(tmp_path) as (proc, url, log):
        wait_for(url, proc, "/ready", 200)
        before = memory_kib(proc.pid, "VmRSS") * 1024
        started = time.monotonic()
        response = httpx.post(url + "/v1/adapters", content=chunks(), timeout=300, headers={
            **ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=bound", "Content-Length": str(total)})
        seconds = time.monotonic() - started
        peak = memory_kib(proc.pid, "VmHWM") * 1024
        assert response.status_code == 201, response.text
        assert response.json()["size_bytes"] == len(b"sha256:") + 64  # the fake engine kept a digest only
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    growth = peak - before
    print(f"200 MB upload: {seconds:.1f} s, server RSS before {before / 2**20:.0f} MiB, "
          f"peak {peak / 2**20:.0f} MiB (+{growth / 2**20:.0f} MiB)")
    assert growth < MAX_GROWTH
    assert list((tmp_path / "uploads").iterdir()) == []
