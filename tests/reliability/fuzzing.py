"""Schemathesis against the running server's own /openapi.json: every operation, positive and
negative data, with the right credentials, a wrong one and none.

A response fails when it is a 5xx, has a status the schema does not list for the operation,
a content type it does not declare, or a body that violates its schema. Generation cost is
bounded: a generated `max_tokens` / `n` / `best_of` is clamped so one case never asks the
CPU for a long generation (the request's shape is still fuzzed).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from tests.reliability.client import admin_headers, key_headers

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
CLAMPS = {"max_tokens": 2, "max_completion_tokens": 2, "n": 2, "best_of": 2, "logprobs": 2, "top_logprobs": 2}
CREDENTIALS = {"right": None, "wrong": {"Authorization": "Bearer fuzz-wrong-token-3e1f"}, "none": {}}


@dataclass
class FuzzReport:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    per_operation: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0
    skipped: list[str] = field(default_factory=list)


def clamp(body: object) -> None:
    if isinstance(body, dict):
        for key, most in CLAMPS.items():
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > most:
                body[key] = most


def right_headers(operation) -> dict[str, str]:
    return admin_headers() if "adapters" in (operation.definition.raw.get("tags") or []) or \
        "lora_adapter" in operation.path else key_headers()


def fuzz(url: str, cases: int, report: FuzzReport) -> FuzzReport:
    """~`cases` cases: 80% positive and negative data with the right credentials, 20% valid-looking data
    with a wrong credential or none (every route that needs one must refuse it, with a documented 401/403)."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    positive, negative = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
    combos = [(op, mode, "right") for op in operations for mode in (positive, negative)]
    combos += [(op, positive, credential) for op in operations for credential in ("wrong", "none")]
    right_share = max(1, round(cases * 0.8 / (2 * len(operations))))
    other_share = max(1, round(cases * 0.2 / (2 * len(operations))))
    for round_seed in range(20):  # small input spaces (GET /health) give fewer cases than asked: go round again
        for operation, mode, credential in combos:
            headers = CREDENTIALS[credential] if CREDENTIALS[credential] is not None else right_headers(operation)
            examples = right_share if credential == "right" else other_share
            _run_one(url, operation, operation.as_strategy(generation_mode=mode), headers, examples, report,
                     f"{operation.method.upper()} {operation.path} [{mode.value}, {credential} credentials]", round_seed)
        if report.cases >= cases:
            break
    return report


def _run_one(url: str, operation, strategy, headers: dict, examples: int, report: FuzzReport, label: str,
             round_seed: int) -> None:
    @seed(round_seed)
    @settings(max_examples=examples, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case) -> None:
        clamp(case.body)
        # Our credentials replace any generated Authorization header; "none" removes it.
        if case.headers:
            case.headers.pop("Authorization", None)
            case.headers.pop("authorization", None)
        response = case.call(base_url=url, headers=headers, timeout=60)
        report.cases += 1
        report.per_operation[label.split(" [")[0]] += 1
        report.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:  # a schemathesis FailureGroup: keep its first lines
            report.failure_count += 1
            if len(report.failures) < 25:
                first = str(exc).strip().splitlines()
                report.failures.append(f"{label}: {response.status_code} {' | '.join(first[:4])[:300]}")

    try:
        run()
    except Unsatisfiable:  # no negative data exists for an operation without inputs (GET /health)
        report.skipped.append(label)
