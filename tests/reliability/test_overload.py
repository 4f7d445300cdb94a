"""Overload and slow clients: a burst of 10x the queue bound gets 429 + Retry-After for the excess and
completes every admitted request; idle and byte-a-second connections do not stop a normal client."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

from tests.reliability.client import complete, completion_body, key_headers
from tests.reliability.conftest import QUEUE, RUNNING
from tests.reliability.figures import mib, percentile, record
from tests.reliability.forms import SHORT, SOAK, Form
from tests.reliability.raw_http import connect
from tests.reliability.server_proc import BASE_NAME

MEMORY_BOUND = 256 * 2**20


async def burst(url: str, count: int) -> list[httpx.Response | Exception]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        body = completion_body(BASE_NAME, max_tokens=4)
        calls = [client.post("/v1/completions", headers=key_headers(), json=body) for _ in range(count)]
        return await asyncio.gather(*calls, return_exceptions=True)


def trickle(url: str, stop: threading.Event, sockets: list) -> None:
    """Open one connection and send a request head one byte a second until told to stop."""
    try:
        sock = connect(url, 5)
    except OSError:
        return
    sockets.append(sock)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n"
    for byte in head:
        if stop.wait(1.0):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


def run_overload(client: httpx.Client, server, form: Form) -> None:
    count = form.overload_factor * QUEUE
    answers = asyncio.run(burst(server.url, count))
    rss_before = server.rss_bytes()  # after the burst: the memory of serving a full batch is not a leak
    statuses = [a.status_code if isinstance(a, httpx.Response) else type(a).__name__ for a in answers]
    refused = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 429]
    bad = [s for s in statuses if s not in (200, 429)]
    no_retry_after = sum(1 for a in refused if not a.headers.get("retry-after", "").isdigit())
    incomplete = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 200
                  and a.json()["choices"][0]["finish_reason"] not in ("length", "stop")]
    stop, sockets = threading.Event(), []
    idle = [connect(server.url, 5) for _ in range(form.slow_clients // 2)]
    threads = [threading.Thread(target=trickle, args=(server.url, stop, sockets), daemon=True)
               for _ in range(form.slow_clients - len(idle))]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    latencies, normal_errors = [], []
    for _ in range(5):
        started = time.monotonic()
        try:
            response = complete(client, BASE_NAME, max_tokens=2)
            if response.status_code != 200:
                normal_errors.append(response.status_code)
        except httpx.TransportError as exc:
            normal_errors.append(type(exc).__name__)
        latencies.append(time.monotonic() - started)
    rss_slow = server.rss_bytes()
    stop.set()
    for sock in idle + sockets:
        sock.close()
    record("overload", form.name, {
        "burst": count, "queue_bound": QUEUE, "running_bound": RUNNING, "admitted": statuses.count(200),
        "refused_429": len(refused), "other_outcomes": bad[:10], "refused_without_retry_after": no_retry_after,
        "admitted_not_completed": len(incomplete), "slow_clients": form.slow_clients,
        "normal_client_errors": normal_errors, "normal_client_p99_s": round(percentile(latencies, 99), 2),
        "rss_before_mib": mib(rss_before), "rss_with_slow_clients_mib": mib(rss_slow)})
    assert refused and not bad and not no_retry_after and not incomplete
    assert statuses.count(200) >= RUNNING
    assert not normal_errors
    assert rss_slow - rss_before <= MEMORY_BOUND


def test_overload_short(client, server):
    run_overload(client, server, SHORT)


@pytest.mark.soak
def test_overload_soak(client, server):
    run_overload(client, server, SOAK)
