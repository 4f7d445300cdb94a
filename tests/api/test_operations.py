"""Metrics, the request log line, the OpenAPI document, and the torch-free import of the app."""

from __future__ import annotations

import logging
import subprocess
import sys

from prometheus_client import REGISTRY

from server.api.app import create_app
from tests.api.conftest import ADMIN_HEADERS, make_settings
from tests.api.fake_engine import BASE, FakeEngine


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
    raise AssertionError(f"no {name} {labels} in metrics")


def test_app_import_is_torch_free():
    code = "import server.api.app, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metrics_text(client, engine):
    client.post("/v1/completions", json={"model": "alpha", "prompt": "a b c", "max_tokens": 4})
    client.post("/v1/completions", json={"model": BASE, "prompt": "a", "max_tokens": 2, "stream": True})
    client.post("/v1/completions", json={"model": "nope", "prompt": "a"})
    text = client.get("/metrics").text
    assert metric(text, "loraplex_requests_total", model="alpha") == 1
    assert metric(text, "loraplex_prompt_tokens_total", model="alpha") == 3
    assert metric(text, "loraplex_generation_tokens_total", model="alpha") == 4
    assert metric(text, "loraplex_generation_tokens_total", model=BASE) == 2
    assert metric(text, "loraplex_http_requests_total", route="/v1/completions", status="200") == 2
    assert metric(text, "loraplex_http_errors_total", status="404") == 1
    assert metric(text, "loraplex_time_to_first_token_seconds_count") == 2
    assert metric(text, "loraplex_time_per_output_token_seconds_count") == 2
    assert metric(text, "loraplex_queue_waiting") == 0
    assert metric(text, "loraplex_kv_cache_usage_ratio") == 0.25
    assert metric(text, "loraplex_preemptions_total") == 5
    assert metric(text, "loraplex_adapters_resident", tier="device") == 1
    assert metric(text, "loraplex_adapter_info", adapter="alpha", tier="disk", status="ready", version="1") == 1
    assert metric(text, "loraplex_adapter_requests_total", adapter="alpha") == 1
    assert "nope" not in text  # unknown names never become label values


def test_metrics_registry_is_per_app():
    a, b = create_app(FakeEngine(), make_settings()), create_app(FakeEngine(), make_settings())
    assert a.state.metrics.registry is not b.state.metrics.registry
    assert "loraplex_requests_total" not in {m.name for m in REGISTRY.collect()}


def test_admin_operations_are_counted(client):
    client.delete("/v1/adapters/alpha", headers=ADMIN_HEADERS)
    client.delete("/v1/adapters/alpha", headers=ADMIN_HEADERS)
    text = client.get("/metrics").text
    assert metric(text, "loraplex_adapter_admin_operations_total", operation="delete", outcome="ok") == 1
    assert metric(text, "loraplex_adapter_admin_operations_total", operation="delete", outcome="404") == 1


def test_one_log_line_per_request_without_prompt_text(client, caplog):
    caplog.set_level(logging.INFO, logger="server.api.access")
    secret_prompt = "my very private prompt"
    client.post("/v1/completions", json={"model": "alpha", "prompt": secret_prompt, "max_tokens": 2},
                headers={"X-Request-Id": "req-1"})
    lines = [r.getMessage() for r in caplog.records if r.name == "server.api.access"]
    assert len(lines) == 1
    line = lines[0]
    for part in ("id=req-1", "route=/v1/completions", "model=alpha", "status=200", "prompt_tokens=4",
                 "completion_tokens=2", "ttft_ms=", "duration_ms="):
        assert part in line, line
    assert "private" not in caplog.text and ".0.1" not in caplog.text  # neither prompt nor completion


def test_openapi_describes_every_route():
    schema = create_app(FakeEngine(), make_settings()).openapi()
    paths = schema["paths"]
    for path, method in [("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get"),
                         ("/v1/adapters", "post"), ("/v1/adapters", "get"), ("/v1/adapters/{name}", "get"),
                         ("/v1/adapters/{name}", "delete"), ("/v1/load_lora_adapter", "post"),
                         ("/v1/unload_lora_adapter", "post"), ("/health", "get"), ("/ready", "get"),
                         ("/metrics", "get")]:
        assert method in paths[path], (path, method)
    upload = paths["/v1/adapters"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"name", "overwrite", "archive", "adapter_config.json", "adapter_model.safetensors"} <= set(upload["properties"])
    completion = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"max_tokens", "top_k", "seed", "stop", "n", "logprobs", "stream_options"} <= set(completion)
    assert "429" in paths["/v1/completions"]["post"]["responses"]
    chat_200 = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat_200["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    assert "text/event-stream" in chat_200
