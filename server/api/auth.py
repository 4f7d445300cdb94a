"""Bearer-token checks, made in pure ASGI middleware before a single byte of the body is read.

FastAPI parses a JSON body before route dependencies run, so a check in a dependency
would let an unauthenticated client make the server buffer its body. `AuthGate` looks
only at the path and the `Authorization` header: inference routes need the API key (when
one is configured), adapter admin routes need the admin token (403 when none is
configured). Keys are compared in constant time (`hmac.compare_digest`) and never logged
or echoed. A refused request is answered at once and its connection closed, body unread.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import error_response
from server.config import Settings

ADMIN_DISABLED = ("Adapter admin routes are disabled: start the server with an admin token "
                  "(environment variable LORAPLEX_ADMIN_TOKEN, or --admin-token) to enable them, "
                  "then send it as 'Authorization: Bearer <token>'.")
ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
INFERENCE_PREFIX = "/v1/"
TOKENIZER_PATHS = ("/tokenize", "/detokenize")  # vLLM's paths, outside /v1, behind the API key all the same


def is_admin_path(path: str) -> bool:
    return path == "/v1/adapters" or path.startswith("/v1/adapters/") or path in ADMIN_PATHS


def is_inference_path(path: str) -> bool:
    return (path.startswith(INFERENCE_PREFIX) and not is_admin_path(path)) or path in TOKENIZER_PATHS


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def bearer_token(scope: Scope) -> str | None:
    raw = header(scope, b"authorization")
    if not raw:
        return None
    scheme, _, token = raw.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(given: str | None, expected: SecretStr) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               expected.get_secret_value().encode("utf-8"))


def refusal(scope: Scope, settings: Settings) -> tuple[int, str, str] | None:
    """(status, message, code) when the request must be refused, None when it may proceed."""
    path = scope.get("path", "")
    if is_admin_path(path):
        expected, what = settings.admin_token, "admin token"
        if expected is None:
            return 403, ADMIN_DISABLED, "admin_disabled"
    elif is_inference_path(path):
        expected, what = settings.api_key, "API key"
        if expected is None:
            return None
    else:
        return None
    given = bearer_token(scope)
    if given is None:
        return 401, f"Missing {what}: send it as 'Authorization: Bearer <{what.split()[-1]}>'.", "invalid_api_key"
    if not token_matches(given, expected):
        return 401, f"Incorrect {what} provided.", "invalid_api_key"
    return None


class AuthGate:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = refusal(scope, self.settings)
        if refused is None:
            await self.app(scope, receive, send)
            return
        status, message, code = refused
        headers = {"Connection": "close"}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        await error_response(status, message, code=code, headers=headers)(scope, receive, send)
