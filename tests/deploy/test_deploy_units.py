"""The cluster's pure parts, without Ray: model-id extraction, the ingress, relaying an app, merged metrics."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from pydantic import SecretStr

from server.config import Settings
from server.deploy.forwarding import ForwardedRequest, ResponseStart, run_app
from server.deploy.ingress import IngressApp
from server.deploy.metrics_merge import merge_metrics
from server.deploy.netns import interfaces, namespaced
from server.deploy.routing import multiplexed_model_id

BASE = "SmolLM2-135M-Instruct"


@pytest.mark.parametrize(("method", "path", "body", "expected"), [
    ("POST", "/v1/completions", {"model": "shout", "prompt": "x"}, "shout"),
    ("POST", "/v1/chat/completions", {"model": "shout@0123abcd", "messages": []}, "shout"),  # a pin routes by name
    ("POST", "/v1/completions", {"model": BASE, "prompt": "x"}, None),  # the base model: any replica
    ("POST", "/v1/completions", {"model": 7}, None),
    ("POST", "/v1/completions", ["not", "an", "object"], None),
    ("POST", "/v1/adapters", {"model": "shout"}, None),  # admin: any replica
    ("GET", "/v1/models", None, None),
])
def test_multiplexed_model_id(method, path, body, expected):
    raw = b"" if body is None else json.dumps(body).encode()
    assert multiplexed_model_id(method, path, raw, BASE) == expected
    assert multiplexed_model_id("POST", "/v1/completions", b"{not json", BASE) is None


def ingress(forward, **settings) -> httpx.AsyncClient:
    async def metrics() -> bytes:
        return b"m 1\n"

    async def base() -> str:
        return BASE

    app = IngressApp(Settings(**settings), forward, metrics, base)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress")


def test_ingress_routes_by_model_and_checks_keys_before_the_body():
    seen: list[tuple[str, str | None]] = []

    async def forward(request: ForwardedRequest, model_id: str | None):
        seen.append((request.path, model_id))
        yield ResponseStart(200, ((b"content-type", b"application/json"), (b"x-loraplex-replica", b"r1")))
        yield b'{"ok": true}'

    async def run() -> None:
        async with ingress(forward, api_key=SecretStr("k"), admin_token=SecretStr("t")) as client:
            missing = await client.post("/v1/completions", json={"model": "shout"})
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
            ok = await client.post("/v1/completions", json={"model": "shout"}, headers={"Authorization": "Bearer k"})
            assert ok.json() == {"ok": True} and ok.headers["x-loraplex-replica"] == "r1"
            wrong = await client.get("/v1/adapters", headers={"Authorization": "Bearer k"})
            assert wrong.status_code == 401
            big = await client.post("/v1/completions", content=b"x" * (8 * 2**20 + 1),
                                    headers={"Authorization": "Bearer k"})
            assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
            assert (await client.get("/health")).json() == {"status": "ok"}
    asyncio.run(run())
    assert seen == [("/v1/completions", "shout")]  # refused requests never reached a replica


def test_a_lost_replica_is_retried_then_answered_503():
    calls = 0

    async def dying(request: ForwardedRequest, model_id: str | None):
        nonlocal calls
        calls += 1
        raise ConnectionError("replica died")
        yield  # pragma: no cover - makes this an async generator

    async def run() -> httpx.Response:
        async with ingress(dying) as client:
            return await client.post("/v1/completions", json={"model": "shout"})
    response = asyncio.run(run())
    assert response.status_code == 503 and response.json()["error"]["code"] == "replica_unavailable"
    assert response.headers["retry-after"] == "1" and calls == 4  # the first try and 3 retries


def test_run_app_relays_a_stream_and_adds_the_replica_header():
    app = FastAPI()

    @app.post("/stream")
    async def stream():
        async def events():
            for i in range(3):
                yield f"data: {i}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def run() -> list:
        request = ForwardedRequest("POST", "/stream", headers=((b"content-type", b"application/json"),), body=b"{}")
        return [item async for item in run_app(app, request, ((b"x-loraplex-replica", b"r9"),))]
    items = asyncio.run(run())
    assert isinstance(items[0], ResponseStart) and items[0].status == 200
    assert (b"x-loraplex-replica", b"r9") in items[0].headers
    assert b"".join(items[1:]) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_metrics_of_every_replica_merge_under_one_family():
    def text(value: int) -> str:
        registry = CollectorRegistry()
        Counter("loraplex_requests", "requests", ["model"], registry=registry).labels("shout").inc(value)
        return generate_latest(registry).decode()
    merged = merge_metrics({"r1": text(1), "r2": text(2)}).decode()
    assert merged.count("# TYPE loraplex_requests_total counter") == 1
    assert 'loraplex_requests_total{model="shout",replica="r1"} 1.0' in merged
    assert 'loraplex_requests_total{model="shout",replica="r2"} 2.0' in merged


def test_network_namespace_helpers():
    assert "lo" in interfaces()
    command = namespaced(["python", "-V"])
    assert command[0] == "unshare" and "--net" in command and command[-2:] == ["python", "-V"]
