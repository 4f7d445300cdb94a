"""The real server (`loraplex serve`, uvicorn, the default model) over real HTTP, with httpx and the
official `openai` SDK; every text is checked against an in-process engine's own greedy output."""

from __future__ import annotations

import asyncio
import json
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import APIStatusError, AsyncOpenAI, AuthenticationError, NotFoundError, OpenAI

from tests.api.archive_builders import make_tar, tar_member
from tests.api.real_fixtures import (ADAPTERS, ADMIN, BASE_NAME, KEY, MAX_ADAPTER_BYTES, Oracle, adapter_files,
                                     edited_config, edited_weights, fresh_base, identity_hash, save_adapter,
                                     store_snapshot, zipped)
from tests.conftest import TEST_CACHE
from tests.e2e.server_process import running_server

pytestmark = pytest.mark.slow

PROMPT = "The three most useful things to pack for a hike are"
MESSAGES = [{"role": "user", "content": "Name a good name for a cat."}]
TOKENS = 10
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
KEY_HEADERS = {"Authorization": f"Bearer {KEY}"}


@dataclass
class World:
    url: str
    store: Path
    uploads: Path
    root: Path
    oracle: Oracle


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("api-real")
    base = fresh_base()
    store, uploads, root = scratch / "store", scratch / "uploads", scratch / "root"
    for name, (seed, lora) in ADAPTERS.items():
        save_adapter(base.model, store / name, seed, **lora)
    save_adapter(base.model, uploads / "delta", 4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    save_adapter(base.model, uploads / "rank32", 5, r=32, lora_alpha=32, target_modules=["q_proj"])
    save_adapter(base.model, root / "epsilon", 6, r=4, lora_alpha=4, target_modules=["v_proj"])
    del base
    oracle = Oracle(store, scratch)
    flags = ["--adapters-dir", str(store), "--cache-dir", str(TEST_CACHE), "--device", "cpu",
             "--max-adapter-bytes", str(MAX_ADAPTER_BYTES), "--allowed-adapter-root", str(root)]
    try:
        with running_server(*flags, env={"LORAPLEX_ADMIN_TOKEN": ADMIN, "LORAPLEX_API_KEY": KEY}) as url:
            assert httpx.get(f"{url}/ready").status_code == 200
            yield World(url, store, uploads, root, oracle)
    finally:
        oracle.stop()


def sync_client(world: World) -> OpenAI:
    return OpenAI(base_url=f"{world.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def expected_texts(world: World, models: list[str], tokens: int = TOKENS) -> tuple[dict, dict]:
    texts = world.oracle.greedy([(m, PROMPT, tokens) for m in models] + [(m, MESSAGES, tokens) for m in models])
    return dict(zip(models, texts[:len(models)])), dict(zip(models, texts[len(models):]))


def test_models_lists_base_and_adapters(world):
    models = sync_client(world).models.list().data
    assert [m.id for m in models][0] == BASE_NAME
    assert {m.id for m in models} >= {BASE_NAME, *ADAPTERS}


def test_openai_sdk_sync_completions_and_chat(world):
    client = sync_client(world)
    models = ["alpha", BASE_NAME]
    completions, chats = expected_texts(world, models)
    assert len(set(completions.values())) == len(models)  # the adapter changes the output
    for model in models:
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
        assert out.choices[0].text == completions[model] and out.model == model
        assert out.usage.completion_tokens == TOKENS and out.choices[0].finish_reason == "length"
        streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == completions[model]
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS, temperature=0)
        assert chat.choices[0].message.content == chats[model] and chat.choices[0].message.role == "assistant"
        chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chats[model]
        assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


@pytest.mark.full
def test_openai_sdk_async_completions_and_chat(world):
    models = ["beta", "gamma", BASE_NAME]
    completions, chats = expected_texts(world, models)

    async def one(client: AsyncOpenAI, model: str) -> tuple[str, str, str]:
        out = await client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
        chat = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS, temperature=0)
        text = ""
        async for chunk in await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS,
                                                                temperature=0, stream=True):
            text += chunk.choices[0].delta.content or ""
        return out.choices[0].text, chat.choices[0].message.content, text

    async def run():
        async with AsyncOpenAI(base_url=f"{world.url}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, m) for m in models))

    for model, (text, chat, streamed_chat) in zip(models, asyncio.run(run())):
        assert text == completions[model], model
        assert chat == streamed_chat == chats[model], model


def test_sampling_fields_over_http(world):
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 6, "temperature": 0.9, "top_p": 0.95, "top_k": 40,
            "seed": 123, "n": 2, "logprobs": 2, "presence_penalty": 0.1, "frequency_penalty": 0.1}
    first = httpx.post(f"{world.url}/v1/completions", json=body, headers=KEY_HEADERS, timeout=120).json()
    again = httpx.post(f"{world.url}/v1/completions", json=body, headers=KEY_HEADERS, timeout=120).json()
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]  # seeded
    lp = first["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    # vLLM's semantics: the 2 most likely, plus the sampled token when it is not among them
    assert all(len(top) <= 3 and tok in top for tok, top in zip(lp["tokens"], lp["top_logprobs"]))
    assert all(x <= 0 for x in lp["token_logprobs"])
    stop = httpx.post(f"{world.url}/v1/completions", headers=KEY_HEADERS, timeout=120, json={
        "model": BASE_NAME, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "stop": [" "]}).json()
    assert " " not in stop["choices"][0]["text"] and stop["choices"][0]["finish_reason"] == "stop"


def test_errors_over_http(world):
    client = sync_client(world)
    with pytest.raises(NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(APIStatusError) as long_prompt:
        client.completions.create(model=BASE_NAME, prompt="word " * 9000, max_tokens=2)
    assert long_prompt.value.status_code == 400 and "context" in long_prompt.value.message
    with pytest.raises(APIStatusError) as negative:
        client.completions.create(model=BASE_NAME, prompt="x", max_tokens=-3)
    assert negative.value.status_code == 400 and negative.value.body["param"] == "max_tokens"


def test_compositions_over_http(world):
    client = sync_client(world)
    mix = "alpha*0.6+gamma*0.4"
    want = expected_texts(world, [mix])[0][mix]
    out = client.completions.create(model=mix, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert out.choices[0].text == want and out.model == mix
    with pytest.raises(NotFoundError) as missing:
        client.completions.create(model="alpha*0.5+nope*0.5", prompt="x", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found" and "nope" in missing.value.message
    for bad in ("alpha*0+gamma", "alpha*x", "+".join(["alpha"] * 9), "alpha*0.5+beta*0.5"):  # beta: rank 16 + 8
        with pytest.raises(APIStatusError) as refused:
            client.chat.completions.create(model=bad, messages=MESSAGES, max_tokens=2)
        assert refused.value.status_code == 400 and refused.value.body["type"] == "invalid_request_error", bad


@pytest.mark.parametrize("token", [None, "wrong", ADMIN])
def test_inference_auth_refuses(world, token):
    if token is not None:
        client = OpenAI(base_url=f"{world.url}/v1", api_key=token, max_retries=0)
        with pytest.raises(AuthenticationError):
            client.completions.create(model=BASE_NAME, prompt="x", max_tokens=1)
    response = httpx.post(f"{world.url}/v1/completions", json={"model": BASE_NAME, "prompt": "x", "max_tokens": 1},
                          headers={"Authorization": f"Bearer {token}"} if token else {})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    assert httpx.get(f"{world.url}/v1/models", headers=headers).status_code == 401


@pytest.mark.parametrize("token", [None, "wrong", KEY])
def test_admin_auth_refuses(world, token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    assert httpx.get(f"{world.url}/v1/adapters", headers=headers).status_code == 401
    config, weights = adapter_files(world.uploads / "delta")
    response = httpx.post(f"{world.url}/v1/adapters", headers=headers, data={"name": "sneaky"},
                          files={"adapter_config.json": config, "adapter_model.safetensors": weights})
    assert response.status_code == 401 and not (world.store / "sneaky").exists()


def test_identity_is_shown_and_pinnable(world):
    """`sha256` is the contract's hash of the exact bytes; `name@prefix` serves only that version."""
    expected = identity_hash(*adapter_files(world.store / "alpha"))
    info = httpx.get(f"{world.url}/v1/adapters/alpha", headers=ADMIN_HEADERS).json()
    assert info["sha256"] == expected and info["generation"] >= 1
    models = {m["id"]: m for m in httpx.get(f"{world.url}/v1/models", headers=KEY_HEADERS).json()["data"]}
    assert models["alpha"]["sha256"] == expected and models[BASE_NAME]["sha256"] is None
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    pinned = httpx.post(f"{world.url}/v1/completions", headers=KEY_HEADERS, timeout=60,
                        json={**body, "model": f"alpha@{expected[:12]}"})
    assert pinned.status_code == 200, pinned.text
    other = "0" * 8 if not expected.startswith("0" * 8) else "f" * 8
    stale = httpx.post(f"{world.url}/v1/completions", headers=KEY_HEADERS, timeout=60,
                       json={**body, "model": f"alpha@{other}"})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "adapter_version_mismatch"


def test_admin_listing_with_right_token(world):
    data = httpx.get(f"{world.url}/v1/adapters", headers=ADMIN_HEADERS).json()["data"]
    alpha = next(a for a in data if a["id"] == "alpha")
    assert alpha["rank"] == 8 and alpha["alpha"] == 16 and alpha["status"] in ("ready", "loading")
    assert alpha["tier"] in ("device", "cpu", "disk") and alpha["size_bytes"] > 0 and alpha["version"] == 1
    assert alpha["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert alpha["num_modules"] == 7 * 30


def _rank32(world):
    return adapter_files(world.uploads / "rank32")


def _delta(world):
    return adapter_files(world.uploads / "delta")


def _nan(tensors):
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")


def _warp(tensors):
    for key in [k for k in tensors if ".v_proj." in k]:
        tensors[key.replace(".v_proj.", ".warp_proj.")] = tensors.pop(key)


def _wrong_shape(tensors):
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:, :-1].contiguous()


REJECTIONS = {
    # case: (form name, files builder, status, words in the message)
    "pickle-weights": ("p1", lambda w: {"adapter_config.json": _delta(w)[0], "adapter_model.bin": b"\x80\x04K\x01."},
                       400, "pickle"),
    "pickle-as-safetensors": ("p2", lambda w: {"adapter_config.json": _delta(w)[0],
                                               "adapter_model.safetensors": b"\x80\x04\x95" + b"\0" * 40}, 400, "pickle"),
    "wrong-shapes": ("p3", lambda w: {"adapter_config.json": _delta(w)[0],
                                      "adapter_model.safetensors": edited_weights(_delta(w)[1], _wrong_shape)},
                     400, "shape"),
    "nan": ("p4", lambda w: {"adapter_config.json": _delta(w)[0],
                             "adapter_model.safetensors": edited_weights(_delta(w)[1], _nan)}, 400, "NaN"),
    "rank-too-high": ("p5", lambda w: dict(zip(("adapter_config.json", "adapter_model.safetensors"), _rank32(w))),
                      400, "rank 32"),
    "unknown-target": ("p6", lambda w: {"adapter_config.json": edited_config(_delta(w)[0],
                                                                             target_modules=["q_proj", "warp_proj"]),
                                        "adapter_model.safetensors": edited_weights(_delta(w)[1], _warp)},
                       400, "warp_proj"),
    "bad-name": ("../evil", lambda w: dict(zip(("adapter_config.json", "adapter_model.safetensors"), _delta(w))),
                 400, "name"),
    "base-name": (BASE_NAME, lambda w: dict(zip(("adapter_config.json", "adapter_model.safetensors"), _delta(w))),
                  400, "base model"),
    "archive-traversal": ("p7", lambda w: {"archive": zipped(w.uploads / "delta", prefix="../../")}, 400, "'..'"),
    "archive-link": ("p8", lambda w: {"archive": _tar_with_link(w)}, 400, "link"),
    "oversized": ("p9", lambda w: {"adapter_config.json": _delta(w)[0],
                                   "adapter_model.safetensors": b"\0" * (MAX_ADAPTER_BYTES + 1)}, 413, "limit"),
    "truncated": ("p10", lambda w: {"adapter_config.json": _delta(w)[0],
                                    "adapter_model.safetensors": _delta(w)[1][:-1000]}, 400, "safetensors"),
    "missing-config": ("p11", lambda w: {"adapter_model.safetensors": _delta(w)[1]}, 400, "adapter_config.json"),
    "existing-name": ("alpha", lambda w: dict(zip(("adapter_config.json", "adapter_model.safetensors"), _delta(w))),
                      409, "alpha"),
}


def _tar_with_link(world) -> bytes:
    config, _ = _delta(world)
    return make_tar([("adapter_config.json", config),
                     tar_member("adapter_model.safetensors", kind=tarfile.SYMTYPE, linkname="/etc/passwd")], gz=True)


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_rejected_upload_is_4xx_and_changes_nothing(world, case):
    name, build, status, words = REJECTIONS[case]
    before = store_snapshot(world.store)
    models_before = httpx.get(f"{world.url}/v1/models", headers=KEY_HEADERS).json()
    files = {key: (key, data) for key, data in build(world).items()}
    response = httpx.post(f"{world.url}/v1/adapters", headers=ADMIN_HEADERS, data={"name": name}, files=files,
                          timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"], error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert store_snapshot(world.store) == before
    assert httpx.get(f"{world.url}/v1/models", headers=KEY_HEADERS).json() == models_before
    still = httpx.post(f"{world.url}/v1/completions", headers=KEY_HEADERS, timeout=60,
                       json={"model": "alpha", "prompt": "Hi", "max_tokens": 1})
    assert still.status_code == 200


@pytest.mark.full
def test_upload_while_20_streams_run_on_other_adapters(world):
    models = ["alpha", "beta", "gamma", BASE_NAME]
    prompts = [f"{PROMPT} (list {i})" for i in range(5)]
    jobs = [(models[i % 4], prompts[i % 5]) for i in range(20)]
    tokens = 16
    expected = world.oracle.greedy([(m, p, tokens) for m, p in jobs])
    world.oracle.add("delta", world.uploads / "delta")
    delta_expected = world.oracle.greedy([("delta", PROMPT, TOKENS)])[0]

    async def stream(client, model, prompt, started: asyncio.Event, counter: list) -> tuple[str, float]:
        text = ""
        async with client.stream("POST", "/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if text and not started.is_set():
                        counter.append(1)
                        if len(counter) >= 4:
                            started.set()
        return text, time.monotonic()

    async def run():
        async with httpx.AsyncClient(base_url=world.url, headers=KEY_HEADERS, timeout=300) as client:
            started, counter = asyncio.Event(), []
            tasks = [asyncio.ensure_future(stream(client, m, p, started, counter)) for m, p in jobs]
            await started.wait()
            upload = await client.post("/v1/adapters", headers=ADMIN_HEADERS, data={"name": "delta"},
                                       files={"archive": ("delta.zip", zipped(world.uploads / "delta"))})
            uploaded_at = time.monotonic()
            first = await client.post("/v1/completions", json={"model": "delta", "prompt": PROMPT,
                                                               "max_tokens": TOKENS, "temperature": 0})
            return upload, uploaded_at, first, await asyncio.gather(*tasks)

    upload, uploaded_at, first, results = asyncio.run(run())
    assert upload.status_code == 201, upload.text
    assert upload.json()["id"] == "delta" and upload.json()["version"] == 1
    assert first.status_code == 200 and first.json()["choices"][0]["text"] == delta_expected
    assert [text for text, _ in results] == expected
    assert any(done > uploaded_at for _, done in results)  # the upload landed while streams were running
    assert (world.store / "delta" / "adapter_model.safetensors").is_file()


def test_vllm_load_and_unload_aliases(world):
    world.oracle.add("epsilon", world.root / "epsilon")
    expected = world.oracle.greedy([("epsilon", PROMPT, TOKENS)])[0]
    outside = httpx.post(f"{world.url}/v1/load_lora_adapter", headers=ADMIN_HEADERS,
                         json={"lora_name": "x", "lora_path": str(world.uploads / "delta")})
    assert outside.status_code == 403
    loaded = httpx.post(f"{world.url}/v1/load_lora_adapter", headers=ADMIN_HEADERS,
                        json={"lora_name": "epsilon", "lora_path": str(world.root / "epsilon")}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    out = sync_client(world).completions.create(model="epsilon", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert out.choices[0].text == expected
    unloaded = httpx.post(f"{world.url}/v1/unload_lora_adapter", headers=ADMIN_HEADERS, json={"lora_name": "epsilon"})
    assert unloaded.status_code == 200
    assert unloaded.text == "Success: LoRA adapter 'epsilon' removed successfully."
    with pytest.raises(NotFoundError):
        sync_client(world).completions.create(model="epsilon", prompt=PROMPT, max_tokens=1)
    assert (world.store / "epsilon" / "adapter_model.safetensors").is_file()  # unload keeps the files
    again = httpx.post(f"{world.url}/v1/load_lora_adapter", headers=ADMIN_HEADERS,
                       json={"lora_name": "epsilon", "lora_path": str(world.store / "epsilon")}, timeout=60)
    assert again.status_code == 200, again.text  # loaded again from its own store folder
    out = sync_client(world).completions.create(model="epsilon", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert out.choices[0].text == expected


def test_overwrite_and_delete(world):
    config, weights = adapter_files(world.uploads / "delta")
    files = {"adapter_config.json": config, "adapter_model.safetensors": weights}
    first = httpx.post(f"{world.url}/v1/adapters", headers=ADMIN_HEADERS, data={"name": "zeta"}, files=files)
    assert first.status_code == 201 and first.json()["version"] == 1
    second = httpx.post(f"{world.url}/v1/adapters", headers=ADMIN_HEADERS, data={"name": "zeta", "overwrite": "true"},
                        files=files)
    assert second.status_code == 201 and second.json()["version"] == 2
    assert httpx.delete(f"{world.url}/v1/adapters/zeta", headers=ADMIN_HEADERS).status_code == 200
    assert httpx.get(f"{world.url}/v1/adapters/zeta", headers=ADMIN_HEADERS).status_code == 404
    assert not (world.store / "zeta").exists()


def test_disconnect_frees_the_request_and_metrics_show_it(world):
    with httpx.stream("POST", f"{world.url}/v1/completions", headers=KEY_HEADERS, timeout=60, json={
            "model": "beta", "prompt": PROMPT, "max_tokens": 400, "stream": True}) as response:
        next(line for line in response.iter_lines() if line.startswith("data: {"))

    def gauge(name: str) -> float:
        text = httpx.get(f"{world.url}/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    deadline = time.monotonic() + 10
    while gauge("loraplex_sequences_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gauge("loraplex_sequences_running") == 0 and gauge("loraplex_kv_cache_blocks_used") == 0
    text = httpx.get(f"{world.url}/metrics").text
    assert 'loraplex_requests_aborted_total{model="beta"}' in text
    assert 'loraplex_adapter_info{adapter="alpha"' in text and "loraplex_time_to_first_token_seconds_bucket" in text
    assert 'loraplex_adapter_tokens_total{adapter="beta"}' in text


def test_metrics_report_the_bytes_of_model_kv_cache_and_adapters(world):
    httpx.post(f"{world.url}/v1/completions", headers=KEY_HEADERS, timeout=120,
               json={"model": "alpha", "prompt": PROMPT, "max_tokens": 1}).raise_for_status()
    text = httpx.get(f"{world.url}/metrics").text
    owned = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
             if line.startswith("loraplex_memory_bytes{")}
    assert 500e6 < owned["model"] < 560e6  # SmolLM2-135M in float32, the tied head counted once
    assert owned["kv_cache"] > 0 and owned["adapters_device"] > 0 and owned["adapters_cpu"] > 0
