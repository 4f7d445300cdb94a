"""Hostile and slow clients over real HTTP (uvicorn in a thread, fake engine).

Auth is decided from the headers alone, before any body is read; uploads are bounded in
parts, concurrency and time; a client that stops sending is dropped; temporary files are
gone after every upload, accepted or refused.
"""

from __future__ import annotations

import json
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from server.api.app import create_app
from server.api.http_protocol import bounded_protocol
from server.api.uploads import MAX_PARTS
from tests.api.archive_builders import CONFIG, WEIGHTS
from tests.api.conftest import ADMIN, ADMIN_HEADERS, KEY, make_settings
from tests.api.fake_engine import BASE, FakeEngine
from tests.api.live_server import serve_in_thread, wait_until


@contextmanager
def live(tmp_path: Path, engine: FakeEngine | None = None, **settings):
    engine = engine or FakeEngine(context=100_000)
    uploads = tmp_path / "uploads"
    uploads.mkdir(exist_ok=True)
    app = create_app(engine, make_settings(upload_tmp_dir=uploads, **settings))
    with serve_in_thread(app) as url:
        yield engine, url, int(url.rsplit(":", 1)[1]), app


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 5.0) -> tuple[bytes, float]:
    """Send `head` (and `body`), then read the answer; (response bytes, seconds until the first byte)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout)
        started = time.monotonic()
        sock.sendall(head.encode() + body)
        data = sock.recv(65536)
        elapsed = time.monotonic() - started
        while chunk := _recv(sock):
            data += chunk
    return data, elapsed


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except (TimeoutError, ConnectionResetError):
        return b""


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


HUGE = 10**9


@pytest.mark.parametrize("path, token, status", [
    ("/v1/completions", None, 401), ("/v1/completions", "wrong", 401), ("/v1/chat/completions", None, 401),
    ("/v1/adapters", None, 401), ("/v1/adapters", KEY, 401), ("/v1/load_lora_adapter", "nope", 401),
])
def test_refused_before_the_body_is_read(tmp_path, path, token, status):
    """Headers announce a gigabyte and no body follows: the refusal comes at once, body unread."""
    with live(tmp_path, api_key=KEY) as (_, _, port, _):
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
                f"Content-Length: {HUGE}\r\n\r\n")
        response, seconds = raw_request(port, head)
    assert status_of(response) == status, response[:300]
    assert seconds < 1.0
    error = body_of(response)["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert (token or "") not in error["message"] or not token


def test_admin_disabled_is_403_before_the_body(tmp_path):
    with live(tmp_path, admin_token=None) as (_, _, port, _):
        head = (f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
                f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {HUGE}\r\n\r\n")
        response, seconds = raw_request(port, head)
    assert status_of(response) == 403 and seconds < 1.0
    assert body_of(response)["error"]["code"] == "admin_disabled"


def test_keys_never_reach_the_log(tmp_path, caplog):
    with caplog.at_level("DEBUG"), live(tmp_path, api_key=KEY) as (_, url, _, _):
        httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "x"},
                   headers={"Authorization": "Bearer a-wrong-key-xyz"})
        httpx.get(url + "/v1/adapters", headers={"Authorization": f"Bearer {KEY}"})
        httpx.get(url + "/v1/adapters", headers=ADMIN_HEADERS)
    text = caplog.text
    assert "a-wrong-key-xyz" not in text and KEY not in text and ADMIN not in text


def multipart(fields: dict[str, str], files: dict[str, bytes], boundary: str = "bound") -> bytes:
    out = b""
    for name, value in fields.items():
        out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
    for name, data in files.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def upload_head(length: int, boundary: str = "bound") -> str:
    return (f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n")


def test_upload_temp_files_are_removed_after_success_and_failure(tmp_path):
    with live(tmp_path) as (engine, url, _, _):
        files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}
        ok = httpx.post(url + "/v1/adapters", content=multipart({"name": "gamma"}, files), headers={
            **ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=bound"})
        assert ok.status_code == 201, ok.text
        assert engine.blobs["gamma"] == (CONFIG, WEIGHTS)
        assert engine.weights_paths and not engine.weights_paths[-1].exists()
        taken = httpx.post(url + "/v1/adapters", content=multipart({"name": "gamma"}, files), headers={
            **ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=bound"})
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "adapter_exists"
        bad = httpx.post(url + "/v1/adapters", content=multipart({"name": "../x"}, files), headers={
            **ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=bound"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_adapter_name"
        assert list((tmp_path / "uploads").iterdir()) == []


def test_adapter_objects_show_identity(tmp_path):
    with live(tmp_path) as (engine, url, _, _):
        info = httpx.get(url + "/v1/adapters/alpha", headers=ADMIN_HEADERS).json()
        assert info["sha256"] == engine.adapters["alpha"].sha256 and len(info["sha256"]) == 64
        assert info["generation"] >= 1 and info["version"] == 1
        models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert models["alpha"]["sha256"] == info["sha256"] and models["alpha"]["version"] == 1
        assert models[BASE]["sha256"] is None
        pinned = httpx.post(url + "/v1/completions", json={"model": f"alpha@{info['sha256'][:8]}", "prompt": "x"})
        assert pinned.status_code == 200, pinned.text
        stale = httpx.post(url + "/v1/completions", json={"model": "alpha@00000000", "prompt": "x"})
        assert stale.status_code == 409 and stale.json()["error"]["code"] == "adapter_version_mismatch"


def test_too_many_parts_is_400(tmp_path):
    with live(tmp_path) as (_, url, _, _):
        body = b"".join(f"--bound\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\ng{i}\r\n".encode()
                        for i in range(5000)) + b"--bound--\r\n"
        started = time.monotonic()
        response = httpx.post(url + "/v1/adapters", content=body, headers={
            **ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=bound"})
        assert time.monotonic() - started < 5
    assert response.status_code == 400
    assert "sent twice" in response.json()["error"]["message"] or str(MAX_PARTS) in response.json()["error"]["message"]


def test_too_many_file_parts_is_400(tmp_path):
    with live(tmp_path) as (_, url, _, _):
        body = b"".join(f"--bound\r\nContent-Disposition: form-data; name=\"f{i}\"; filename=\"x{i}\"\r\n\r\nx\r\n"
                        .encode() for i in range(3000)) + b"--bound--\r\n"
        response = httpx.post(url + "/v1/adapters", content=body, headers={
            **ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=bound"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_upload"


def test_huge_part_headers_are_400(tmp_path):
    with live(tmp_path) as (_, url, _, _):
        body = (b"--bound\r\nContent-Disposition: form-data; name=\"name\"\r\nX-Pad: " + b"a" * 100_000 +
                b"\r\n\r\ngamma\r\n--bound--\r\n")
        response = httpx.post(url + "/v1/adapters", content=body, headers={
            **ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=bound"})
    assert response.status_code == 400 and "header" in response.json()["error"]["message"].lower()


def test_concurrent_uploads_beyond_the_bound_get_429(tmp_path):
    with live(tmp_path, max_concurrent_uploads=2, upload_read_timeout=20) as (engine, url, port, _):
        partial = multipart({"name": "slow"}, {"adapter_model.safetensors": b"\0" * 1000})[:-40]
        holders = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            for sock in holders:
                sock.sendall(upload_head(len(partial) + 10_000).encode() + partial)  # never finished
            time.sleep(0.5)
            files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}
            third = httpx.post(url + "/v1/adapters", content=multipart({"name": "third"}, files), headers={
                **ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=bound"})
            assert third.status_code == 429, third.text
            assert int(third.headers["retry-after"]) >= 1
            assert third.json()["error"]["type"] == "rate_limit_error"
            # Inference is not held up by the stuck uploads.
            assert httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "x"}).status_code == 200
        finally:
            for sock in holders:
                sock.close()
        # The slots come back once the stuck uploads end (here: their clients went away).
        def fourth() -> bool:
            response = httpx.post(url + "/v1/adapters", content=multipart({"name": "fourth"}, files), headers={
                **ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=bound"})
            return response.status_code == 201
        assert wait_until(fourth, timeout=10)
        assert wait_until(lambda: list((tmp_path / "uploads").iterdir()) == [], timeout=5)


def test_silent_upload_is_dropped_after_the_read_timeout(tmp_path):
    with live(tmp_path, upload_read_timeout=1.0) as (_, _, port, _):
        partial = multipart({"name": "slow"}, {"adapter_model.safetensors": b"\0" * 5000})[:-40]
        response, seconds = raw_request(port, upload_head(len(partial) + 10_000) + "", partial, timeout=10)
        assert status_of(response) == 408, response[:300]
        assert 0.9 < seconds < 5
        assert body_of(response)["error"]["code"] == "request_timeout"
        assert b"connection: close" in response.lower()
        assert list((tmp_path / "uploads").iterdir()) == []


def test_slow_json_body_is_dropped_after_the_read_timeout(tmp_path):
    with live(tmp_path, body_read_timeout=1.0) as (_, _, port, _):
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        response, seconds = raw_request(port, head, b'{"model": ', timeout=10)
    assert status_of(response) == 408 and 0.9 < seconds < 5


def test_prompt_over_the_character_limit_is_400_before_the_engine(tmp_path):
    with live(tmp_path, max_prompt_chars=1000) as (engine, url, _, _):
        response = httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": ["a" * 600, "b" * 600]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
        chat = httpx.post(url + "/v1/chat/completions", json={"model": BASE, "messages": [
            {"role": "user", "content": "c" * 1001}]})
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded"
        assert engine.submitted == []


def test_not_loaded_yet_and_shutting_down(tmp_path):
    with live(tmp_path) as (engine, url, _, app):
        app.state.engine = None
        assert httpx.get(url + "/health").status_code == 200
        for response in (httpx.get(url + "/ready"), httpx.get(url + "/v1/models"),
                         httpx.get(url + "/v1/adapters", headers=ADMIN_HEADERS)):
            assert response.status_code == 503 and response.json()["error"]["code"] == "engine_not_ready"
            assert int(response.headers["retry-after"]) >= 1
        assert httpx.get(url + "/metrics").status_code == 200
        app.state.engine = engine
        app.state.lifecycle.shutting_down = True
        ready = httpx.get(url + "/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
        for response in (httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "x"}),
                         httpx.post(url + "/v1/adapters", content=b"x", headers={
                             **ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=b"})):
            assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
            assert response.headers["retry-after"] == "1"
        assert httpx.get(url + "/v1/models").status_code == 200  # reads still answer while draining


def test_engine_shutting_down_error_is_503_with_retry_after(tmp_path):
    with live(tmp_path) as (engine, url, _, _):
        engine.begin_shutdown()
        response = httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "x"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert response.headers["retry-after"] == "1"


def test_request_head_over_the_limit_is_431_and_closed(tmp_path):
    """An endless header is cut off at --max-header-bytes; a small head with a large body is not."""
    app = create_app(FakeEngine(context=100_000), make_settings())
    with serve_in_thread(app, http=bounded_protocol(4096)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(5)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            try:
                for _ in range(64):
                    sock.sendall(b"a" * 1024)
                    time.sleep(0.005)
            except OSError:
                pass  # the server closed the connection: what we want
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
            assert b"headers_too_large" in answer
        body = {"model": BASE, "prompt": "x " * 20_000, "max_tokens": 1}  # 40 KB body, 10x the head limit
        response = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200, response.text
        assert httpx.get(f"{url}/health").status_code == 200
