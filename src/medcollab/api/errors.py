"""The one place where errors become HTTP responses.

Clients get ``{"error": code, "message": text}`` and nothing else: no stack trace, no SQL, no secret.
Unexpected exceptions are logged server-side with a correlation id that the client also receives.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from typing import Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medcollab import errors as e

log = logging.getLogger("medcollab.api")

STATUS: Final[dict[type[e.MedcollabError], int]] = {
    e.InvalidInput: 400,
    e.UnsupportedMediaType: 415,
    e.PayloadTooLarge: 413,
    e.AuthenticationFailed: 401,
    e.PermissionDenied: 403,
    e.MfaEnrollmentRequired: 403,
    e.NotFound: 404,
    e.Conflict: 409,
    e.TooManyAttempts: 429,
    e.ConfigurationError: 503,
    e.ServiceUnavailable: 503,
}


def status_for(exc: e.MedcollabError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts: list[str] = []
    for err in exc.errors()[:5]:
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        kind = err.get("type", "")
        if kind == "json_invalid":
            parts.append("the body is not valid JSON")
        elif kind == "extra_forbidden":
            parts.append(f"unknown field '{location}'")
        elif kind == "missing":
            parts.append(f"'{location}' is required")
        else:
            # Pydantic's messages describe the rule, never echo the value.
            parts.append(f"'{location}': {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is invalid"


def install(app: FastAPI) -> None:
    @app.exception_handler(e.MedcollabError)
    async def _medcollab_error(_request: Request, exc: e.MedcollabError) -> JSONResponse:
        headers = None
        if isinstance(exc, e.TooManyAttempts):
            headers = {"Retry-After": str(exc.retry_after)}
        if isinstance(exc, e.AuthenticationFailed):
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(status_for(exc), exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        known = {
            400: ("invalid_request", "the request body could not be parsed: send UTF-8 JSON"),
            404: ("not_found", "no such endpoint"),
            405: ("method_not_allowed", "method not allowed"),
        }
        code, message = known.get(exc.status_code, ("http_error", "the request was refused"))
        return error_response(exc.status_code, code, message)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        # The exception type and incident id only: exception text may quote SQL or data.
        # Frames only, never the exception text: a database error's text may quote SQL parameters.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error(
            "unhandled error",
            extra={"incident": incident, "error_type": type(exc).__name__, "frames": frames},
        )
        return error_response(
            500, "internal_error", f"internal error; quote incident {incident} to the operator"
        )
