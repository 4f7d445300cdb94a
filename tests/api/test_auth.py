"""Bearer auth: API key on inference routes, admin token on admin routes, keys never logged."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.auth import token_matches
from tests.api.archive_builders import CONFIG, WEIGHTS
from tests.api.conftest import ADMIN, KEY, make_settings
from tests.api.fake_engine import BASE, FakeEngine

INFERENCE = [("POST", "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 1}),
             ("POST", "/v1/chat/completions", {"model": BASE, "max_tokens": 1,
                                               "messages": [{"role": "user", "content": "x"}]}),
             ("GET", "/v1/models", None)]
ADMIN_ROUTES = [("GET", "/v1/adapters", None), ("GET", "/v1/adapters/alpha", None),
                ("DELETE", "/v1/adapters/beta", None),
                ("POST", "/v1/unload_lora_adapter", {"lora_name": "beta"}),
                ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"})]


def call(client, method, path, body, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.request(method, path, json=body, headers=headers)


@pytest.fixture
def locked():
    engine = FakeEngine()
    with TestClient(create_app(engine, make_settings(api_key=KEY))) as client:
        yield client, engine


@pytest.mark.parametrize("method, path, body", INFERENCE)
def test_inference_needs_the_key(locked, method, path, body):
    client, _ = locked
    for token in (None, "wrong", ADMIN, KEY + "x", ""):
        response = call(client, method, path, body, token)
        assert response.status_code == 401, (token, response.text)
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    assert call(client, method, path, body, KEY).status_code == 200
    response = client.request(method, path, json=body, headers={"Authorization": f"Basic {KEY}"})
    assert response.status_code == 401


def test_health_ready_metrics_stay_open(locked):
    client, _ = locked
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert client.get(path).status_code == 200


@pytest.mark.parametrize("method, path, body", ADMIN_ROUTES)
def test_admin_needs_the_admin_token(locked, method, path, body):
    client, _ = locked
    for token in (None, "wrong", KEY):
        response = call(client, method, path, body, token)
        assert response.status_code == 401, (token, response.text)
    assert call(client, method, path, body, ADMIN).status_code in (200, 403)  # 403: no allowed root for load


def test_upload_auth_is_checked_before_the_body_is_read(locked):
    client, engine = locked
    files = {"adapter_config.json": ("c", CONFIG), "adapter_model.safetensors": ("w", WEIGHTS)}
    for token in (None, "wrong", KEY):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = client.post("/v1/adapters", data={"name": "gamma"}, files=files, headers=headers)
        assert response.status_code == 401
    assert "gamma" not in engine.adapters
    response = client.post("/v1/adapters", data={"name": "gamma"}, files=files,
                           headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 201 and "gamma" in engine.adapters


@pytest.mark.parametrize("method, path, body", ADMIN_ROUTES + [("POST", "/v1/adapters", None)])
def test_admin_disabled_without_a_token_says_how_to_enable(method, path, body):
    with TestClient(create_app(FakeEngine(), make_settings(admin_token=None))) as client:
        for token in (None, "anything", ""):
            response = call(client, method, path, body, token)
            assert response.status_code == 403
            assert "LORAPLEX_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_inference_is_open_without_an_api_key(client):
    assert call(client, *INFERENCE[0]).status_code == 200


def test_empty_env_values_leave_auth_unset():
    settings = make_settings(api_key="", admin_token="  ")
    assert settings.api_key is None and settings.admin_token is None


def test_keys_are_never_logged_or_shown(caplog):
    settings = make_settings(api_key=KEY)
    assert KEY not in repr(settings) and ADMIN not in repr(settings) and ADMIN not in str(settings.model_dump())
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(FakeEngine(), settings)) as client:
        call(client, *INFERENCE[0], token=KEY)
        call(client, *INFERENCE[0], token="wrong-guess")
        call(client, "GET", "/v1/adapters", None, token=ADMIN)
    assert caplog.records
    assert all(s not in caplog.text for s in (KEY, ADMIN, "wrong-guess"))


def test_constant_time_compare_handles_unicode():
    from pydantic import SecretStr
    assert token_matches("é", SecretStr("é")) and not token_matches("e", SecretStr("é"))
    assert not token_matches(None, SecretStr("x"))
