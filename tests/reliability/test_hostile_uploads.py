"""Hostile uploads: every bad adapter or archive is a 4xx that names the problem, quickly, with bounded
server memory; the store stays byte-for-byte as it was and the server keeps serving."""

from __future__ import annotations

import re
import time

import httpx

from tests.reliability.adapter_factory import random_adapter
from tests.reliability.client import admin_headers, greedy_text, upload
from tests.reliability.figures import mib, record
from tests.reliability.hostile_corpus import CASE_TIMEOUT, Case, corpus
from tests.reliability.server_proc import BASE_NAME
from tests.reliability.store_tree import tree_digest

ANCHOR = "hostile-anchor"
MEMORY_BOUND = 512 * 2**20  # RSS growth allowed over the whole corpus (the bombs decompress to 400 MiB)


def send(client: httpx.Client, case: Case) -> httpx.Response:
    if case.raw is not None:
        body, content_type = case.raw
        headers = {**admin_headers(), "Content-Type": content_type}
        return client.post("/v1/adapters", headers=headers, content=body, timeout=CASE_TIMEOUT)
    data = {"name": case.name, "overwrite": "true"}
    return client.post("/v1/adapters", headers=admin_headers(), data=data, files=case.files, timeout=CASE_TIMEOUT)


def judge(case: Case, response: httpx.Response | None, seconds: float) -> str | None:
    """None when the refusal is right, else what is wrong with it."""
    if response is None:
        return f"no answer within {CASE_TIMEOUT} s"
    if not 400 <= response.status_code < 500:
        return f"status {response.status_code}: {response.text[:200]}"
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"status {response.status_code} without an error body: {response.text[:200]}"
    if not re.search(case.expect, message, re.IGNORECASE):
        return f"message does not name the problem ({case.expect}): {message[:200]}"
    return None


def test_hostile_uploads(client, server):
    assert upload(client, ANCHOR, random_adapter(99, rank=4, targets=("q_proj",)), overwrite=True).status_code == 201
    anchor_text = greedy_text(client, ANCHOR)
    digest_before, rss_before = tree_digest(server.store), server.rss_bytes()
    cases, failures, slowest, rss_peak = corpus(), [], 0.0, rss_before
    for case in cases:
        started = time.monotonic()
        try:
            response = send(client, case)
        except httpx.TimeoutException:
            response = None
        seconds = time.monotonic() - started
        slowest = max(slowest, seconds)
        rss_peak = max(rss_peak, server.rss_bytes())
        problem = judge(case, response, seconds)
        if problem:
            failures.append(f"{case.label}: {problem}")
    digest_after = tree_digest(server.store)
    serving = greedy_text(client, ANCHOR) == anchor_text and bool(greedy_text(client, BASE_NAME))
    rss_after = server.rss_bytes()
    record("hostile_uploads", "short", {
        "cases": len(cases), "failures": len(failures), "failure_list": failures,
        "slowest_case_s": round(slowest, 2), "store_unchanged": digest_after == digest_before,
        "still_serving": serving, "rss_before_mib": mib(rss_before), "rss_peak_sampled_mib": mib(rss_peak),
        "rss_after_mib": mib(rss_after)})
    _cleanup(client)
    assert len(cases) >= 30
    assert not failures, "\n".join(failures)
    assert digest_after == digest_before, "a refused upload changed the store"
    assert serving
    assert rss_peak - rss_before <= MEMORY_BOUND


def _cleanup(client: httpx.Client) -> None:
    """Drop the anchor and anything a wrongly accepted case registered, so later suites start clean."""
    for entry in client.get("/v1/adapters", headers=admin_headers()).json()["data"]:
        client.delete(f"/v1/adapters/{entry['id']}", headers=admin_headers())
