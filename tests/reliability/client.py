"""HTTP calls the suites make, over real sockets with httpx (sync and async)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import httpx

from tests.reliability.adapter_factory import Adapter
from tests.reliability.server_proc import ADMIN, KEY

PROMPT = "The weather today is"
MAX_TOKENS = 6


def admin_headers(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def key_headers(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload_files(name: str, adapter: Adapter, overwrite: bool = False) -> tuple[dict, dict]:
    data = {"name": name, "overwrite": "true" if overwrite else "false"}
    files = {"adapter_config.json": ("adapter_config.json", adapter.config, "application/json"),
             "adapter_model.safetensors": ("adapter_model.safetensors", adapter.weights, "application/octet-stream")}
    return data, files


def upload(client: httpx.Client, name: str, adapter: Adapter, overwrite: bool = False) -> httpx.Response:
    data, files = upload_files(name, adapter, overwrite)
    return client.post("/v1/adapters", headers=admin_headers(), data=data, files=files)


async def aupload(client: httpx.AsyncClient, name: str, adapter: Adapter, overwrite: bool = False) -> httpx.Response:
    data, files = upload_files(name, adapter, overwrite)
    return await client.post("/v1/adapters", headers=admin_headers(), data=data, files=files)


def completion_body(model: str, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS, stream: bool = False) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def complete(client: httpx.Client, model: str, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    return client.post("/v1/completions", headers=key_headers(), json=completion_body(model, prompt, max_tokens))


def greedy_text(client: httpx.Client, model: str, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> str:
    response = complete(client, model, prompt, max_tokens)
    assert response.status_code == 200, f"{model}: {response.status_code} {response.text[:300]}"
    return response.json()["choices"][0]["text"]


@dataclass
class StreamResult:
    """One streamed completion: HTTP status, the concatenated text, or the error body."""

    status: int
    text: str = ""
    error: str = ""
    done: bool = False
    headers: dict = field(default_factory=dict)


async def stream_completion(client: httpx.AsyncClient, model: str, prompt: str = PROMPT,
                            max_tokens: int = MAX_TOKENS) -> StreamResult:
    """POST stream=true and read the SSE events to `[DONE]`; an error event mid-stream is kept as `error`."""
    body = completion_body(model, prompt, max_tokens, stream=True)
    async with client.stream("POST", "/v1/completions", headers=key_headers(), json=body) as response:
        if response.status_code != 200:
            raw = await response.aread()
            return StreamResult(response.status_code, error=raw.decode(errors="replace")[:500],
                                headers=dict(response.headers))
        result = StreamResult(200)
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                result.done = True
                break
            event = json.loads(payload)
            if "error" in event:
                result.error = json.dumps(event["error"])[:500]
                continue
            for choice in event.get("choices", []):
                result.text += choice.get("text") or ""
        return result


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(client: httpx.Client) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def adapter_shas(client: httpx.Client) -> dict[str, str | None]:
    """{adapter name: sha256 or None} from GET /v1/adapters (None where the server shows no sha256)."""
    response = client.get("/v1/adapters", headers=admin_headers())
    response.raise_for_status()
    return {a["id"]: a.get("sha256") for a in response.json()["data"]}
