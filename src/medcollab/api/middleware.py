"""Transport-level protections for every response: security headers, a body limit, an access log.

Three pure ASGI middlewares, outermost first:

* :class:`AccessLogMiddleware` writes one JSON line per request to the ``medcollab.access`` logger
  with the method, the *route template* (``/fhir/R4/Patient/{id}``, never the raw path or query,
  which may carry personal data), the status and the duration. No headers, bodies or client
  addresses are logged.
* :class:`SecurityHeadersMiddleware` sets HSTS, a strict Content-Security-Policy and the other
  headers in :func:`security_headers` on every response, error responses included, and removes any
  ``Server`` header.
* :class:`BodyLimitMiddleware` refuses a body larger than ``Settings.max_body_bytes`` with a JSON
  413, by its declared ``Content-Length`` before reading it and by counting a streamed or chunked
  body; the application only runs once the whole body has arrived within the limit, so it never
  sees a partial body.

:func:`install` wraps them *around* the application's whole middleware stack, outside Starlette's
``ServerErrorMiddleware``. Middleware added with ``app.add_middleware`` runs inside that one, whose
500 responses would then leave without the security headers and unseen by the access log.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from typing import Any, Final

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medcollab.config import Settings

access_log = logging.getLogger("medcollab.access")

#: The policy for API responses: a JSON API loads nothing, may not be framed and has no forms to
#: send anywhere but itself.
API_CSP: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"

_SAFE_SEGMENT: Final = re.compile(r"[A-Za-z0-9._~-]{1,40}")
_UNMATCHED: Final = "/<unmatched>"


def content_security_policy(path: str) -> str:
    """The Content-Security-Policy for a response to ``path``.

    The server-rendered web pages (``medcollab.web``) get a policy that allows their own scripts,
    styles and images only, never inline script or style (``'unsafe-inline'`` would let injected
    markup run), ``data:`` images for the enrolment QR code, no framing, no ``<base>`` and forms
    to this origin only. Everything else, the APIs and unknown paths, gets :data:`API_CSP`.

    The web prefixes are an allow-list rather than a list of API prefixes, matched by whole path
    segments: a router added later (an API by default) keeps the strict policy until someone
    decides otherwise. ``/`` itself only redirects, so it keeps the API policy too.
    """
    web_prefixes = (
        "/login",
        "/logout",
        "/lang",
        "/session",
        "/account",
        "/my",
        "/clinic",
        "/org",
        "/static",
    )
    if any(path == prefix or path.startswith(prefix + "/") for prefix in web_prefixes):
        return (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        )
    return API_CSP


def security_headers(path: str, *, hsts_max_age: int) -> list[tuple[bytes, bytes]]:
    """The headers every response to ``path`` carries, as ASGI ``(name, value)`` byte pairs."""
    headers = {
        # Browsers ignore HSTS received over plain HTTP, so sending it in a dev deployment without
        # TLS does no harm, and a TLS deployment never forgets it.
        "strict-transport-security": f"max-age={hsts_max_age}; includeSubDomains",
        "content-security-policy": content_security_policy(path),
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        # The CSP's frame-ancestors supersedes this in current browsers; older ones only know it.
        "x-frame-options": "DENY",
        # Responses carry PHI, which no browser or intermediary cache may keep.
        "cache-control": "no-store",
        "cross-origin-opener-policy": "same-origin",
        "cross-origin-resource-policy": "same-origin",
        "permissions-policy": "camera=(), microphone=(), geolocation=()",
    }
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


def route_template(scope: Scope) -> str:
    """The template of the route that served ``scope`` (``/fhir/R4/Patient/{id}``).

    Read after the application ran, when routing has recorded its choice in the scope. Without a
    matching route it is the first path segment, if that looks like a plain name, else a
    placeholder: the rest of an unmatched path may be anything a client typed, personal data
    included.
    """
    # FastAPI 0.165 includes routers lazily: scope["route"] is then the route as declared in its
    # own router (without the include prefixes), and the full template lives in the effective route
    # context. The unit tests pin this down so a FastAPI upgrade that moves it fails loudly.
    fastapi_scope = scope.get("fastapi")
    context = (
        fastapi_scope.get("effective_route_context") if isinstance(fastapi_scope, dict) else None
    )
    template = getattr(context, "path_format", None)
    if not isinstance(template, str):
        template = getattr(scope.get("route"), "path_format", None)
    if isinstance(template, str):
        return str(scope.get("root_path", "")).rstrip("/") + template
    segments = [segment for segment in str(scope.get("path", "")).split("/") if segment]
    if not segments:
        return "/"
    return f"/{segments[0]}" if _SAFE_SEGMENT.fullmatch(segments[0]) else _UNMATCHED


async def send_json(
    send: Send,
    status: int,
    body: dict[str, Any],
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete JSON response through the raw ASGI ``send``."""
    payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode("latin-1")),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class AccessLogMiddleware:
    """One structured log line per HTTP request, with nothing personal in it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception:
            # The server answers 500 for an exception that escaped before any response.
            status = status or 500
            raise
        finally:
            level = logging.WARNING if status is not None and status >= 500 else logging.INFO
            # Only the method, route template, status and duration: no path, query, headers,
            # body or client address, any of which may identify a patient or hold a credential.
            # A status of None means the client left before any response was sent.
            access_log.log(
                level,
                "request",
                extra={
                    "method": str(scope.get("method", "")),
                    "route": route_template(scope),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )


class SecurityHeadersMiddleware:
    """Sets the headers of :func:`security_headers` on every HTTP response and drops ``Server``."""

    def __init__(self, app: ASGIApp, *, hsts_max_age: int) -> None:
        self.app = app
        self.hsts_max_age = hsts_max_age

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = security_headers(str(scope.get("path", "/")), hsts_max_age=self.hsts_max_age)
        replaced = {name for name, _ in added} | {b"server", b"x-powered-by"}
        response_started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                # Ours replace the application's own values for these names: the policy is set
                # here, in one place, not route by route.
                kept = [
                    (name, value)
                    for name, value in message.get("headers", ())
                    if name.lower() not in replaced
                ]
                message = {**message, "headers": kept + added}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Starlette's ServerErrorMiddleware answers 500 for an escaped exception; it only gets
            # here without a response when its own error handler failed. The client still gets a
            # JSON 500 with the security headers rather than the server's bare one.
            if not response_started:
                await send_json(
                    send_with_headers,
                    500,
                    {"error": "internal_error", "message": "internal error"},
                )
            raise


class BodyLimitMiddleware:
    """Refuses bodies over ``max_body_bytes`` with 413; buffers the body before the app runs.

    Buffering (up to the limit, one mebibyte by default) is what guarantees that the application
    never acts on part of a body that later turns out too large. Routes that must accept large
    uploads (consultation attachments, DICOM imaging) get ``upload_max_body_bytes`` instead.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        fhir_max_body_bytes: int = 0,
        upload_max_body_bytes: int = 0,
    ) -> None:
        self.app = app
        self.default_max_body_bytes = max_body_bytes
        self.upload_max_body_bytes = max(upload_max_body_bytes, max_body_bytes)
        # FHIR Bundles (a Synthea patient is about a mebibyte) get their own, larger limit.
        self.fhir_max_body_bytes = max(fhir_max_body_bytes, max_body_bytes)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        fhir = path == "/fhir/R4" or path.startswith("/fhir/R4/")
        upload = (
            (path.startswith(("/collab/", "/clinic/consultations/")) and "/attachments" in path)
            or path.startswith("/imaging/studies")
            # The chart's DICOM upload form (web.imaging).
            or (path.startswith("/clinic/patients/") and path.endswith("/imaging"))
        )
        limit = (
            self.fhir_max_body_bytes
            if fhir
            else self.upload_max_body_bytes
            if upload
            else self.default_max_body_bytes
        )
        # A browser's form post to a web page gets a page, not JSON, when refused.
        page = path.startswith(_PAGE_PREFIXES) and b"text/html" in _header(scope, b"accept")
        # Per request, without mutating shared state: the limit travels in a local copy.
        await _Limited(self.app, limit, fhir, page)(scope, receive, send)


#: Paths of the web pages (``medcollab.web``), whose refusals a browser shows to a person.
_PAGE_PREFIXES: Final = ("/clinic/", "/my/", "/org/", "/account", "/login", "/logout", "/lang")


def _header(scope: Scope, name: bytes) -> bytes:
    return b",".join(value for key, value in scope.get("headers", ()) if key.lower() == name)


class _Limited(BodyLimitMiddleware):
    def __init__(self, app: ASGIApp, limit: int, fhir: bool, page: bool = False) -> None:
        self.app = app
        self.max_body_bytes = limit
        self.fhir = fhir
        self.page = page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            declared = _declared_length(scope)
        except ValueError:
            await send_json(
                send,
                400,
                {"error": "invalid_request", "message": "the Content-Length header is invalid"},
                [(b"connection", b"close")],
            )
            return
        if declared is not None and declared > self.max_body_bytes:
            # Refused before a byte of the body is read, so the cost of an oversized upload is
            # only what the client sends before it sees this answer.
            await self._too_large(send)
            return

        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # The client left before its body was complete; nobody waits for an answer.
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            # After the body, the application may wait for the client's disconnect.
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        if getattr(self, "page", False):
            await _send_too_large_page(send, self.max_body_bytes)
            return
        message = f"request body exceeds {self.max_body_bytes} bytes"
        body: dict[str, object] = {"error": "payload_too_large", "message": message}
        if getattr(self, "fhir", False):
            body = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "too-costly", "diagnostics": message}],
            }
        await send_json(
            send,
            413,
            body,
            # The rest of the body is never read, so the connection cannot carry another request.
            [(b"connection", b"close")],
        )


async def _send_too_large_page(send: Send, limit: int) -> None:
    """A plain page in both languages: this layer runs before sessions and translations."""
    megabytes = max(1, limit // (1024 * 1024))
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>Upload too large</title></head><body><main>"
        "<h1>The upload is too large</h1>"
        f"<p>Nothing was stored. The limit is {megabytes} MB per upload; go back and "
        "send less, or split it into several uploads.</p>"
        '<p lang="zh-CN">上传内容过大，未保存任何内容。每次上传上限为 '
        f"{megabytes} MB，请返回后减少或分批上传。</p>"
        "</main></body></html>"
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(page)).encode("latin-1")),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": page, "more_body": False})


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or ``None``; ``ValueError`` if malformed or ambiguous."""
    values = {
        value.strip()
        for name, value in scope.get("headers", ())
        if name.lower() == b"content-length"
    }
    if not values:
        return None
    if len(values) > 1 or not all(value.isdigit() for value in values):
        raise ValueError("malformed Content-Length")
    return int(values.pop())


def secure_transport(app: ASGIApp, settings: Settings) -> ASGIApp:
    """``app`` wrapped in the access log, the security headers and the body limit."""
    return AccessLogMiddleware(
        SecurityHeadersMiddleware(
            BodyLimitMiddleware(
                app,
                max_body_bytes=settings.max_body_bytes,
                fhir_max_body_bytes=settings.fhir_max_bundle_bytes,
                upload_max_body_bytes=settings.max_upload_bytes,
            ),
            hsts_max_age=settings.hsts_max_age,
        )
    )


def install(app: FastAPI, settings: Settings) -> None:
    """Add security headers, the request body limit and the access log to ``app``.

    They wrap the middleware stack that the application builds on its first request (see the module
    docstring for why outside it), so middleware added after this call is still covered.
    """
    if app.middleware_stack is not None:
        raise RuntimeError("install() must run before the application handles its first request")
    if getattr(app.state, "transport_security_installed", False):
        raise RuntimeError("transport security is already installed on this application")
    app.state.transport_security_installed = True
    build_stack = app.build_middleware_stack

    def build_secured_stack() -> ASGIApp:
        return secure_transport(build_stack(), settings)

    # Starlette builds the stack through this method and has no hook outside ServerErrorMiddleware;
    # replacing it on this one instance is the narrowest way to get there.
    app.build_middleware_stack = build_secured_stack  # type: ignore[method-assign]
