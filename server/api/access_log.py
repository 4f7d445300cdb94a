"""One log line and one metrics update per HTTP request (pure ASGI, so streams are timed to their end).

The line carries the request id, route, adapter, status, tokens and times; never a
prompt, a completion or a key. Routes add their fields to `scope["loraplex"]`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.metrics import ApiMetrics

log = logging.getLogger("server.api.access")

SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
QUIET_ROUTES = ("/health", "/ready", "/metrics")


def _incoming_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"x-request-id":
            text = value.decode("latin-1")
            return text if SAFE_ID.fullmatch(text) else None
    return None


class AccessLog:
    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = scope.setdefault("loraplex", {})
        info["id"] = _incoming_id(scope) or uuid.uuid4().hex
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", info["id"].encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, info, status, time.perf_counter() - started)

    def _record(self, scope: Scope, info: dict, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        self.metrics.http_response(route, scope["method"], status)
        fields = {"id": info["id"], "method": scope["method"], "route": route, "status": status,
                  "model": info.get("model"), "prompt_tokens": info.get("prompt_tokens"),
                  "completion_tokens": info.get("completion_tokens"), "ttft_ms": info.get("ttft_ms"),
                  "duration_ms": round(seconds * 1000, 1), "outcome": info.get("outcome")}
        line = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        log.log(logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO, "request %s", line)
