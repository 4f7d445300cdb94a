"""Bearer-token checks: the API key on inference routes, the admin token on adapter admin routes.

Keys are compared in constant time (`hmac.compare_digest`) and never logged or echoed.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from server.api.errors import ApiError

ADMIN_DISABLED = ("Adapter admin routes are disabled: start the server with an admin token "
                  "(environment variable LORAPLEX_ADMIN_TOKEN, or --admin-token) to enable them, "
                  "then send it as 'Authorization: Bearer <token>'.")


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(given: str | None, expected: SecretStr) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.get_secret_value().encode("utf-8"))


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request) -> None:
    """Inference routes: open when no API key is configured, else the key is required."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = bearer_token(request)
    if given is None:
        raise _unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")
    if not token_matches(given, expected):
        raise _unauthorized("Incorrect API key provided.")


async def require_admin(request: Request) -> None:
    """Adapter admin routes: disabled (403) without an admin token, else the token is required."""
    expected = request.app.state.settings.admin_token
    if expected is None:
        raise ApiError(403, ADMIN_DISABLED, code="admin_disabled")
    given = bearer_token(request)
    if given is None:
        raise _unauthorized("Missing admin token: send it as 'Authorization: Bearer <token>'.")
    if not token_matches(given, expected):
        raise _unauthorized("Incorrect admin token provided.")
