"""docs/api.md's admin examples: the `openai` SDK's generic get/post/delete reach the admin routes."""

from __future__ import annotations

from openai import OpenAI, PermissionDeniedError

from server.api.app import create_app
from tests.api.archive_builders import CONFIG, WEIGHTS
from tests.api.conftest import ADMIN, make_settings
from tests.api.fake_engine import FakeEngine
from tests.api.live_server import serve_in_thread


def test_openai_sdk_generic_calls_reach_admin_routes():
    engine = FakeEngine()
    with serve_in_thread(create_app(engine, make_settings())) as url:
        admin = OpenAI(base_url=f"{url}/v1", api_key=ADMIN, max_retries=0)
        created = admin.post("/adapters", cast_to=object, body={"name": "mine"},
                             files=[("adapter_config.json", ("adapter_config.json", CONFIG)),
                                    ("adapter_model.safetensors", ("adapter_model.safetensors", WEIGHTS))],
                             options={"headers": {"Content-Type": "multipart/form-data"}})
        assert created["id"] == "mine" and engine.blobs["mine"] == (CONFIG, WEIGHTS)
        assert [a["id"] for a in admin.get("/adapters", cast_to=object)["data"]] == ["alpha", "beta", "mine"]
        assert admin.get("/adapters/mine", cast_to=object)["rank"] == 4
        assert admin.delete("/adapters/mine", cast_to=object)["deleted"] is True
        assert "removed" in admin.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "alpha"})
        assert [m.id for m in admin.models.list().data] == ["base-model", "beta"]

    with serve_in_thread(create_app(FakeEngine(), make_settings(admin_token=None))) as url:
        try:
            OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).get("/adapters", cast_to=object)
        except PermissionDeniedError as exc:
            assert "LORAPLEX_ADMIN_TOKEN" in exc.message
        else:
            raise AssertionError("admin routes must be disabled without an admin token")
