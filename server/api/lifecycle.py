"""Where the server is in its life: starting (no engine yet), serving, draining for shutdown.

`AdmissionGate` (pure ASGI, after auth, before any body is read) answers for the whole
API: while the model loads (`app.state.engine is None`) every `/v1` route is a 503
`engine_not_ready`; once draining starts (SIGTERM), new inference requests and uploads are
a 503 `shutting_down`, while requests already admitted run to their end. It also counts
the `/v1` requests in flight, which the drain waits for.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import error_response

STARTUP_RETRY_AFTER = 5
ADMISSION_ROUTES = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/adapters"),
                    ("POST", "/v1/load_lora_adapter")}


@dataclass
class Lifecycle:
    """Shared by the app and the process that serves it (server/api/serving.py)."""

    shutting_down: bool = False
    in_flight: int = 0            # /v1 requests admitted and not yet answered in full
    load_error: str | None = None


class AdmissionGate:
    def __init__(self, app: ASGIApp, state) -> None:
        self.app, self.state = app, state  # state: the FastAPI app's `state`

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        lifecycle: Lifecycle = self.state.lifecycle
        refused = None
        if lifecycle.shutting_down and (scope["method"], scope["path"]) in ADMISSION_ROUTES:
            refused = error_response(503, "the server is shutting down; retry on another replica",
                                     code="shutting_down", headers={"Retry-After": "1", "Connection": "close"})
        elif self.state.engine is None:
            refused = error_response(503, "the model is still loading; retry shortly", code="engine_not_ready",
                                     headers={"Retry-After": str(STARTUP_RETRY_AFTER), "Connection": "close"})
        if refused is not None:
            await refused(scope, receive, send)
            return
        lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            lifecycle.in_flight -= 1
