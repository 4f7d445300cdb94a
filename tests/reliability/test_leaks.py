"""Leaks: load/evict/unload cycles and streams cancelled mid-way leave resident memory within 5% of
its level after warm-up, and every KV block and device slot free at the end (read from /metrics)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.reliability.adapter_factory import random_adapter
from tests.reliability.client import admin_headers, complete, completion_body, key_headers, metrics, upload
from tests.reliability.figures import mib, record
from tests.reliability.forms import SHORT, SOAK, Form

NAMES = 6             # more names than the server's 4 device slots: every cycle may evict
RSS_TOLERANCE = 0.05
IDLE_GAUGES = ("loraplex_kv_cache_blocks_used", "loraplex_sequences_running", "loraplex_queue_waiting",
               'loraplex_adapters_resident{tier="device"}')


def cycle(client: httpx.Client, i: int, adapters: list) -> None:
    """Upload (or overwrite) one name, answer one token from it (a device load, evicting another), and
    every third cycle delete it again."""
    name = f"leak-{i % NAMES}"
    response = upload(client, name, adapters[i % len(adapters)], overwrite=True)
    assert response.status_code == 201, response.text
    answer = complete(client, name, max_tokens=1)
    assert answer.status_code == 200, answer.text
    if i % 3 == 2:
        assert client.delete(f"/v1/adapters/{name}", headers=admin_headers()).status_code == 200


async def cancelled_stream(client: httpx.AsyncClient, model: str) -> None:
    """Open a long stream, read its first event, then drop the connection."""
    body = completion_body(model, max_tokens=64, stream=True)
    async with client.stream("POST", "/v1/completions", headers=key_headers(), json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break


async def cancel_many(url: str, count: int, models: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for start in range(0, count, 4):
            await asyncio.gather(*(cancelled_stream(client, models[(start + j) % len(models)])
                                   for j in range(min(4, count - start))))


def wait_idle(client: httpx.Client, names: tuple[str, ...] = IDLE_GAUGES, timeout: float = 30.0) -> dict[str, float]:
    """The gauges once all are 0, or as they are after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        values = metrics(client)
        gauges = {g: values.get(g, float("nan")) for g in names}
        if all(v == 0 for v in gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.5)


def run_leaks(client: httpx.Client, server, form: Form) -> None:
    started = time.monotonic()
    adapters = [random_adapter(500 + i, scale_b=0.3) for i in range(NAMES + 2)]
    warmup_cycles, warmup_cancels = max(3, form.leak_cycles // 10), max(3, form.leak_cancels // 10)
    for i in range(warmup_cycles):
        cycle(client, i, adapters)
    asyncio.run(cancel_many(server.url, warmup_cancels, ["leak-0", "leak-1", "SmolLM2-135M-Instruct"]))
    wait_idle(client, IDLE_GAUGES[:3])  # adapters are still registered (and resident) here
    rss_warm = server.rss_bytes()
    phase = time.monotonic()
    for i in range(warmup_cycles, form.leak_cycles):
        cycle(client, i, adapters)
    cycles_s, phase = time.monotonic() - phase, time.monotonic()
    models = ["leak-0", "leak-1", "leak-3", "leak-4", "SmolLM2-135M-Instruct"]
    for name in models[:-1]:
        upload(client, name, adapters[0], overwrite=True)
    asyncio.run(cancel_many(server.url, form.leak_cancels - warmup_cancels, models))
    cancels_s = time.monotonic() - phase
    for entry in client.get("/v1/adapters", headers=admin_headers()).json()["data"]:
        client.delete(f"/v1/adapters/{entry['id']}", headers=admin_headers())
    gauges = wait_idle(client)
    rss_end = server.rss_bytes()
    growth = (rss_end - rss_warm) / rss_warm
    record("leaks", form.name, {
        "load_evict_unload_cycles": form.leak_cycles, "cancelled_streams": form.leak_cancels,
        "rss_after_warmup_mib": mib(rss_warm), "rss_end_mib": mib(rss_end), "rss_growth_pct": round(100 * growth, 2),
        "end_gauges": gauges, "cycles_s": round(cycles_s, 1), "cancels_s": round(cancels_s, 1), "seconds": round(time.monotonic() - started, 1)})
    assert all(v == 0 for v in gauges.values()), f"not free at the end: {gauges}"
    assert growth <= RSS_TOLERANCE, f"RSS grew {100 * growth:.1f}% after warm-up"


def test_leaks_short(client, server):
    run_leaks(client, server, SHORT)


@pytest.mark.soak
def test_leaks_soak(client, server):
    run_leaks(client, server, SOAK)
