"""Churn suite: no answer from the wrong weights while names are uploaded, overwritten and deleted."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.reliability.churn import Churn, make_contents, reference_texts
from tests.reliability.client import adapter_shas, admin_headers
from tests.reliability.figures import percentile, record
from tests.reliability.forms import SHORT, SOAK, Form
from tests.reliability.server_proc import BASE_NAME
from tests.reliability.timeline import ABSENT


def run_churn(client, server, form: Form) -> None:
    started = time.monotonic()
    contents = make_contents(form.churn_contents)
    texts = reference_texts(client, contents, BASE_NAME, form.name)
    distinct = len(set(texts.values()))
    assert distinct == len(texts), f"reference texts are not distinct: {texts}"
    names = [f"churn-{form.name}-{i}" for i in range(form.churn_names)]
    churn = Churn(server.url, names, contents, texts, BASE_NAME, seed=7)
    report = asyncio.run(churn.run(form.churn_requests, form.churn_workers, form.churn_admin_ops))
    final = adapter_shas(client)
    consistency = []
    for name in names:
        held = churn.timeline.current(name)
        if held == ABSENT:
            if name in final:
                consistency.append(f"{name} listed after its delete was acknowledged")
            continue
        if name not in final:
            consistency.append(f"{name} missing after its upload was acknowledged")
        elif final[name] != contents[held].sha256:
            consistency.append(f"{name}: sha256 {final[name]} != uploaded {contents[held].sha256[:16]}")
        client.delete(f"/v1/adapters/{name}", headers=admin_headers())
    failures = sum(v for k, v in report.outcomes.items() if k not in ("ok", "404_deleted", "409_version_moved"))
    record("churn", form.name, {
        "requests": report.requests, "admin_ops": report.admin_ops, "names": len(names),
        "contents": len(contents), "outcomes": dict(report.outcomes), "failures": failures,
        "consistency_failures": consistency, "failure_examples": report.failures,
        "latency_p50_s": round(percentile(report.latencies, 50), 3),
        "latency_p99_s": round(percentile(report.latencies, 99), 3),
        "seconds": round(time.monotonic() - started, 1)})
    assert failures == 0, report.failures
    assert not consistency, consistency
    assert "lock order:" not in server.log_text(), "an adapter lock was taken out of order (see the server log)"


def test_churn_short(client, server):
    run_churn(client, server, SHORT)


@pytest.mark.soak
def test_churn_soak(client, server):
    run_churn(client, server, SOAK)
