"""Stall: the p99 latency of a short completion while a large upload and a large prompt are in
progress stays within 2x of its p99 without them (nothing blocks the event loop or the engine)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.reliability.adapter_factory import big_adapter
from tests.reliability.client import complete, key_headers, upload
from tests.reliability.figures import mib, percentile, record
from tests.reliability.forms import SHORT, SOAK, Form
from tests.reliability.server_proc import BASE_NAME

RATIO = 2.0


def sample(client: httpx.Client, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.monotonic()
        assert complete(client, BASE_NAME, max_tokens=1).status_code == 200
        out.append(time.monotonic() - started)
    return out


def disturb(url: str, form: Form, stop: threading.Event, log: list) -> None:
    big = big_adapter(form.stall_upload_bytes)
    prompt = "word " * (form.stall_prompt_chars // 5)

    def uploads() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            while not stop.is_set():
                log.append(("upload", upload(c, "stall-big", big, overwrite=True).status_code))

    def prompts() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            while not stop.is_set():
                body = {"model": BASE_NAME, "prompt": prompt, "max_tokens": 1}
                log.append(("prompt", c.post("/v1/completions", headers=key_headers(), json=body).status_code))

    for target in (uploads, prompts):
        threading.Thread(target=target, daemon=True).start()


def run_stall(client: httpx.Client, server, form: Form) -> None:
    sample(client, 3)
    quiet = sample(client, form.stall_samples)
    stop, log = threading.Event(), []
    disturb(server.url, form, stop, log)
    time.sleep(1.0)
    rss = server.rss_bytes()
    busy = sample(client, form.stall_samples)
    rss = max(rss, server.rss_bytes())
    stop.set()
    time.sleep(2.0)
    p99_quiet, p99_busy = percentile(quiet, 99), percentile(busy, 99)
    record("stall", form.name, {
        "samples": form.stall_samples, "upload_mib": mib(form.stall_upload_bytes),
        "prompt_mib": mib(form.stall_prompt_chars), "p99_quiet_s": round(p99_quiet, 3),
        "p99_busy_s": round(p99_busy, 3), "ratio": round(p99_busy / p99_quiet, 2),
        "disturbances": {k: sorted({s for kind, s in log if kind == k}) for k in ("upload", "prompt")},
        "disturbance_calls": len(log), "rss_busy_mib": mib(rss)})
    assert p99_busy <= RATIO * p99_quiet, f"p99 {p99_busy:.2f} s under load vs {p99_quiet:.2f} s quiet"


def test_stall_short(client, server):
    run_stall(client, server, SHORT)


@pytest.mark.soak
def test_stall_soak(client, server):
    run_stall(client, server, SOAK)
