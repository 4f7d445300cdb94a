"""Fixtures of the HTTP layer's tests: a fake engine behind the real app."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import Settings
from tests.api.fake_engine import FakeEngine

ADMIN = "admin-secret-token"
KEY = "inference-key"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def make_settings(**overrides) -> Settings:
    values = {"admin_token": ADMIN, "api_key": None, "max_adapter_bytes": 1 << 20, **overrides}
    return Settings(**values)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine):
    with TestClient(create_app(engine, make_settings()), raise_server_exceptions=False) as test_client:
        yield test_client
