"""A cap on JSON request bodies (inference and admin JSON routes), counted as the body arrives.

Uploads (`POST /v1/adapters`) have their own, larger limit (`--max-adapter-bytes`) and
are left to `uploads.py`. A body over the cap is answered 413 without being read further.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response

JSON_BODY_LIMIT = 8 * 2**20
UPLOAD_PATHS = ("/v1/adapters",)


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body reading lets it through (it turns other errors into 400s)."""

    code = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int = JSON_BODY_LIMIT) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS):
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(scope, receive, send)
                return
        received, started = 0, False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"the request body is larger than {self.limit} bytes", code="body_too_large")
        await response(scope, receive, send)
