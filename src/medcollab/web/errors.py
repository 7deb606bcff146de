"""Errors on web pages become pages, in the reader's language; the APIs keep their JSON.

:func:`install` wraps the application's exception handlers (``medcollab.api.errors``): for a path
under the web prefixes it answers with HTML (or, for an expired session, a redirect to sign-in),
for anything else it calls the API's handler unchanged. Statuses are the API's
(``api.errors.status_for``), so a page refuses exactly what the API refuses. Like the API, an error
page names no internal detail: a translated explanation per kind of error, and for unexpected
errors an incident id that the operator finds in the log.
"""

from __future__ import annotations

import inspect
import logging
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from medcollab import errors as e
from medcollab.api.deps import SESSION_COOKIE
from medcollab.api.errors import status_for
from medcollab.web import render
from medcollab.web.deps import CSRF_COOKIE, CsrfRefused, language, pre_session_token
from medcollab.web.i18n import N_
from medcollab.web.paths import is_web_path

log = logging.getLogger("medcollab.web")

Handler = Callable[[Request, Any], Response | Awaitable[Response]]

TITLES: Final = {
    400: N_("The request could not be processed"),
    401: N_("Please sign in"),
    403: N_("Not allowed"),
    404: N_("Not found"),
    405: N_("Not allowed"),
    409: N_("Already done"),
    410: N_("No longer available"),
    413: N_("Too large"),
    415: N_("The request could not be processed"),
    422: N_("The request could not be processed"),
    429: N_("Too many attempts"),
    500: N_("Something went wrong"),
    503: N_("Temporarily unavailable"),
}
EXPLANATIONS: Final = {
    400: N_("Check what you entered and try again."),
    403: N_("Your role does not allow this here."),
    404: N_("There is nothing here, or you may not see it."),
    405: N_("This page cannot be used that way."),
    409: N_("Someone has already dealt with this. Reload the page to see the current state."),
    410: N_("This record was deleted or erased."),
    413: N_("What you sent is larger than the server accepts."),
    415: N_("Check what you entered and try again."),
    422: N_("Check what you entered and try again."),
    429: N_("Please wait a while and try again."),
    500: N_("The error has been logged. Quote the incident number to your administrator."),
    503: N_("A part of the service is unavailable. Nothing was changed; try again shortly."),
}
CSRF_EXPLANATION: Final = N_(
    "The form has expired or did not come from this site. Reload the page and try again."
)


def _sign_in(request: Request, exc: e.AuthenticationFailed) -> Response:
    target = "/login"
    if isinstance(exc, e.SessionExpired):
        target += "?expired=1"
    elif request.method == "GET" and request.url.path != "/logout":
        target += "?next=" + request.url.path
    response = render.redirect(target, request)
    render.clear_session_cookies(response)
    return response


def error_page(
    request: Request, status: int, *, explanation: str | None = None, incident: str | None = None
) -> Response:
    # The page's language switch needs a token: the session's if there is one, else a
    # pre-session token.
    session_token = (
        request.cookies.get(CSRF_COOKIE) if request.cookies.get(SESSION_COOKIE) else None
    )
    return render.anonymous_page(
        request,
        "error.html",
        language(request),
        pre_token=None if session_token else pre_session_token(request),
        csrf_token=session_token,
        status=status,
        title=TITLES.get(status, TITLES[500] if status >= 500 else TITLES[400]),
        explanation=explanation or EXPLANATIONS.get(status, EXPLANATIONS[400]),
        incident=incident,
        code=status,
    )


@contextmanager
def explained(request: Request, explanations: Mapping[type[Exception], str]) -> Iterator[None]:
    """Give the error page of an error raised inside the block a more specific explanation.

    ``explanations`` maps error types (the first that matches wins, so name subclasses first) to
    untranslated messages. The error itself propagates unchanged, so its status is the API's and
    the unit of work rolls back (or keeps a refusal's audit event) exactly as for any other error.
    """
    try:
        yield
    except tuple(explanations) as exc:
        request.state.page_explanation = next(
            text for kind, text in explanations.items() if isinstance(exc, kind)
        )
        raise


async def web_error(request: Request, exc: Exception) -> Response:  # noqa: PLR0911 - one answer per kind of error.
    """The page for an error raised while serving a web page."""
    if isinstance(exc, e.AuthenticationFailed):
        return _sign_in(request, exc)
    if isinstance(exc, e.MfaEnrollmentRequired):
        return render.redirect("/account/enrol", request)
    if isinstance(exc, e.MedcollabError):
        status = status_for(exc)
        if status >= 500:
            log.error("page failed closed", extra={"error_code": exc.code, "status": status})
        explanation = getattr(request.state, "page_explanation", None)
        response = error_page(
            request,
            status,
            explanation=CSRF_EXPLANATION if isinstance(exc, CsrfRefused) else explanation,
        )
        if isinstance(exc, e.TooManyAttempts):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, RequestValidationError):
        return error_page(request, 400)
    if isinstance(exc, StarletteHTTPException):
        return error_page(request, exc.status_code if exc.status_code in TITLES else 400)
    incident = uuid.uuid4().hex[:12]
    # The type, frames and incident only: an exception's text may quote SQL parameters or data.
    log.error(
        "unhandled error on a page",
        extra={
            "incident": incident,
            "error_type": type(exc).__name__,
            "frames": "".join(traceback.format_tb(exc.__traceback__)),
        },
    )
    if isinstance(exc, DBAPIError):
        return error_page(request, 503, incident=incident)
    return error_page(request, 500, incident=incident)


def install(app: FastAPI) -> None:
    """Route errors on web paths to :func:`web_error`; the API's handlers keep the rest."""
    if e.MedcollabError not in app.exception_handlers:
        raise RuntimeError("install medcollab.api.errors before the web pages")
    if app.middleware_stack is not None:
        raise RuntimeError("install the web pages before the application handles a request")
    for key in (e.MedcollabError, RequestValidationError, StarletteHTTPException, Exception):
        original: Handler | None = app.exception_handlers.get(key)
        if original is None:
            continue

        async def handler(request: Request, exc: Any, original: Handler = original) -> Response:
            if is_web_path(request.url.path):
                return await web_error(request, exc)
            answer = original(request, exc)
            return await answer if inspect.isawaitable(answer) else answer

        app.add_exception_handler(key, handler)
