"""A real local Ray cluster (2 replicas of the embedded model) behind the ingress, over one shared store.

Run with `make test-cluster` (it installs ray[serve] and enters a loopback-only network namespace).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.cluster.cluster_process import cluster_process, replica_pids
from tests.e2e.server_process import running_server

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "cluster-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
BASE = "SmolLM2-135M-Instruct"
PROMPT = "Input: Mei is 55, lives in Mumbai, and finds the smartwatch terrible.\nOutput:"
SHIPPED = ("sentiment", "shout", "extract-json", "template")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shared") / "adapters"
    root.mkdir()
    for name in SHIPPED:
        shutil.copytree(ROOT / "adapters" / name, root / name)
    return root


@pytest.fixture(scope="module")
def cluster(store):
    with cluster_process("--adapters-dir", str(store), env={"LORAPLEX_ADMIN_TOKEN": TOKEN}) as (proc, url):
        yield url


def complete(url: str, model: str, tokens: int = 12) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=120,
                      json={"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0})


def many(url: str, models: list[str], workers: int = 8) -> list[httpx.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda m: complete(url, m), models))


def replica(response: httpx.Response) -> str:
    return response.headers["x-loraplex-replica"]


def upload(url: str, name: str, source: str, overwrite: bool = False) -> httpx.Response:
    folder = ROOT / "adapters" / source
    files = {f: (f, (folder / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
    data = {"name": name, **({"overwrite": "true"} if overwrite else {})}
    return httpx.post(f"{url}/v1/adapters", headers=ADMIN, data=data, files=files, timeout=120)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_upload_answers_and_sticks_to_its_replica_while_others_spread(cluster):
    assert upload(cluster, "uploaded", "shout").status_code == 201
    first = complete(cluster, "uploaded")
    assert text(first) == text(complete(cluster, "shout"))  # the uploaded weights answer
    sticky = [complete(cluster, "uploaded") for _ in range(8)]
    assert {replica(r) for r in sticky} == {replica(first)}
    spread = many(cluster, [*SHIPPED, BASE] * 4, workers=4)
    assert all(r.status_code == 200 for r in spread)
    assert len({replica(r) for r in spread}) == 2
    by_adapter: dict[str, set[str]] = {}
    for model, response in zip([*SHIPPED, BASE] * 4, spread):
        by_adapter.setdefault(model, set()).add(replica(response))
    assert len({r for m in SHIPPED for r in by_adapter[m]}) == 2  # adapters land on both replicas
    base = [complete(cluster, BASE, 2) for _ in range(12)]  # one at a time: both replicas idle, Serve picks either
    assert len({replica(r) for r in base}) == 2  # the base model goes to any replica


def both_replicas_hold(url: str, model: str) -> list[httpx.Response]:
    """Saturate the replica holding `model` (12 requests in flight at most) so Serve loads it on the other too."""
    responses = many(url, [model] * 16, workers=16)
    assert len({replica(r) for r in responses}) == 2, [replica(r) for r in responses]
    return responses


def test_overwrite_and_delete_reach_both_replicas_at_once(cluster):
    assert upload(cluster, "moving", "shout").status_code == 201
    shout, sentiment = text(complete(cluster, "shout")), text(complete(cluster, "sentiment"))
    assert {text(r) for r in both_replicas_hold(cluster, "moving")} == {shout}
    replaced = upload(cluster, "moving", "sentiment", overwrite=True)
    assert replaced.is_success and replaced.json()["version"] == 2
    after = both_replicas_hold(cluster, "moving")  # right after the upload returned
    assert {text(r) for r in after} == {sentiment}
    seen: dict[str, dict] = {}
    while len(seen) < 2:
        info = httpx.get(f"{cluster}/v1/adapters/moving", headers=ADMIN, timeout=30)
        seen[replica(info)] = info.json()
    assert {(i["version"], i["sha256"]) for i in seen.values()} == {(2, replaced.json()["sha256"])}

    assert httpx.delete(f"{cluster}/v1/adapters/moving", headers=ADMIN, timeout=30).status_code == 200
    gone = many(cluster, ["moving"] * 16, workers=16)
    assert {r.status_code for r in gone} == {404}
    assert all(r.json()["error"]["code"] == "model_not_found" for r in gone)
    statuses: dict[str, int] = {}
    while len(statuses) < 2:
        info = httpx.get(f"{cluster}/v1/adapters/moving", headers=ADMIN, timeout=30)
        statuses[replica(info)] = info.status_code
    assert set(statuses.values()) == {404}


def test_admin_needs_the_token_through_the_ingress(cluster):
    refused = httpx.get(f"{cluster}/v1/adapters", timeout=30)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    listed = httpx.get(f"{cluster}/v1/adapters", headers=ADMIN, timeout=30)
    assert listed.status_code == 200 and set(SHIPPED) <= {a["id"] for a in listed.json()["data"]}
    models = httpx.get(f"{cluster}/v1/models", timeout=30).json()["data"]
    assert models[0]["id"] == BASE and set(SHIPPED) <= {m["id"] for m in models}
    bad = httpx.post(f"{cluster}/v1/completions", json={"model": "shout", "prompt": PROMPT, "bogus": 1}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_streaming_and_metrics_per_replica(cluster):
    with httpx.stream("POST", f"{cluster}/v1/chat/completions", timeout=60,
                      json={"model": "shout", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                            "stream": True}) as response:
        assert response.status_code == 200 and "x-loraplex-replica" in response.headers
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    time.sleep(2.5)  # one report interval
    metrics = httpx.get(f"{cluster}/metrics", timeout=30).text
    served = {line.split('replica="')[1].split('"')[0] for line in metrics.splitlines()
              if line.startswith("loraplex_requests_total{")}
    assert len(served) == 2  # both replicas served requests above, each series labelled by its replica


def test_greedy_output_equals_the_single_server(cluster, store, tmp_path):
    single_store = tmp_path / "single"
    shutil.copytree(store, single_store, ignore=shutil.ignore_patterns(".*"))
    with running_server("--adapters-dir", str(single_store), "--kv-cache-tokens", "2048") as single:
        for model in ("shout", "extract-json", BASE):
            assert text(complete(cluster, model, 24)) == text(complete(single, model, 24)), model


def test_a_killed_replica_loses_no_request_and_comes_back(cluster):
    before = replica_pids(cluster)
    assert len(before) == 2
    victim, pid = sorted(before.items())[0]
    models = [*SHIPPED, BASE] * 6
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(complete, cluster, m) for m in models]
        time.sleep(3)  # traffic is running on both replicas
        os.kill(pid, signal.SIGKILL)
        responses = [f.result() for f in futures]
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == len(models), statuses  # retried on the other replica when it died under them
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        now = replica_pids(cluster)
        if len(now) == 2 and victim not in now and pid not in now.values():
            break
        time.sleep(2)
    else:
        raise AssertionError(f"the killed replica was not replaced: {replica_pids(cluster)}")
    fresh = next(r for r in now if r not in before)
    served = {replica(r) for r in many(cluster, [*SHIPPED, BASE] * 4, workers=4)}
    assert fresh in served
