"""Start-up and graceful shutdown of a real server process (the real serving path, the fake engine).

What a deployment sees: the port is bound before the model loads (`/health` 200, `/ready`
503 meanwhile); on SIGTERM `/ready` and new requests get 503 while running streams finish;
the process exits 0; an upload cut off by the end of the grace period leaves no file behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import ADMIN
from tests.e2e.server_process import free_port

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def fake_server(tmp_path: Path, **env: str):
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "LORAPLEX_UPLOAD_TMP_DIR": str(tmp_path / "uploads"),
                   **env}
    (tmp_path / "uploads").mkdir(exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.api.fake_server_main", str(port)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=environment)
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def wait_for(url: str, proc: subprocess.Popen, path: str, status: int, timeout: float = 30.0) -> float:
    """Seconds until `path` answers `status`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            if httpx.get(url + path, timeout=1.0).status_code == status:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{path} never answered {status}")


def test_listens_before_the_model_loads(tmp_path):
    with fake_server(tmp_path, FAKE_LOAD_SECONDS="3") as (proc, url, _):
        wait_for(url, proc, "/health", 200, timeout=15)
        ready = httpx.get(url + "/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "engine_not_ready"
        assert int(ready.headers["retry-after"]) >= 1
        early = httpx.post(url + "/v1/completions", json={"model": "base-model", "prompt": "x"})
        assert early.status_code == 503 and early.json()["error"]["code"] == "engine_not_ready"
        wait_for(url, proc, "/ready", 200, timeout=15)
        assert httpx.post(url + "/v1/completions", json={"model": "base-model", "prompt": "x"}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_port_in_use_is_reported_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "in use" in result.stderr
    assert "Loading" not in result.stderr and "engine ready" not in result.stderr  # no model was loaded first
    assert elapsed < 45  # interpreter start-up only (generous: the test machines are shared)


def stream_lines(url: str, body: dict, lines: list[str], first: threading.Event) -> None:
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line:
                lines.append(line)
                first.set()


def test_sigterm_lets_running_streams_finish_and_exits_0(tmp_path):
    with fake_server(tmp_path, FAKE_TOKEN_DELAY="0.05", LORAPLEX_SHUTDOWN_GRACE="20") as (proc, url, log):
        wait_for(url, proc, "/ready", 200)
        lines: list[str] = []
        first = threading.Event()
        body = {"model": "alpha", "prompt": "x", "max_tokens": 60, "stream": True}  # about 3 s of tokens
        client = threading.Thread(target=stream_lines, args=(url, body, lines, first))
        client.start()
        assert first.wait(10)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(url + "/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
        refused = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "x"}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"] == "1"
        assert proc.poll() is None  # still draining while the stream runs
        client.join(timeout=30)
        assert proc.wait(timeout=15) == 0, log.read_text()[-2000:]
    assert lines[-1] == "data: [DONE]"
    assert sum('"text":" alpha' in line for line in lines) == 60


def test_grace_over_cuts_off_and_still_exits_0(tmp_path):
    with fake_server(tmp_path, FAKE_TOKEN_DELAY="0.05", LORAPLEX_SHUTDOWN_GRACE="1") as (proc, url, _):
        wait_for(url, proc, "/ready", 200)
        lines: list[str] = []
        first = threading.Event()
        body = {"model": "alpha", "prompt": "x", "max_tokens": 2000, "stream": True}  # 100 s of tokens
        client = threading.Thread(target=stream_lines_quietly, args=(url, body, lines, first))
        client.start()
        assert first.wait(10)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 6
        client.join(timeout=10)
    assert "data: [DONE]" not in lines


def stream_lines_quietly(*args) -> None:
    try:
        stream_lines(*args)
    except httpx.HTTPError:
        pass


def multipart_head(boundary: str, total: int) -> bytes:
    return (f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total}\r\n\r\n").encode()


def test_upload_cut_off_at_shutdown_leaves_no_trace(tmp_path):
    with fake_server(tmp_path, LORAPLEX_SHUTDOWN_GRACE="1", LORAPLEX_UPLOAD_READ_TIMEOUT="60") as (proc, url, _):
        wait_for(url, proc, "/ready", 200)
        port = int(url.rsplit(":", 1)[1])
        part = (b"--b\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\ngamma\r\n"
                b"--b\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"; "
                b"filename=\"adapter_model.safetensors\"\r\n\r\n" + b"\0" * 1_200_000)  # > one parser batch
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(multipart_head("b", 3_000_000) + part)  # then nothing more: the upload hangs
            uploads = tmp_path / "uploads"
            deadline = time.monotonic() + 10
            while not any(uploads.rglob("part-*")) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert any(uploads.rglob("part-*")), "the upload never reached its temporary file"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        assert list(uploads.iterdir()) == []


def test_uvicorn_limits_from_the_settings(tmp_path):
    """The request-head limit and the keep-alive timeout come from the settings."""
    env = {"LORAPLEX_MAX_HEADER_BYTES": "4096", "LORAPLEX_KEEP_ALIVE_TIMEOUT": "1"}
    with fake_server(tmp_path, **env) as (proc, url, _):
        wait_for(url, proc, "/ready", 200)
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            # The limit holds for heads still incomplete: a slow client sending an endless header.
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000)
            assert sock.recv(100).startswith(b"HTTP/1.1 431")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while b'{"status":"ok"}' not in answer:
                answer += sock.recv(1000)
            assert answer.startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            assert sock.recv(100) == b""  # closed by the server once idle for the keep-alive timeout
            assert 0.5 < time.monotonic() - started < 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
