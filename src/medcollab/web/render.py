"""Rendering pages: one Jinja2 environment with autoescaping, translated per request.

Autoescaping is on for every template, so anything that came from a person or a record (a name, a
condition, a break-glass reason) is shown as text, never as markup. Nothing is marked safe except
the QR code's data URI, which the server generates itself.

The translation functions are passed with each render rather than installed in the environment,
which is shared by every request and thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from babel.dates import format_date, format_datetime
from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, pass_context
from jinja2.runtime import Context

from medcollab.api.deps import SESSION_COOKIE
from medcollab.identity.services import IssuedSession
from medcollab.kernel.context import Actor
from medcollab.kernel.permissions import CLINICAL_ROLES, Permission, Role
from medcollab.web import i18n
from medcollab.web.deps import CSRF_COOKIE, CSRF_FIELD, PRE_SESSION_COOKIE, Viewer
from medcollab.web.i18n import N_
from medcollab.web.paths import is_web_path

TEMPLATE_DIR: Final = Path(__file__).parent / "templates"

_env = Environment(
    loader=FileSystemLoader(TEMPLATE_DIR),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


@pass_context
def _when(context: Context, moment: datetime | None, style: str = "medium") -> str:
    """A UTC time in the page's language (app.js rewrites it in the reader's time zone)."""
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    locale = i18n.babel_locale(context["lang"])
    return format_datetime(moment, style, tzinfo=UTC, locale=locale) + " UTC"


@pass_context
def _day(context: Context, moment: datetime | None) -> str:
    if moment is None:
        return ""
    return format_date(moment, "medium", locale=i18n.babel_locale(context["lang"]))


def _iso(moment: datetime | None) -> str:
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


_env.filters["when"] = _when
_env.filters["iso"] = _iso
_env.filters["day"] = _day


# Navigation --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NavItem:
    href: str
    label: str


def navigation(actor: Actor) -> list[tuple[str, list[NavItem]]]:
    """The sections of the menu this actor may use, each with its links (labels untranslated)."""
    sections: list[tuple[str, list[NavItem]]] = []
    if actor.has(Permission.OWN_RECORD_READ):
        sections.append(
            (
                N_("My health"),
                [
                    NavItem("/my/record", N_("My record")),
                    NavItem("/my/access", N_("Who accessed my record")),
                    NavItem("/my/consents", N_("Sharing and consents")),
                    NavItem("/my/notifications", N_("Notifications")),
                    NavItem("/my/referrals", N_("Referrals")),
                    NavItem("/my/consultations", N_("Consultations")),
                    NavItem("/my/appointments", N_("Appointments")),
                ],
            )
        )
    if actor.roles & CLINICAL_ROLES:
        sections.append(
            (
                N_("Clinic"),
                [
                    NavItem("/clinic/patients", N_("My patients")),
                    NavItem("/clinic/referrals", N_("Referrals")),
                    NavItem("/clinic/consultations", N_("Consultations")),
                    NavItem("/clinic/appointments", N_("Appointments")),
                ],
            )
        )
    oversight: list[NavItem] = []
    if actor.has(Permission.ORG_USER_READ):
        oversight.append(NavItem("/org/users", N_("Users and MFA")))
    if actor.has(Permission.AUDIT_LOG_READ):
        oversight.append(NavItem("/org/audit", N_("Audit search")))
        oversight.append(NavItem("/org/audit/status", N_("Audit status")))
    if actor.has(Permission.PRIVACY_BREAKGLASS_REVIEW):
        oversight.append(NavItem("/org/reviews", N_("Break-glass reviews")))
    if oversight:
        sections.append((N_("Organisation"), oversight))
    return sections


#: Each role's home page, first match wins (a clinician who is also an officer starts in the clinic).
HOMES: Final = (
    (frozenset({Role.PATIENT, Role.GUARDIAN}), "/my/record"),
    (CLINICAL_ROLES, "/clinic/patients"),
    (frozenset({Role.PRIVACY_OFFICER}), "/org/reviews"),
    (frozenset({Role.SECURITY_OFFICER, Role.AUDITOR}), "/org/audit/status"),
    (frozenset({Role.ORG_ADMIN, Role.PLATFORM_ADMIN}), "/org/users"),
)


def home_for(actor: Actor) -> str:
    """The page a user lands on after signing in: one home per role."""
    if actor.enrollment_only:
        return "/account/enrol"
    return next((home for roles, home in HOMES if actor.roles & roles), "/account")


# Responses ---------------------------------------------------------------------------------------


def _base_context(request: Request, lang: str) -> dict[str, Any]:
    catalog = i18n.translations(lang)
    return {
        "_": catalog.gettext,
        "gettext": catalog.gettext,
        "ngettext": catalog.ngettext,
        "lang": lang,
        "languages": i18n.LANGUAGE_NAMES,
        "path": request.url.path,
        "csrf_field": CSRF_FIELD,
        "viewer": None,
        "nav": [],
        "unread": 0,
        # Optional values every template may test, so StrictUndefined still catches typos.
        "error": None,
        "notice": None,
        "standalone": False,
    }


def page(
    request: Request,
    template: str,
    view: Viewer,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    csrf_token: str | None = None,
    **values: Any,
) -> HTMLResponse:
    """A signed-in page. ``csrf_token`` overrides the cookie's (right after a new session)."""
    context = _base_context(request, view.language)
    context.update(
        viewer=view,
        csrf_token=csrf_token or view.csrf_token,
        idle_seconds=view.idle_seconds,
        nav=[] if view.actor.enrollment_only else navigation(view.actor),
    )
    context.update(values)
    html = _env.get_template(template).render(context)
    return HTMLResponse(html, status_code=status, headers=headers)


def anonymous_page(
    request: Request,
    template: str,
    lang: str,
    *,
    pre_token: str | None,
    csrf_token: str | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **values: Any,
) -> HTMLResponse:
    """A page shown without a signed-in layout; ``pre_token`` is the pre-session CSRF token for
    its forms (also set as the cookie it is checked against), ``csrf_token`` a session's."""
    context = _base_context(request, lang)
    context.update(csrf_token=csrf_token or pre_token or "", idle_seconds=0)
    context.update(values)
    html = _env.get_template(template).render(context)
    response = HTMLResponse(html, status_code=status, headers=headers)
    if pre_token:
        response.set_cookie(
            PRE_SESSION_COOKIE,
            pre_token,
            max_age=3600,
            path="/",
            secure=True,
            httponly=True,
            samesite="strict",
        )
    return response


def redirect(location: str, request: Request | None = None) -> Response:
    """303 to ``location``; an HTMX request is told to navigate there instead."""
    if request is not None and request.headers.get("hx-request") == "true":
        return Response(status_code=204, headers={"HX-Redirect": location})
    return RedirectResponse(location, status_code=303)


def set_session_cookies(response: Response, issued: IssuedSession) -> None:
    """The session cookie (as the API's cookie sign-in sets it) and its CSRF token's cookie."""
    for name, value in ((SESSION_COOKIE, issued.access_token), (CSRF_COOKIE, issued.csrf_token)):
        response.set_cookie(
            name,
            value or "",
            # The browser keeps the cookies for the absolute lifetime; the server enforces the
            # idle timeout.
            max_age=issued.max_age,
            path="/",
            secure=True,
            httponly=True,
            samesite="strict",
        )
    response.delete_cookie(PRE_SESSION_COOKIE, path="/", secure=True, httponly=True)


def clear_session_cookies(response: Response) -> None:
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        response.delete_cookie(name, path="/", secure=True, httponly=True, samesite="strict")


def safe_next(target: str | None, fallback: str) -> str:
    """A post-sign-in destination, only if it is a page of this site (no open redirect)."""
    if not target:
        return fallback
    acceptable = (
        target.startswith("/")
        and not target.startswith("//")
        and not any(ch in target for ch in "\r\n\\")
        and len(target) <= 300
        and is_web_path(target.split("?", 1)[0])
    )
    return target if acceptable else fallback
