"""Auth: every admin route (and every inference route, when a key is set) refuses a missing or wrong
credential before it reads the request body; no key or token shows in any log line or error body."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.reliability.figures import record
from tests.reliability.raw_http import head_only
from tests.reliability.server_proc import ADMIN, KEY

WRONG = "wrong-credential-7c4d2a"
DECLARED = 2**20         # announced body size (within every body limit): never sent
ANSWER_WITHIN = 5.0     # seconds: a server waiting for the body runs past this


def routes(client: httpx.Client) -> list[tuple[str, str, str]]:
    """(method, path, kind) for every operation in /openapi.json that needs a credential."""
    spec = client.get("/openapi.json").json()
    out = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            tags = op.get("tags") or []
            kind = "admin" if "adapters" in tags or "lora_adapter" in path else "inference" if "inference" in tags else None
            if kind:
                out.append((method.upper(), path.replace("{name}", "some-adapter"), kind))
    return out


def credentials(kind: str) -> dict[str, dict[str, str]]:
    other = KEY if kind == "admin" else ADMIN  # the other route family's secret is a wrong credential too
    return {"missing": {}, "wrong": {"Authorization": f"Bearer {WRONG}"},
            "other secret": {"Authorization": f"Bearer {other}"}}


def probe(url: str, method: str, path: str, headers: dict[str, str]) -> tuple[int | None, bytes, float]:
    content_type = "multipart/form-data; boundary=x" if path == "/v1/adapters" else "application/json"
    return head_only(url, method, path, {**headers, "Content-Type": content_type}, DECLARED, b'{"model": ',
                     ANSWER_WITHIN)


def test_auth_before_body_and_no_secret_leaks(client, server):
    jobs = [(method, path, label, headers) for method, path, kind in routes(client)
            for label, headers in credentials(kind).items()]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:  # probes run at once: a stuck one costs 5 s, not 5 s each
        answers = list(pool.map(lambda job: probe(server.url, job[0], job[1], job[3]), jobs))
    failures, bodies = [], [raw for _, raw, _ in answers]
    for (method, path, label, _), (status, _, seconds) in zip(jobs, answers):
        if status != 401:
            failures.append(f"{method} {path} ({label} credential): "
                            f"{'no answer before the body' if status is None else status} after {seconds:.1f} s")
    checked, slowest = len(jobs), max(seconds for _, _, seconds in answers)
    time.sleep(0.5)  # let the server flush its log lines
    leaks = [secret for secret in (ADMIN, KEY, WRONG) for raw in bodies if secret.encode() in raw]
    log = server.log_text()
    log_leaks = [secret for secret in (ADMIN, KEY, WRONG) if secret in log]
    record("auth", "short", {"route_credential_pairs": checked, "failures": len(failures), "failure_list": failures,
                             "slowest_refusal_s": round(slowest, 2), "secrets_in_error_bodies": len(set(leaks)),
                             "secrets_in_log": len(log_leaks), "log_lines_scanned": log.count("\n")})
    assert checked >= 18
    assert not failures, "\n".join(failures)
    assert not leaks and not log_leaks
