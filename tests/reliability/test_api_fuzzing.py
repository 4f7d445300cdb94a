"""API fuzzing: zero 5xx and zero schema violations over every route, with and without keys."""

from __future__ import annotations

import time

import pytest

from tests.reliability.figures import record
from tests.reliability.forms import SHORT, SOAK, Form
from tests.reliability.fuzzing import FuzzReport, fuzz


def run_fuzz(server, form: Form) -> None:
    started = time.monotonic()
    report = fuzz(server.url, form.fuzz_cases, FuzzReport())
    record("api_fuzzing", form.name, {
        "cases": report.cases, "failures": report.failure_count, "operations": len(report.per_operation),
        "statuses": {str(k): v for k, v in sorted(report.statuses.items())},
        "server_errors": sum(v for k, v in report.statuses.items() if k >= 500),
        "failure_examples": report.failures, "seconds": round(time.monotonic() - started, 1)})
    assert report.cases >= form.fuzz_cases * 0.8
    assert report.failure_count == 0, "\n".join(report.failures)


@pytest.mark.full  # its soak form covers it; left out of `make test` to keep it under 5 minutes
def test_api_fuzzing_short(client, server):
    run_fuzz(server, SHORT)


@pytest.mark.soak
def test_api_fuzzing_soak(client, server):
    run_fuzz(server, SOAK)
