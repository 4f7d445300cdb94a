"""The cluster's HTTP front: checks credentials, reads the body, picks the multiplexed model id, relays.

A plain ASGI app with no Ray in it (the Ray deployment in `ray_serve.py` hands it a `forward`
function), so it is tested without a cluster. It answers `/health` and `/metrics` (every
replica's series, merged) itself; every other request is relayed to one replica, which runs it
through the single server's own app: same routes, same validation, same errors. Credentials are
checked here before a byte of the body is read (and again by the replica); bodies are bounded
like the single server's. A replica that dies before it answered a completion or a listing is
retried (up to 3 times) on another replica; one that dies mid-stream ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.types import Message, Receive, Scope, Send

from server.api.auth import refusal
from server.api.body_limit import JSON_BODY_LIMIT, UPLOAD_PATHS
from server.api.errors import error_body, error_response
from server.config import Settings
from server.deploy.forwarding import ForwardedRequest, ResponseStart
from server.deploy.routing import RETRYABLE_PATHS, multiplexed_model_id

log = logging.getLogger(__name__)

Forward = Callable[[ForwardedRequest, str | None], AsyncIterator[ResponseStart | bytes]]
RETRIES, RETRY_PAUSE = 3, 0.5
MULTIPART_SLACK = 2**20  # multipart framing around an upload's files; the replica checks the exact limit


class ClientGone(Exception):
    pass


class BodyRefused(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class IngressApp:
    def __init__(self, settings: Settings, forward: Forward, metrics: Callable[[], Awaitable[bytes]],
                 base_name: Callable[[], Awaitable[str]]) -> None:
        self.settings, self.forward, self.metrics, self.base_name = settings, forward, metrics, base_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/health":
            await _json(send, 200, {"status": "ok"})
            return
        if path == "/metrics" and method == "GET":
            await _send(send, 200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
                        await self.metrics())
            return
        refused = refusal(scope, self.settings)
        if refused is not None:
            status, message, code = refused
            headers = {"Connection": "close", **({"WWW-Authenticate": "Bearer"} if status == 401 else {})}
            await error_response(status, message, code=code, headers=headers)(scope, receive, send)
            return
        upload = path in UPLOAD_PATHS and method == "POST"
        try:
            body = await read_body(scope, receive, self.limit(upload), self.timeout(upload))
        except BodyRefused as exc:
            await error_response(exc.status, exc.message, code=exc.code,
                                 headers={"Connection": "close"})(scope, receive, send)
            return
        except ClientGone:
            return
        base = await self.base_name() if method == "POST" else None
        request = ForwardedRequest(method, path, scope.get("query_string", b""),
                                   tuple((bytes(k), bytes(v)) for k, v in scope.get("headers", ())), body,
                                   tuple(scope.get("client") or ("127.0.0.1", 0)))
        await self.relay(request, multiplexed_model_id(method, path, body, base), send)

    def limit(self, upload: bool) -> int:
        return self.settings.max_adapter_bytes + MULTIPART_SLACK if upload else JSON_BODY_LIMIT

    def timeout(self, upload: bool) -> float:
        return self.settings.upload_read_timeout if upload else self.settings.body_read_timeout

    async def relay(self, request: ForwardedRequest, model_id: str | None, send: Send) -> None:
        attempts = RETRIES + 1 if request.path in RETRYABLE_PATHS else 1
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(RETRY_PAUSE * attempt)  # the router learns of a dead replica within a second
            started = streamed = False
            try:
                async for item in self.forward(request, model_id):
                    if isinstance(item, ResponseStart):
                        await send({"type": "http.response.start", "status": item.status,
                                    "headers": list(item.headers)})
                        started = True
                        streamed = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                       for k, v in item.headers)
                    else:
                        await send({"type": "http.response.body", "body": item, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            except Exception as exc:  # noqa: BLE001 - a replica died or could not be reached
                log.warning("replica lost during %s %s (attempt %d): %s", request.method, request.path,
                            attempt + 1, exc)
                if started:
                    await _end_stream(send, streamed)
                    return
        await _json(send, 503, error_body(503, "no replica could serve the request; try again",
                                          code="replica_unavailable"), [(b"retry-after", b"1")])


async def read_body(scope: Scope, receive: Receive, limit: int, timeout: float) -> bytes:
    """The whole body, refused (413) past `limit` bytes or (408) when nothing comes for `timeout` seconds."""
    for key, value in scope.get("headers", ()):
        if key == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyRefused(413, f"the request body is larger than {limit} bytes", "body_too_large")
    chunks, size = [], 0
    while True:
        try:
            message: Message = await asyncio.wait_for(receive(), timeout)
        except TimeoutError:
            raise BodyRefused(408, f"the client sent nothing for {timeout:g} s while sending its body",
                              "request_timeout") from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyRefused(413, f"the request body is larger than {limit} bytes", "body_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _end_stream(send: Send, streamed: bool) -> None:
    """A replica died after the response began: say so in the stream (SSE) and close it."""
    if streamed:
        event = json.dumps(error_body(503, "the replica serving this stream stopped", code="replica_unavailable"))
        await send({"type": "http.response.body", "body": f"data: {event}\n\ndata: [DONE]\n\n".encode(),
                    "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _json(send: Send, status: int, payload: dict, headers: list | None = None) -> None:
    await _send(send, status, [(b"content-type", b"application/json"), *(headers or [])],
                json.dumps(payload).encode())


async def _send(send: Send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
