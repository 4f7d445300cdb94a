"""Adapters uploaded over HTTP are back after a restart: the registry is rebuilt from the store."""

from __future__ import annotations

import httpx
import pytest

from tests.api.archive_builders import make_tar
from tests.api.real_fixtures import ADMIN, BASE_NAME, fresh_base, save_adapter
from tests.conftest import TEST_CACHE
from tests.e2e.server_process import running_server

pytestmark = pytest.mark.slow

HEADERS = {"Authorization": f"Bearer {ADMIN}"}
BODY = {"model": "kappa", "prompt": "My favourite colour is", "max_tokens": 12, "temperature": 0}


@pytest.mark.full
def test_uploaded_adapter_survives_restart(tmp_path):
    base = fresh_base()
    folder = save_adapter(base.model, tmp_path / "kappa", 7, r=8, lora_alpha=16, target_modules="all-linear")
    del base
    archive = make_tar([(p.name, p.read_bytes()) for p in sorted(folder.iterdir())], gz=True)
    store = tmp_path / "store"
    flags = ["--adapters-dir", str(store), "--cache-dir", str(TEST_CACHE), "--device", "cpu"]
    env = {"LORAPLEX_ADMIN_TOKEN": ADMIN}
    with running_server(*flags, env=env) as url:
        response = httpx.post(f"{url}/v1/adapters", headers=HEADERS, data={"name": "kappa"},
                              files={"archive": ("kappa.tar.gz", archive)}, timeout=60)
        assert response.status_code == 201, response.text
        before = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]
        base_text = httpx.post(f"{url}/v1/completions", json={**BODY, "model": BASE_NAME}, timeout=60).json()
        assert before != base_text["choices"][0]["text"]
    with running_server(*flags, env=env) as url:
        assert "kappa" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        info = httpx.get(f"{url}/v1/adapters/kappa", headers=HEADERS).json()
        assert info["rank"] == 8 and info["status"] in ("ready", "loading")
        after = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]
        assert after == before
