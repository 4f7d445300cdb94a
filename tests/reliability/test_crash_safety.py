"""Crash safety: kill -9 the server at random moments while an admin loop uploads, overwrites and
deletes; after each restart every name holds what its last acknowledged call left (or what the one
unacknowledged call in flight would have left), no partial adapter is listed, and every listed
adapter answers as its weights should."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from tests.reliability.churn import make_contents, reference_texts
from tests.reliability.client import adapter_shas, admin_headers, greedy_text, upload
from tests.reliability.figures import record
from tests.reliability.forms import SHORT, SOAK, Form
from tests.reliability.server_proc import BASE_NAME
from tests.reliability.store_tree import tree_listing
from tests.reliability.timeline import ABSENT

NAMES = [f"crash-{i}" for i in range(4)]


class AdminLoop(threading.Thread):
    """Uploads, overwrites and deletes until the server dies; remembers what was acknowledged."""

    def __init__(self, url: str, contents: list, state: dict[str, int], seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.contents, self.rng = url, contents, random.Random(seed)
        self.acked = dict(state)                # name -> content id (ABSENT) after the last 2xx
        self.pending: tuple[str, int] | None = None
        self.ops = 0
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while True:
                name = self.rng.choice(NAMES)
                held = self.acked[name]
                if held != ABSENT and self.rng.random() < 0.3:
                    target, call = ABSENT, lambda: client.delete(f"/v1/adapters/{name}", headers=admin_headers())
                else:
                    target = self.rng.choice([i for i in range(len(self.contents)) if i != held])
                    call = lambda: upload(client, name, self.contents[target], overwrite=True)  # noqa: E731
                self.pending = (name, target)
                try:
                    response = call()
                except httpx.TransportError:
                    return  # the server is gone: `pending` may or may not have happened
                if response.status_code >= 300:
                    self.errors.append(f"{name}: {response.status_code} {response.text[:200]}")
                    return
                self.acked[name], self.pending = target, None
                self.ops += 1


def check_after_restart(client: httpx.Client, loop: AdminLoop, texts: dict[int, str], contents: list,
                        observed: dict[str, int]) -> list[str]:
    """What is wrong after a restart; fills `observed` (name -> content id it answers as, or ABSENT)."""
    problems = []
    listed = {a["id"]: a for a in client.get("/v1/adapters", headers=admin_headers()).json()["data"]}
    shas = adapter_shas(client)
    for name in NAMES:
        allowed = {loop.acked[name]}
        if loop.pending and loop.pending[0] == name:
            allowed.add(loop.pending[1])
        observed[name] = ABSENT
        if name not in listed:
            if ABSENT not in allowed:
                problems.append(f"{name}: acknowledged content {loop.acked[name]} lost (not listed)")
            continue
        if listed[name].get("status") not in ("ready", "loading"):
            problems.append(f"{name}: listed in status {listed[name].get('status')}")
        sha = shas.get(name)
        if sha is not None and sha not in {contents[c].sha256 for c in allowed if c != ABSENT}:
            problems.append(f"{name}: sha256 {sha[:16]} is none of the allowed contents {sorted(allowed)}")
        try:
            text = greedy_text(client, name)
        except AssertionError as exc:
            problems.append(f"{name}: listed but does not answer: {exc}")
            continue
        observed[name] = next((c for c in allowed if c != ABSENT and texts[c] == text), loop.acked[name])
        if text not in {texts[c] for c in allowed if c != ABSENT}:
            problems.append(f"{name}: answers {text!r}, not the text of content {sorted(allowed)}")
    return problems


def run_crashes(client: httpx.Client, server, form: Form) -> None:
    started = time.monotonic()
    contents = make_contents(4, seed=3000)
    texts = reference_texts(client, contents, BASE_NAME, f"crash-{form.name}")
    state = {name: ABSENT for name in NAMES}
    rng, problems, ops, restart_s = random.Random(11), [], 0, []
    for kill in range(form.crash_kills):
        loop = AdminLoop(server.url, contents, state, seed=kill)
        loop.start()
        time.sleep(rng.uniform(0.3, 2.0))
        server.kill9()
        loop.join(timeout=60)
        restart_s.append(round(server.start(), 1))
        with httpx.Client(base_url=server.url, timeout=120) as fresh:
            state = {}
            found = check_after_restart(fresh, loop, texts, contents, state)
            problems += [f"kill {kill + 1}: {p}" for p in found + loop.errors]
        ops += loop.ops
    leftovers = [p for p in tree_listing(server.store) if p.split("/")[0] not in NAMES]
    with httpx.Client(base_url=server.url, timeout=120) as fresh:
        for name in NAMES:
            fresh.delete(f"/v1/adapters/{name}", headers=admin_headers())
    record("crash_safety", form.name, {
        "kills": form.crash_kills, "acknowledged_admin_ops": ops, "failures": len(problems),
        "failure_list": problems[:20], "store_entries_besides_adapters": leftovers[:20],
        "restart_seconds": restart_s, "seconds": round(time.monotonic() - started, 1)})
    assert not problems, "\n".join(problems)


@pytest.mark.full  # its soak form covers it; left out of `make test` to keep it under 5 minutes
def test_crash_safety_short(client, server):
    run_crashes(client, server, SHORT)


@pytest.mark.soak
def test_crash_safety_soak(client, server):
    run_crashes(client, server, SOAK)
