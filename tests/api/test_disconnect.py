"""A client that goes away cancels its engine requests, streamed or not (real uvicorn, fake engine)."""

from __future__ import annotations

import httpx
import pytest

from server.api.app import create_app
from tests.api.conftest import make_settings
from tests.api.fake_engine import BASE, FakeEngine
from tests.api.live_server import serve_in_thread, wait_until


@pytest.fixture(scope="module")
def live():
    engine = FakeEngine(delay=0.05, context=10_000)
    with serve_in_thread(create_app(engine, make_settings())) as url:
        yield engine, url


def test_streamed_request_is_aborted_when_the_client_leaves(live):
    engine, url = live
    body = {"model": "alpha", "prompt": "x", "max_tokens": 500, "stream": True, "n": 3}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    rid = engine.submitted[-1].request_id
    ids = [f"{rid}.{j}" for j in range(3)]  # the fake engine's stream ids, one per choice
    assert wait_until(lambda: all(i in engine.aborted for i in ids)), engine.aborted
    assert not engine.running & set(ids)


def test_chat_stream_aborted_too(live):
    engine, url = live
    body = {"model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=10) as response:
        next(line for line in response.iter_lines() if '"content":" ' in line)
    rid = engine.submitted[-1].request_id
    assert wait_until(lambda: rid in engine.aborted)


def test_non_streamed_request_is_aborted_when_the_client_leaves(live):
    engine, url = live
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 500}, timeout=0.5)
    rid = engine.submitted[-1].request_id
    assert wait_until(lambda: rid in engine.aborted)
    assert rid not in engine.finished


def test_finished_requests_are_not_aborted(live):
    engine, url = live
    response = httpx.post(f"{url}/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 3,
                                                          "stream": True}, timeout=10)
    assert response.text.endswith("data: [DONE]\n\n")
    rid = engine.submitted[-1].request_id
    assert rid in engine.finished and rid not in engine.aborted
