"""Request bodies: a cap on JSON bodies, counted as they arrive, and a read timeout for slow clients.

Uploads (`POST /v1/adapters`) have their own, larger limit (`--max-adapter-bytes`) and
are read by `uploads.py` with `read_body_chunks`. A body over the cap is answered 413
without being read further; a client that sends nothing for `read_timeout` seconds while
its body is incomplete is answered 408 and its connection closed, so an idle or
byte-a-second client holds a connection for bounded time only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response

JSON_BODY_LIMIT = 8 * 2**20
UPLOAD_PATHS = ("/v1/adapters",)
CLOSE = {"Connection": "close"}


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body reading lets it through (it turns other errors into 400s)."""

    code = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes", headers=CLOSE)


class BodyReadTimeout(HTTPException):
    code = "request_timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the client sent nothing for {seconds:g} s while sending its body", headers=CLOSE)


async def receive_body_message(receive: Receive, timeout: float) -> Message:
    """The next message of an incomplete body, or BodyReadTimeout after `timeout` seconds of silence."""
    try:
        async with asyncio.timeout(timeout):  # no task per message, unlike wait_for: chunks are many
            return await receive()
    except TimeoutError:
        raise BodyReadTimeout(timeout) from None


async def read_body_chunks(receive: Receive, timeout: float) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, each within `timeout` seconds of the previous one."""
    while True:
        message = await receive_body_message(receive, timeout)
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int = JSON_BODY_LIMIT, read_timeout: float = 30.0) -> None:
        self.app, self.limit, self.read_timeout = app, limit, read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS):
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(BodyTooLarge(self.limit), scope, receive, send)
                return
        received, body_done, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body: waiting for a disconnect has no time limit
                return await receive()
            message = await receive_body_message(receive, self.read_timeout)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except (BodyTooLarge, BodyReadTimeout) as exc:
            if started:
                raise
            await self._refuse(exc, scope, receive, send)

    async def _refuse(self, exc: HTTPException, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(exc.status_code, str(exc.detail), code=getattr(exc, "code", None),
                                  headers=dict(exc.headers or {}))
        await response(scope, receive, send)
