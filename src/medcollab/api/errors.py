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
from sqlalchemy.exc import DBAPIError
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


def _records_status() -> dict[type[e.MedcollabError], int]:
    # Imported late: the records package depends on this module's status table for batches.
    from medcollab.crypto.keys import SealedDataError  # noqa: PLC0415
    from medcollab.keys.services import KeyDestroyed  # noqa: PLC0415
    from medcollab.records import bundles, repository  # noqa: PLC0415

    return {
        KeyDestroyed: 410,
        SealedDataError: 500,
        repository.RecordGone: 410,
        repository.RecordErased: 410,
        repository.RecordIntegrityFailure: 500,
        repository.VersionConflict: 412,
        bundles.TransactionFailed: 400,
    }


def status_for(exc: e.MedcollabError) -> int:
    inner = getattr(exc, "inner", None)
    if isinstance(inner, e.MedcollabError):
        return status_for(inner)
    for cls in type(exc).__mro__:
        status = _records_status().get(cls)
        if status is not None:
            return status
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


_ISSUE_CODES: Final[dict[int, str]] = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "invalid",
    429: "throttled",
    500: "exception",
    503: "transient",
}


def _is_fhir(request: Request) -> bool:
    return request.url.path.startswith("/fhir/")


def operation_outcome(
    status: int,
    message: str,
    expressions: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """FHIR errors: an OperationOutcome, one issue per problem, element paths in ``expression``."""
    code = _ISSUE_CODES.get(status, "processing")
    issues: list[dict[str, object]] = []
    for path, text in expressions or []:
        issues.append(
            {"severity": "error", "code": code, "diagnostics": text, "expression": [path]}
        )
    if not issues:
        issues.append({"severity": "error", "code": code, "diagnostics": message})
    return JSONResponse(
        {"resourceType": "OperationOutcome", "issue": issues},
        status_code=status,
        headers=headers,
        media_type="application/fhir+json",
    )


def _issues_of(exc: e.MedcollabError) -> list[tuple[str, str]]:
    source = getattr(exc, "inner", exc)
    issues = getattr(source, "issues", None) or []
    return [(str(getattr(i, "path", "")), str(getattr(i, "message", ""))) for i in issues][:50]


def install(app: FastAPI) -> None:
    @app.exception_handler(e.MedcollabError)
    async def _medcollab_error(request: Request, exc: e.MedcollabError) -> JSONResponse:
        headers = None
        if isinstance(exc, e.TooManyAttempts):
            headers = {"Retry-After": str(exc.retry_after)}
        if isinstance(exc, e.AuthenticationFailed):
            headers = {"WWW-Authenticate": "Bearer"}
        status = status_for(exc)
        if status >= 500:
            log.error("request failed closed", extra={"error_code": exc.code, "status": status})
        if _is_fhir(request):
            return operation_outcome(status, exc.message, _issues_of(exc), headers)
        return error_response(status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if _is_fhir(request):
            return operation_outcome(400, _describe_validation(exc))
        return error_response(422, "invalid_request", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        known = {
            400: ("invalid_request", "the request body could not be parsed: send UTF-8 JSON"),
            404: ("not_found", "no such endpoint"),
            405: ("method_not_allowed", "method not allowed"),
        }
        code, message = known.get(exc.status_code, ("http_error", "the request was refused"))
        if _is_fhir(request):
            return operation_outcome(exc.status_code, message)
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
        if isinstance(exc, DBAPIError):
            # The database cannot do its part (locked, full, read-only, gone): fail closed.
            message = f"the service is temporarily unavailable; incident {incident}"
            if _is_fhir(_request):
                return operation_outcome(503, message)
            return error_response(503, "service_unavailable", message)
        message = f"internal error; quote incident {incident} to the operator"
        if _is_fhir(_request):
            return operation_outcome(500, message)
        return error_response(500, "internal_error", message)
