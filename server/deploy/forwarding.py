"""A request as it crosses from the ingress to a replica, and the replica running it through its own app.

The replica's app is the single server's FastAPI app (`server.api.app.create_app`), so
routes, validation, auth, errors and streaming are exactly the single server's. The
response comes back as a stream: first `ResponseStart`, then body chunks as the app sends
them (server-sent events stay token by token). If the ingress stops reading (its client
left), the app sees `http.disconnect` and the engine cancels the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

CANCEL_WAIT = 5.0  # seconds an app gets to finish after its client left, before it is cancelled


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    client: tuple[str, int] = ("127.0.0.1", 0)


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())


def scope_of(request: ForwardedRequest) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
            "query_string": request.query_string, "root_path": "", "headers": list(request.headers),
            "client": request.client, "server": ("127.0.0.1", 0), "state": {}}


async def run_app(app: ASGIApp, request: ForwardedRequest,
                  extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> AsyncIterator[ResponseStart | bytes]:
    """Run `request` through `app`; yields its `ResponseStart` (with `extra_headers`), then its body chunks."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    left = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    task = asyncio.ensure_future(app(scope_of(request), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], tuple(message.get("headers", ())) + extra_headers)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        if task.done() and (error := task.exception()) is not None:
            raise error
    finally:
        left.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), CANCEL_WAIT)
            except (TimeoutError, Exception):  # noqa: BLE001 - the client is gone either way
                task.cancel()
