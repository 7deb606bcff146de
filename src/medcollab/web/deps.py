"""Request-scoped collaborators of the web pages: the signed-in viewer, forms, CSRF, language.

The pages use the platform's server-side sessions (``AuthService``), the same cookie as the API's
``"cookie": true`` sign-in, and the same CSRF check: ``AuthService.authenticate`` compares the
token of an unsafe request with the HMAC stored for the session. What the web adds:

* The session's CSRF token is issued once, at sign-in, and the server keeps only its HMAC, so the
  pages could not render it again. It is kept by the browser in a second cookie,
  ``__Host-medcollab_csrf`` (``HttpOnly``, ``Secure``, ``SameSite=Strict``), which only the server
  reads, to put it into a ``<meta>`` tag and the hidden field of every form. A page of another
  site can neither read that cookie nor the page, so it cannot produce the token; a forged form
  post is refused with 403 whatever cookies the browser attaches.
* Forms are sent as ``application/x-www-form-urlencoded`` (file uploads as
  ``multipart/form-data``); the token travels in the hidden field
  ``csrf_token``, or in ``X-CSRF-Token`` when HTMX sends the request (``static/app.js``).
* Before a session exists (the sign-in forms, the language switch), a pre-session token in the
  cookie ``__Host-medcollab_pre`` must match the form's field (double submit), so another site
  cannot sign a victim into the attacker's account.
* Unsafe requests whose ``Origin`` is another origin, or that the browser labels
  ``Sec-Fetch-Site: cross-site``, are refused before any token is looked at.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated, Final
from urllib.parse import parse_qs

from fastapi import Depends, Request

from medcollab.api.deps import CSRF_HEADER, SESSION_COOKIE, Auth, Client, DbSession, Users
from medcollab.api.uploads import form_parts
from medcollab.errors import (
    AuthenticationFailed,
    InvalidInput,
    MfaEnrollmentRequired,
    PermissionDenied,
    UnsupportedMediaType,
)
from medcollab.kernel.context import Actor
from medcollab.kernel.permissions import Permission
from medcollab.web import i18n
from medcollab.web.patients import patients_of, unread_count

CSRF_COOKIE: Final = "__Host-medcollab_csrf"
PRE_SESSION_COOKIE: Final = "__Host-medcollab_pre"
CSRF_FIELD: Final = "csrf_token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_FORM_TYPE: Final = "application/x-www-form-urlencoded"
_MULTIPART_TYPE: Final = "multipart/form-data"
_MAX_FIELDS: Final = 100


class CsrfRefused(PermissionDenied):
    """An unsafe request without a valid CSRF token, or from another origin."""

    code = "csrf_refused"


@dataclass(frozen=True, slots=True)
class FormFile:
    """A file field of a ``multipart/form-data`` form; its declared Content-Type is ignored."""

    filename: str
    content: bytes


def _multipart(request: Request, header: str, body: bytes) -> dict[str, str]:
    """A file-upload form: text fields are returned, file fields kept in
    ``request.state.web_files`` (the last of each name) and ``request.state.web_file_lists``
    (all of them, in order, for ``<input type="file" multiple>``)."""
    fields: dict[str, str] = {}
    files: dict[str, FormFile] = {}
    lists: dict[str, list[FormFile]] = {}
    for part in form_parts(header, body, max_parts=_MAX_FIELDS):
        if part.filename is not None:
            files[part.name] = FormFile(part.filename, part.content)
            lists.setdefault(part.name, []).append(files[part.name])
            continue
        try:
            fields[part.name] = part.content.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("the form could not be read") from None
    request.state.web_files = files
    request.state.web_file_lists = lists
    return fields


async def form_data(request: Request) -> dict[str, str]:
    """The request's form (the last value of each field); ``{}`` for safe methods.

    Parsed here rather than with ``python-multipart``: the pages post URL-encoded forms, and
    ``multipart/form-data`` only to upload a file (:func:`form_files`); the body has already
    passed the transport's size limit.
    """
    if request.method in SAFE_METHODS:
        return {}
    cached: dict[str, str] | None = getattr(request.state, "web_form", None)
    if cached is not None:
        return cached
    body = await request.body()
    header = request.headers.get("content-type", "")
    media_type = header.split(";", 1)[0].strip().lower()
    if body and media_type == _MULTIPART_TYPE:
        request.state.web_form = _multipart(request, header, body)
        return dict(request.state.web_form)
    if body and media_type != _FORM_TYPE:
        raise UnsupportedMediaType("forms must be sent URL-encoded", hint=f"use {_FORM_TYPE}")
    try:
        text = body.decode("utf-8")
        parsed = parse_qs(text, keep_blank_values=True, max_num_fields=_MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("the form could not be read") from None
    fields = {name: values[-1] for name, values in parsed.items()}
    request.state.web_form = fields
    return fields


WebForm = Annotated[dict[str, str], Depends(form_data)]


async def form_files(request: Request, form: WebForm) -> dict[str, FormFile]:
    """The files of a ``multipart/form-data`` form (none for any other form)."""
    del form  # Parsed for its side effect: the files are kept beside the fields.
    files: dict[str, FormFile] = getattr(request.state, "web_files", {})
    return files


WebFiles = Annotated[dict[str, FormFile], Depends(form_files)]


async def form_file_lists(request: Request, form: WebForm) -> dict[str, list[FormFile]]:
    """Every file of a ``multipart/form-data`` form, by field name (none for any other form)."""
    del form  # Parsed for its side effect, as in form_files.
    lists: dict[str, list[FormFile]] = getattr(request.state, "web_file_lists", {})
    return lists


WebFileLists = Annotated[dict[str, list[FormFile]], Depends(form_file_lists)]


def check_same_origin(request: Request) -> None:
    """Refuse an unsafe request that a browser says came from another site."""
    # Fetch metadata is sent by current browsers whatever the referrer policy; "same-site" (a
    # sibling subdomain) is no more trusted than another site.
    if request.headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
        raise CsrfRefused("cross-site request refused")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        # Not sent by every client, and sent as "null" by browsers for form posts under our
        # Referrer-Policy: no-referrer. The CSRF token still has to match.
        return
    expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if not hmac.compare_digest(origin.lower().encode(), expected.lower().encode()):
        raise CsrfRefused("cross-origin request refused")


async def submitted_csrf(request: Request) -> str | None:
    """The CSRF token an unsafe request carries: the HTMX header, else the form field."""
    if request.method in SAFE_METHODS:
        return None
    check_same_origin(request)
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    return (await form_data(request)).get(CSRF_FIELD) or None


SubmittedCsrf = Annotated[str | None, Depends(submitted_csrf)]


def web_actor(request: Request, auth: Auth, client: Client, csrf: SubmittedCsrf) -> Actor:
    """The signed-in actor of a page request; unsafe methods must carry the session's token."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token or not request.cookies.get(CSRF_COOKIE):
        # A session made by the JSON API has no CSRF cookie: the pages could not render a token
        # for it, so it is not a web session. Signing in through the pages makes one.
        raise AuthenticationFailed("authentication required")
    unsafe = request.method not in SAFE_METHODS
    try:
        return auth.authenticate(token, client, csrf_token=csrf, needs_csrf=unsafe)
    except PermissionDenied:
        raise CsrfRefused("missing or invalid CSRF token") from None


WebActor = Annotated[Actor, Depends(web_actor)]


def language(request: Request) -> str:
    return i18n.negotiate(
        request.cookies.get(i18n.LANG_COOKIE), request.headers.get("accept-language")
    )


Language = Annotated[str, Depends(language)]


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking at a page, and what every page needs to render for them."""

    actor: Actor
    display_name: str
    csrf_token: str
    idle_seconds: int
    mfa_enrolled: bool
    language: str
    #: Unread notifications of the patient records this account acts for (patients, guardians).
    unread: int = 0


def viewer(
    *, request: Request, actor: WebActor, auth: Auth, users: Users, db: DbSession, lang: Language
) -> Viewer:
    """The viewer of a page that an enrolment-only session may also see (account, enrolment)."""
    record = auth.session_info(actor)
    user = users.user_by_username(actor.username)
    unread = 0
    if actor.has(Permission.OWN_RECORD_READ) and not actor.enrollment_only:
        unread = unread_count(db, patients_of(users, actor))
    return Viewer(
        actor=actor,
        display_name=users.display_name(user),
        csrf_token=request.cookies.get(CSRF_COOKIE, ""),
        idle_seconds=record.idle_timeout_seconds,
        mfa_enrolled=user.mfa_confirmed_at is not None,
        language=lang,
        unread=unread,
    )


AnyViewer = Annotated[Viewer, Depends(viewer)]


def full_viewer(view: AnyViewer) -> Viewer:
    """The viewer of every other page: an enrolment-only session is sent to enrolment first."""
    if view.actor.enrollment_only:
        raise MfaEnrollmentRequired("multi-factor authentication is required for this account")
    return view


PageViewer = Annotated[Viewer, Depends(full_viewer)]


# Before a session exists ---------------------------------------------------------------------------


def pre_session_token(request: Request) -> str:
    """The pre-session CSRF token of this browser, or a new one (set by the page that renders it)."""
    current = request.cookies.get(PRE_SESSION_COOKIE)
    if current and 20 <= len(current) <= 100 and current.isascii():
        return current
    return secrets.token_urlsafe(32)


def check_pre_session(request: Request, form: dict[str, str]) -> None:
    """Double-submit check for the forms shown before sign-in."""
    check_same_origin(request)
    cookie = request.cookies.get(PRE_SESSION_COOKIE, "")
    field = form.get(CSRF_FIELD, "")
    if not cookie or not field or not hmac.compare_digest(cookie.encode(), field.encode()):
        raise CsrfRefused("missing or invalid CSRF token")
