"""Adapter admin over HTTP against a fake engine: uploads (and every refusal), listing, deletion, vLLM aliases."""

from __future__ import annotations

import os

import pytest

from tests.api.archive_builders import CONFIG, SYMLINK, WEIGHTS, good_members, make_tar, make_zip, zip_entry
from tests.api.conftest import ADMIN_HEADERS
from tests.api.fake_engine import BASE


def upload(client, name="gamma", files=None, overwrite=None, **kwargs):
    data = {"name": name} if name is not None else {}
    if overwrite is not None:
        data["overwrite"] = overwrite
    if files is None:
        files = {"adapter_config.json": ("adapter_config.json", CONFIG),
                 "adapter_model.safetensors": ("adapter_model.safetensors", WEIGHTS)}
    return client.post("/v1/adapters", data=data, files=files, headers=kwargs.pop("headers", ADMIN_HEADERS), **kwargs)


def still_serving(client) -> None:
    response = client.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 1})
    assert response.status_code == 200


def test_upload_two_files(client, engine):
    response = upload(client)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] == "gamma" and body["object"] == "adapter" and body["parent"] == BASE
    assert body["version"] == 1 and body["status"] == "ready" and body["rank"] == 4
    assert engine.blobs["gamma"] == (CONFIG, WEIGHTS)
    assert "gamma" in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_file_parts_are_found_by_file_name_too(client, engine):
    files = [("file", ("adapter_config.json", CONFIG)), ("file", ("adapter_model.safetensors", WEIGHTS))]
    assert upload(client, files=files).status_code == 201
    assert engine.blobs["gamma"] == (CONFIG, WEIGHTS)


@pytest.mark.parametrize("archive", [make_zip(good_members("x/")), make_tar(good_members()),
                                     make_tar(good_members("d/"), gz=True)], ids=["zip", "tar", "tar.gz"])
def test_upload_archive(client, engine, archive):
    response = upload(client, files={"archive": ("adapter.bin.whatever", archive)})
    assert response.status_code == 201, response.text
    assert engine.blobs["gamma"] == (CONFIG, WEIGHTS)


def test_existing_name_is_409_unless_overwrite(client, engine):
    assert upload(client, name="alpha").status_code == 409
    response = upload(client, name="alpha", overwrite="true")
    assert response.status_code == 201 and response.json()["version"] == 2


def refused(client, engine, response, status: int, *words: str) -> dict:
    before = dict(engine.blobs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error["message"], error["message"]
    assert engine.blobs == before
    still_serving(client)
    return error


@pytest.mark.parametrize("name", ["", "a b", "../x", "x/y", "a" * 65, ".hidden", "..", "naïve", BASE, BASE.upper()])
def test_bad_names(client, engine, name):
    refused(client, engine, upload(client, name=name), 400, "name")


def test_missing_name_and_files(client, engine):
    refused(client, engine, upload(client, name=None), 400, "name")
    refused(client, engine, upload(client, files={"adapter_model.safetensors": ("w", WEIGHTS)}), 400,
            "adapter_config.json")
    refused(client, engine, upload(client, files={"adapter_config.json": ("c", CONFIG)}), 400,
            "adapter_model.safetensors")


def test_pickle_weights_are_refused_never_unpickled(client, engine):
    pickle_bytes = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."
    files = {"adapter_config.json": ("adapter_config.json", CONFIG), "adapter_model.bin": ("adapter_model.bin", pickle_bytes)}
    refused(client, engine, upload(client, files=files), 400, "pickle")
    disguised = {"adapter_config.json": ("adapter_config.json", CONFIG),
                 "adapter_model.safetensors": ("adapter_model.safetensors", pickle_bytes)}
    refused(client, engine, upload(client, files=disguised), 400, "pickle")
    torch_zip = make_zip([("archive/data.pkl", pickle_bytes)])
    disguised["adapter_model.safetensors"] = ("adapter_model.safetensors", torch_zip)
    refused(client, engine, upload(client, files=disguised), 400, "pickle")


def test_oversized_upload_is_413(client, engine):
    big = b"\0" * ((1 << 20) + 10)
    files = {"adapter_config.json": ("adapter_config.json", CONFIG), "adapter_model.safetensors": ("w", big)}
    refused(client, engine, upload(client, files=files), 413, "limit")


def test_oversized_content_length_is_refused_before_reading(client, engine):
    response = client.post("/v1/adapters", headers={**ADMIN_HEADERS, "Content-Type": "multipart/form-data; boundary=x",
                                                   "Content-Length": str(10 << 30)}, content=b"--x--")
    refused(client, engine, response, 413, "limit")


def test_hostile_archives(client, engine):
    traversal = make_zip([("../../adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS)])
    refused(client, engine, upload(client, files={"archive": ("a.zip", traversal)}), 400, "'..'")
    link = make_zip([zip_entry("adapter_config.json", SYMLINK, b"/etc/passwd"), ("adapter_model.safetensors", WEIGHTS)])
    refused(client, engine, upload(client, files={"archive": ("a.zip", link)}), 400, "link")
    bomb = make_tar([("adapter_config.json", CONFIG), ("adapter_model.safetensors", b"\0" * (16 << 20))], gz=True)
    refused(client, engine, upload(client, files={"archive": ("a.tgz", bomb)}), 413, "limit")
    both = {"archive": ("a.zip", make_zip(good_members())), "adapter_config.json": ("c", CONFIG)}
    refused(client, engine, upload(client, files=both), 400, "not both")


def test_engine_rejection_comes_back_as_400(client, engine):
    files = {"adapter_config.json": ("c", b'{"r": 64}'), "adapter_model.safetensors": ("w", WEIGHTS)}
    error = refused(client, engine, upload(client, files=files), 400, "rank 64")
    assert error["code"] == "invalid_adapter"


def test_unexpected_parts_and_bad_bodies(client, engine):
    refused(client, engine, upload(client, files={"notes.txt": ("notes.txt", b"x")}), 400, "unexpected file")
    refused(client, engine, client.post("/v1/adapters", data={"name": "g", "color": "red"}, headers=ADMIN_HEADERS,
                                        files={"adapter_config.json": ("c", CONFIG)}),
            400, "unexpected form field")
    refused(client, engine, client.post("/v1/adapters", json={"name": "g"}, headers=ADMIN_HEADERS), 415,
            "multipart")
    refused(client, engine, upload(client, overwrite="maybe"), 400, "overwrite")


def test_list_get_delete(client, engine):
    listing = client.get("/v1/adapters", headers=ADMIN_HEADERS).json()
    assert [a["id"] for a in listing["data"]] == ["alpha", "beta"]
    one = client.get("/v1/adapters/alpha", headers=ADMIN_HEADERS).json()
    assert set(one) >= {"rank", "alpha", "target_modules", "size_bytes", "version", "status", "error", "tier",
                        "requests", "tokens", "created"}
    assert client.get("/v1/adapters/nope", headers=ADMIN_HEADERS).status_code == 404
    assert client.delete("/v1/adapters/alpha", headers=ADMIN_HEADERS).json() == {
        "id": "alpha", "object": "adapter", "deleted": True}
    assert client.delete("/v1/adapters/alpha", headers=ADMIN_HEADERS).status_code == 404
    assert client.delete(f"/v1/adapters/{BASE}", headers=ADMIN_HEADERS).status_code == 400
    gone = client.post("/v1/completions", json={"model": "alpha", "prompt": "x"})
    assert gone.status_code == 404


def test_vllm_aliases(tmp_path, engine):
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from tests.api.conftest import make_settings

    root = tmp_path / "root"
    (root / "good").mkdir(parents=True)
    (root / "good" / "adapter_config.json").write_bytes(CONFIG)
    (root / "good" / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_config.json").write_bytes(CONFIG)
    (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04.")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_bytes(CONFIG)
    (outside / "adapter_model.safetensors").write_bytes(WEIGHTS)
    os.symlink(outside, root / "escape")
    (root / "linked").mkdir()
    (root / "linked" / "adapter_config.json").write_bytes(CONFIG)
    os.symlink(outside / "adapter_model.safetensors", root / "linked" / "adapter_model.safetensors")

    with TestClient(create_app(engine, make_settings(allowed_adapter_root=root))) as client:
        def load(name, path):
            return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                               headers=ADMIN_HEADERS)
        ok = load("good", root / "good")
        assert ok.status_code == 200 and "added successfully" in ok.text
        assert engine.blobs["good"] == (CONFIG, WEIGHTS)
        assert load("rel", "good").status_code == 200
        taken = load("good", "good")  # vLLM's status and the field that works
        assert taken.status_code == 400 and "'load_inplace' to true" in taken.json()["error"]["message"]
        inplace = client.post("/v1/load_lora_adapter", headers=ADMIN_HEADERS,
                              json={"lora_name": "good", "lora_path": "good", "load_inplace": True})
        assert inplace.status_code == 200 and engine.adapters["good"].version == 2
        for name, path, status, word in [("o", outside, 403, "outside"), ("e", root / "escape", 403, "outside"),
                                         ("t", f"{root}/good/../../outside", 403, "outside"),
                                         ("l", root / "linked", 400, "symbolic link"),
                                         ("p", root / "pickled", 400, "pickle"), ("m", root / "missing", 404, "no adapter"),
                                         ("../x", root / "good", 400, "name")]:
            response = load(name, path)
            assert response.status_code == status, (name, response.text)
            assert word in response.json()["error"]["message"]
        assert "o" not in engine.blobs and "e" not in engine.blobs
        unloaded = client.post("/v1/unload_lora_adapter", json={"lora_name": "good"}, headers=ADMIN_HEADERS)
        assert unloaded.status_code == 200 and "good" not in engine.adapters
        missing = client.post("/v1/unload_lora_adapter", json={"lora_name": "good"}, headers=ADMIN_HEADERS)
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "The lora adapter 'good' cannot be found."


def test_load_by_path_needs_a_configured_root(client):
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}, headers=ADMIN_HEADERS)
    assert response.status_code == 403 and "LORAPLEX_ALLOWED_ADAPTER_ROOT" in response.json()["error"]["message"]
