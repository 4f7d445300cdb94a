"""The secret settings, listed once (`config.SECRET_FIELDS`): never passed to cluster replicas as arguments,
exported to their environment instead, and never shown back in a settings error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.cli import settings_error
from server.config import SECRET_FIELDS, Settings
from server.deploy.cluster import export_secrets, replica_overrides


def test_the_secret_fields_are_the_keys():
    assert SECRET_FIELDS == ("api_key", "admin_token")


def test_replicas_get_no_secrets_and_absolute_paths(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = replica_overrides({"api_key": "k", "admin_token": "t", "host": "0.0.0.0", "port": 9,
                             "adapters_dir": "store", "max_loras": 4})
    assert not set(out) & {*SECRET_FIELDS, "host", "port"}
    assert out["adapters_dir"] == str(tmp_path / "store") and out["max_loras"] == 4


def test_secrets_travel_in_the_environment(monkeypatch):
    for name in SECRET_FIELDS:  # set first, so that the test's own values are undone afterwards
        monkeypatch.setenv(f"LORAPLEX_{name.upper()}", "")
        monkeypatch.delenv(f"LORAPLEX_{name.upper()}")
    export_secrets(Settings(api_key="key-1", admin_token="token-2"))
    assert os.environ["LORAPLEX_API_KEY"] == "key-1" and os.environ["LORAPLEX_ADMIN_TOKEN"] == "token-2"


def test_a_settings_error_never_shows_a_secret():
    with pytest.raises(ValidationError) as caught:
        Settings(api_key=["not-a-string-secret"], port="eighty")
    text = settings_error(caught.value)
    assert "not-a-string-secret" not in text and "--api-key (LORAPLEX_API_KEY) = ***" in text
    assert "--port (LORAPLEX_PORT) = 'eighty'" in text
