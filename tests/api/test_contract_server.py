"""Adapter contracts (loraplex.json), structured output and the tokenizer routes on the real server.

One `loraplex serve` on a copy of the shipped adapters: their contracts carry the prompt template,
the defaults and (extract-json) a JSON schema, so clients send only the input.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.conftest import TEST_CACHE
from tests.e2e.server_process import running_server

pytestmark = pytest.mark.slow

SHIPPED = Path(__file__).resolve().parents[2] / "adapters"
ADMIN = "contract-admin"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
BASE = "SmolLM2-135M-Instruct"
SENTENCE = "Mei is 55, lives in Mumbai, and finds the smartwatch terrible."
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"type": "string", "maxLength": 40}},
          "required": ["name", "age", "city"], "additionalProperties": False}
SCHEMAS = {
    "colors": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                "count": {"type": "integer", "minimum": 1, "maximum": 9}},
               "required": ["color", "count"], "additionalProperties": False},
    "tags": {"type": "object", "properties": {"tags": {"type": "array", "maxItems": 3,
                                                       "items": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
                                              "ok": {"type": "boolean"}},
             "required": ["tags", "ok"], "additionalProperties": False},
    "person": PERSON,
}
FREE_PROMPTS = ["The capital of France is", "Three good names for a cat are", "Water boils at"]


def schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    store = tmp_path_factory.mktemp("contract-store") / "adapters"
    shutil.copytree(SHIPPED, store)
    flags = ["--adapters-dir", str(store), "--cache-dir", str(TEST_CACHE), "--device", "cpu"]
    with running_server(*flags, env={"LORAPLEX_ADMIN_TOKEN": ADMIN}) as base_url:
        yield base_url


@pytest.fixture()
def client(url):
    with httpx.Client(base_url=url, timeout=300) as c:
        yield c


def complete(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def refused(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error["message"], error
    return error


# --- the contract applied ----------------------------------------------------------------------

def test_sentiment_needs_no_template_in_the_client(client):
    out = complete(client, model="sentiment", prompt="I love this phone")
    assert out["choices"][0]["text"] == " positive"
    assert out["choices"][0]["finish_reason"] == "stop"
    raw = complete(client, model="sentiment", prompt="Input: I love this phone\nOutput:", apply_template=False)
    assert raw["choices"][0]["text"] == " positive" and raw["usage"] == out["usage"]


@pytest.mark.full
def test_defaults_apply_and_request_fields_win(client):
    contract = client.get("/v1/adapters/shout", headers=ADMIN_HEADERS).json()["contract"]
    assert contract["defaults"]["max_tokens"] == 64 and contract["prompt_template"] == "Input: {input}\nOutput:"
    short = complete(client, model="shout", prompt=SENTENCE, max_tokens=6)  # the template applied
    assert short["choices"][0]["text"].startswith(" MEI IS 55") and short["usage"]["completion_tokens"] == 6
    assert short["choices"][0]["finish_reason"] == "length"
    stopped = complete(client, model="shout", prompt=SENTENCE, stop=[","])["choices"][0]
    assert stopped["text"] == " MEI IS 55" and stopped["finish_reason"] == "stop"
    default = complete(client, model="sentiment", prompt="I love this phone", stop=[])
    assert default["usage"]["completion_tokens"] <= 4  # the contract's max_tokens
    # temperature 0 comes from the contract; the request's own temperature and seeds sample instead.
    sampled = {complete(client, model="shout", prompt=SENTENCE, temperature=2.0, seed=s, max_tokens=4)
               ["choices"][0]["text"] for s in (1, 2, 3)}
    assert len(sampled) > 1


def test_models_entry_and_chat_system_prompt(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["extract-json"]["contract"]["response_format"]["json_schema"]["schema"] == PERSON
    assert models[BASE]["contract"] is None
    one = client.get("/v1/models/sentiment").json()
    assert one["id"] == "sentiment" and one["contract"]["defaults"]["max_tokens"] == 4
    assert client.get("/v1/models/nope").status_code == 404


def test_bound_schema_makes_extract_json_answer_json(client):
    text = complete(client, model="extract-json", prompt=SENTENCE)["choices"][0]["text"]
    assert json.loads(text) == {"name": "Mei", "age": 55, "city": "Mumbai"}
    free = complete(client, model="extract-json", prompt=SENTENCE, response_format={"type": "text"})
    assert free["choices"][0]["text"].startswith(" {")  # the adapter's own trained form, unconstrained


# --- structured output -------------------------------------------------------------------------

async def _sample_mixed(url: str, per_schema: int, free_alone: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        async def constrained(name: str, schema: dict, seed: int) -> dict:
            r = await c.post("/v1/completions", json={
                "model": BASE, "prompt": f"A JSON object ({name}):", "temperature": 1.0, "seed": seed * 4,
                "max_tokens": 96, "n": 4, "response_format": schema_format(name, schema)})
            assert r.status_code == 200, r.text
            return r.json()

        async def free(prompt: str) -> str:
            r = await c.post("/v1/completions", json={"model": BASE, "prompt": prompt, "max_tokens": 12,
                                                      "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        names = [n for n in SCHEMAS for _ in range(0, per_schema, 4)]
        jobs = [constrained(n, SCHEMAS[n], seed) for seed, n in enumerate(names)]
        results = await asyncio.gather(*jobs, *(free(p) for p in FREE_PROMPTS))
    assert list(results[len(jobs):]) == free_alone  # free requests: the same greedy output as alone
    counted = 0
    for name, body in zip(names, results):
        for choice in body["choices"]:
            assert choice["finish_reason"] == "stop", choice
            jsonschema.validate(json.loads(choice["text"]), SCHEMAS[name])
            counted += 1
    assert counted == len(SCHEMAS) * per_schema


def _free_alone(client: httpx.Client) -> list[str]:
    return [complete(client, model=BASE, prompt=p, max_tokens=12, temperature=0)["choices"][0]["text"]
            for p in FREE_PROMPTS]


@pytest.mark.full
def test_constrained_and_free_requests_mixed_in_one_batch(client, url):
    asyncio.run(_sample_mixed(url, 4, _free_alone(client)))


@pytest.mark.full
def test_one_hundred_samples_per_schema_at_temperature_one(client, url):
    asyncio.run(_sample_mixed(url, 100, _free_alone(client)))


def test_json_object_and_chat_response_format(client):
    out = complete(client, model=BASE, prompt="A JSON object:", temperature=1.0, seed=3, max_tokens=64,
                   response_format={"type": "json_object"})
    assert isinstance(json.loads(out["choices"][0]["text"]), dict)
    chat = client.post("/v1/chat/completions", json={
        "model": BASE, "messages": [{"role": "user", "content": "Describe a cat as JSON."}], "max_tokens": 96,
        "seed": 5, "response_format": schema_format("colors", SCHEMAS["colors"])})
    assert chat.status_code == 200, chat.text
    choice = chat.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS["colors"])


def test_unsupported_or_bad_schemas_are_400(client):
    for schema, words in [({"type": "object", "not": {"required": ["a"]}}, "'not'"),
                          ({"type": "integer", "multipleOf": 3}, "'multipleOf'"),
                          ({"type": "strng"}, "invalid JSON schema"),
                          ({"$ref": "https://example.com/s.json"}, "local $ref")]:
        refused(client.post("/v1/completions", json={"model": BASE, "prompt": "x",
                                                     "response_format": schema_format("s", schema)}), 400, words)
    refused(client.post("/v1/completions", json={"model": BASE, "prompt": "x", "response_format": {
        "type": "json_schema"}}), 400, "json_schema")
    refused(client.post("/v1/completions", json={"model": BASE, "prompt": "x", "ignore_eos": True,
                                                 "response_format": {"type": "json_object"}}), 400, "ignore_eos")


# --- contract upload, PATCH, versions and identity -----------------------------------------------

def upload(client: httpx.Client, name: str, contract: bytes | None, overwrite: bool = False,
           folder: Path = SHIPPED / "sentiment") -> httpx.Response:
    files = {f: (f, (folder / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
    if contract is not None:
        files["loraplex.json"] = ("loraplex.json", contract)
    data = {"name": name, **({"overwrite": "true"} if overwrite else {})}
    return client.post("/v1/adapters", headers=ADMIN_HEADERS, data=data, files=files)


def identity(folder: Path, contract: bytes) -> str:
    config, weights = (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()
    return hashlib.sha256(b"loraplex-adapter-v2\0" + len(config).to_bytes(8, "little") + config
                          + len(contract).to_bytes(8, "little") + contract + weights).hexdigest()


def test_contract_upload_patch_versions_and_identity(client):
    contract = json.dumps({"prompt_template": "Input: {input}\nOutput:", "defaults": {"max_tokens": 2}}).encode()
    bare = upload(client, "mood", None)
    assert bare.status_code == 201, bare.text
    assert bare.json()["contract"] is None
    first = upload(client, "mood", contract, overwrite=True).json()
    assert first["sha256"] == identity(SHIPPED / "sentiment", contract) != bare.json()["sha256"]
    assert first["contract"]["defaults"] == {"max_tokens": 2}
    assert complete(client, model="mood", prompt="I love this phone")["choices"][0]["text"] == " positive"

    patched = client.patch("/v1/adapters/mood", headers=ADMIN_HEADERS,
                           json={"defaults": {"max_tokens": 1}, "description": "polarity"})
    assert patched.status_code == 200, patched.text
    now = patched.json()
    assert now["version"] == first["version"] + 1 and now["generation"] > first["generation"]
    assert now["sha256"] != first["sha256"]
    assert now["sha256"] == identity(SHIPPED / "sentiment", json.dumps(now["contract"], indent=2).encode() + b"\n")
    assert now["contract"] == {"description": "polarity", "prompt_template": "Input: {input}\nOutput:",
                               "defaults": {"max_tokens": 1}}
    assert client.get("/v1/adapters/mood", headers=ADMIN_HEADERS).json()["sha256"] == now["sha256"]
    out = complete(client, model="mood", prompt="I love this phone")
    assert out["usage"]["completion_tokens"] == 1
    pinned = client.post("/v1/completions", json={"model": f"mood@{first['sha256'][:12]}", "prompt": "x"})
    refused(pinned, 409)
    assert complete(client, model=f"mood@{now['sha256'][:12]}", prompt="x")["usage"]["completion_tokens"] == 1
    removed = client.patch("/v1/adapters/mood", headers=ADMIN_HEADERS, json={"prompt_template": None}).json()
    assert "prompt_template" not in removed["contract"] and removed["version"] == now["version"] + 1
    assert client.patch("/v1/adapters/mood", json={}).status_code == 401
    refused(client.patch("/v1/adapters/none-such", headers=ADMIN_HEADERS, json={}), 404)


def test_archive_with_contract(client, tmp_path):
    import zipfile
    folder = SHIPPED / "extract-json"
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in ("adapter_config.json", "adapter_model.safetensors", "loraplex.json"):
            z.write(folder / f, f"extract/{f}")
    r = client.post("/v1/adapters", headers=ADMIN_HEADERS, data={"name": "extract-zip"},
                    files={"archive": ("a.zip", archive.read_bytes())})
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == identity(folder, (folder / "loraplex.json").read_bytes())
    text = complete(client, model="extract-zip", prompt=SENTENCE)["choices"][0]["text"]
    assert json.loads(text) == {"name": "Mei", "age": 55, "city": "Mumbai"}


@pytest.mark.parametrize("contract, words", [
    (b'{"prompt_template": "Input: {input}", "temperature": 0}', "unknown key 'temperature'"),
    (b'{"defaults": {"temprature": 0}}', "unknown key 'defaults.temprature'"),
    (b'{"prompt_template": "no placeholder"}', "{input}"),
    (b'{"defaults": {"max_tokens": 0}}', "defaults.max_tokens"),
    (b'{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
     b'{"type": "object", "if": {}}}}}', "'if'"),
    (b"not json", "not valid JSON"),
    (b"[1]", "JSON object"),
])
def test_bad_contracts_are_refused_and_change_nothing(client, contract, words):
    before = client.get("/v1/adapters", headers=ADMIN_HEADERS).json()
    refused(upload(client, "bad-contract", contract), 400, words)
    patch = json.loads(contract) if contract.startswith(b"{") else None
    if patch is not None:
        refused(client.patch("/v1/adapters/sentiment", headers=ADMIN_HEADERS, json=patch), 400, words)
    assert client.get("/v1/adapters", headers=ADMIN_HEADERS).json()["data"] == before["data"]


# --- tokenizer routes ----------------------------------------------------------------------------

def test_tokenize_detokenize_round_trip(client):
    body = client.post("/tokenize", json={"model": "sentiment", "prompt": "I love this phone"}).json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == 8192
    templated = client.post("/tokenize", json={"model": "sentiment", "prompt": "I love this phone",
                                               "apply_template": True, "return_token_strs": True}).json()
    assert templated["count"] > body["count"] and len(templated["token_strs"]) == templated["count"]
    text = client.post("/detokenize", json={"model": "sentiment", "tokens": templated["tokens"]}).json()["prompt"]
    assert text == "Input: I love this phone\nOutput:"
    prompt_tokens = complete(client, model="sentiment", prompt="I love this phone")["usage"]["prompt_tokens"]
    assert prompt_tokens == templated["count"]
    chat = client.post("/tokenize", json={"model": BASE, "messages": [{"role": "user", "content": "Hi"}]}).json()
    bare = client.post("/tokenize", json={"model": BASE, "add_generation_prompt": False,
                                          "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > bare["count"] and chat["tokens"][:bare["count"]] == bare["tokens"]
    refused(client.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404)
    refused(client.post("/tokenize", json={"model": BASE}), 400, "exactly one")
    refused(client.post("/detokenize", json={"model": BASE, "tokens": [10**9]}), 400, "vocabulary")
