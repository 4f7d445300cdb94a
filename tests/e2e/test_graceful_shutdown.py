"""SIGTERM on the real `loraplex serve` with the default model: the running stream completes,
`/ready` and new requests get 503 meanwhile, and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import TEST_CACHE
from tests.e2e.server_process import server_process

pytestmark = pytest.mark.slow

PROMPT = "The three most useful things to pack for a hike are"


@pytest.mark.full
def test_sigterm_during_a_stream(tmp_path):
    flags = ["--adapters-dir", str(tmp_path / "store"), "--cache-dir", str(TEST_CACHE), "--device", "cpu",
             "--shutdown-grace", "60"]
    with server_process(*flags, env={"OMP_NUM_THREADS": "1"}) as (proc, url, log):
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        lines: list[str] = []
        first = threading.Event()

        def stream() -> None:
            body = {"model": model, "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        client = threading.Thread(target=stream)
        client.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        ready = httpx.get(f"{url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
        late = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        client.join(timeout=120)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["usage"]["completion_tokens"] == 48  # the whole stream, not cut off
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
