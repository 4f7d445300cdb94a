"""OpenAI-style error bodies, `{"error": {"message", "type", "param", "code"}}`, for every failure."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.engine.request import EngineError

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable"}

# The engine's error codes and the HTTP status each one is answered with (the engine knows no HTTP).
ENGINE_STATUS = {"model_not_found": 404, "context_length_exceeded": 400, "invalid_request": 400,
                 "adapter_unavailable": 409, "adapter_version_mismatch": 409, "queue_full": 429,
                 "engine_not_ready": 503, "shutting_down": 503, "invalid_adapter": 400, "adapter_exists": 409,
                 "adapter_protected": 403, "internal_error": 500}
DEFAULT_RETRY_AFTER = 1


class ApiError(Exception):
    """A request the API refuses by itself, before or without the engine."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if status == 429 and not (headers and "Retry-After" in headers):
        headers = {**(headers or {}), **(retry_headers(429) or {})}
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def engine_status(exc: EngineError) -> int:
    """The HTTP status of an engine error, from its `code` (an unknown code is a bad request, never a 500)."""
    return ENGINE_STATUS.get(getattr(exc, "code", ""), 400)


def retry_headers(status: int, retry_after: int | None = None) -> dict[str, str] | None:
    """A 429 or 503 always says when to come back."""
    if status not in (429, 503):
        return None
    return {"Retry-After": str(max(1, int(retry_after or DEFAULT_RETRY_AFTER)))}


def engine_error_response(exc: EngineError) -> JSONResponse:
    status = engine_status(exc)
    headers = retry_headers(status, getattr(exc, "retry_after", None))
    param = "model" if exc.code in ("model_not_found", "adapter_version_mismatch") else None
    return error_response(status, str(exc) or exc.code, code=exc.code, param=param, headers=headers)


def engine_error_body(exc: EngineError) -> dict:
    return error_body(engine_status(exc), str(exc) or exc.code, code=exc.code)


TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc: tuple) -> list[str]:
    """The location without "body" and without pydantic's union-branch tags (`str`, `list[str]`, ...)."""
    return [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (p in TYPE_TAGS or "[" in p))]


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence naming the invalid field, like OpenAI's 400s."""
    errors = list(exc.errors())
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        return "The request body is not valid JSON: " + str(errors[0].get("ctx", {}).get("error", "")), None
    # Of a union's branches, the deepest error is the one that says what is wrong.
    first = max(errors, key=lambda e: len(_field_path(e.get("loc", ()))))
    path = _field_path(first.get("loc", ()))
    param = ".".join(path) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "Unrecognized request argument supplied"
    elif first.get("type") == "missing":
        message = "Missing required parameter"
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, code="invalid_value", param=param)

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return engine_error_response(exc)

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, code=exc.code, param=exc.param, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=getattr(exc, "code", None),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the log; the client gets no internals.
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "The server had an error while processing your request.", code="internal_error")
