"""Churn: streamed requests over many adapters and the base while an admin loop uploads,
overwrites, deletes and re-uploads under the same names; every answer is checked against
the text the weights it must come from produce.

Expected texts are keyed by content (the upload's bytes, hence its sha256): each content is
first uploaded once under its own reference name and asked the same greedy question with
nothing else running. A content's reference name is never reused, so its answer is the
answer of those weights.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from tests.reliability.adapter_factory import Adapter, random_adapter
from tests.reliability.client import (admin_headers, aupload, greedy_text, stream_completion, upload)
from tests.reliability.timeline import ABSENT, Timeline

SCALE_B = 1.0


@dataclass
class ChurnReport:
    requests: int = 0
    admin_ops: int = 0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        self.outcomes[kind] += 1
        if len(self.failures) < 20:
            self.failures.append(f"{kind}: {detail}")


def make_contents(count: int, seed: int = 1000) -> list[Adapter]:
    return [random_adapter(seed + i, scale_b=SCALE_B) for i in range(count)]


def reference_texts(client: httpx.Client, contents: list[Adapter], base: str, tag: str) -> dict[int, str]:
    """content id -> greedy text, ABSENT -> the base model's; each content alone under a fresh name."""
    texts = {ABSENT: greedy_text(client, base)}
    for i, adapter in enumerate(contents):
        name = f"ref-{tag}-{i}"
        response = upload(client, name, adapter)
        assert response.status_code == 201, response.text
        texts[i] = greedy_text(client, name)
        client.delete(f"/v1/adapters/{name}", headers=admin_headers())
    return texts


class Churn:
    """One run: `names` adapter names, `contents` possible weights, one admin loop, N request workers."""

    def __init__(self, url: str, names: list[str], contents: list[Adapter], texts: dict[int, str], base: str,
                 seed: int = 0) -> None:
        self.url, self.names, self.contents, self.texts, self.base = url, names, contents, texts, base
        self.rng = random.Random(seed)
        self.timeline = Timeline()
        self.report = ChurnReport()
        self.sha_of = {i: a.sha256 for i, a in enumerate(contents)}

    async def setup(self, client: httpx.AsyncClient) -> None:
        """Every name starts holding a distinct content."""
        for i, name in enumerate(self.names):
            response = await aupload(client, name, self.contents[i], overwrite=True)
            assert response.status_code == 201, response.text
            self.timeline.begin(name, i, time.monotonic())

    async def admin_loop(self, client: httpx.AsyncClient, ops: int, done: asyncio.Event) -> None:
        try:
            for _ in range(ops):
                await self._admin_op(client)
                await asyncio.sleep(self.rng.uniform(0.0, 0.3))
        finally:
            done.set()

    async def _admin_op(self, client: httpx.AsyncClient) -> None:
        name = self.rng.choice(self.names)
        held = self.timeline.current(name)
        delete = held != ABSENT and self.rng.random() < 0.4
        content = ABSENT if delete else self.rng.choice([i for i in range(len(self.contents)) if i != held])
        self.timeline.announce(name, content, time.monotonic())
        if delete:
            response, expected = await client.delete(f"/v1/adapters/{name}", headers=admin_headers()), 200
        else:
            response = await aupload(client, name, self.contents[content], overwrite=held != ABSENT)
            expected = 201
        acked = time.monotonic()
        self.report.admin_ops += 1
        if response.status_code != expected:
            self.timeline.settle(name, None)
            self.report.fail("admin_error", f"{name}: {response.status_code} {response.text[:200]}")
            return
        self.timeline.settle(name, acked)

    async def request_worker(self, client: httpx.AsyncClient, count: int) -> None:
        for _ in range(count):
            await self._one_request(client)

    def _pick_model(self) -> tuple[str, str | None, int | None]:
        """(model string, adapter name or None for the base, pinned content id or None)."""
        roll = self.rng.random()
        if roll < 0.15:
            return self.base, None, None
        name = self.rng.choice(self.names)
        held = self.timeline.current(name)
        if roll < 0.35 and held != ABSENT:
            return f"{name}@{self.sha_of[held][:12]}", name, held
        return name, name, None

    async def _one_request(self, client: httpx.AsyncClient) -> None:
        model, name, pinned = self._pick_model()
        t0 = time.monotonic()
        result = await stream_completion(client, model)
        t1 = time.monotonic()
        self.report.requests += 1
        self.report.latencies.append(t1 - t0)
        possible = self.timeline.possible(name, t0, t1) if name else {ABSENT}
        self._judge(model, possible, pinned, result)

    def _judge(self, model: str, possible: set[int], pinned: int | None, result) -> None:
        if result.status >= 500:
            return self.report.fail("5xx", f"{model}: {result.status} {result.error[:200]}")
        if result.status == 404 and ABSENT in possible and model != self.base:
            return self.report.outcomes.update(["404_deleted"])
        if result.status == 409 and pinned is not None and possible != {pinned}:
            return self.report.outcomes.update(["409_version_moved"])
        if result.status != 200 or result.error or not result.done:
            return self.report.fail("unexpected_error", f"{model}: {result.status} {result.error[:200]}")
        allowed = {pinned} if pinned is not None else possible
        allowed = allowed if model != self.base else {ABSENT}
        if any(self.texts[c] == result.text for c in allowed if c != ABSENT or model == self.base):
            return self.report.outcomes.update(["ok"])
        owner = [c for c, text in self.texts.items() if text == result.text]
        kind = "wrong_weights" if owner else "unexplained_text"
        self.report.fail(kind, f"{model}: got {result.text!r} (matches content {owner}), allowed {sorted(allowed)}")

    async def run(self, requests: int, workers: int, admin_ops: int) -> ChurnReport:
        limits = httpx.Limits(max_connections=workers + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as client:
            await self.setup(client)
            done = asyncio.Event()
            per_worker = [requests // workers + (1 if i < requests % workers else 0) for i in range(workers)]
            await asyncio.gather(self.admin_loop(client, admin_ops, done),
                                 *(self.request_worker(client, n) for n in per_worker))
        return self.report
