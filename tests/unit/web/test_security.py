"""The web pages' protections: sessions on every page, CSRF on every form, the page CSP, cookie
attributes, autoescaping of untrusted content, no open redirects, HTML errors."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select

from medcollab.api.middleware import API_CSP, content_security_policy
from medcollab.app import create_app
from medcollab.records.models import FhirResource
from medcollab.runtime import Runtime
from medcollab.web import STATIC_DIR, install
from medcollab.web.collab import router as collab_router
from medcollab.web.imaging import router as imaging_router
from medcollab.web.paths import WEB_PREFIXES, is_web_path
from medcollab.web.render import safe_next
from medcollab.web.routes import router
from tests.support.factories import fhir_headers
from tests.unit.web.conftest import WebWorld, csrf_of, web_sign_in

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _concrete(path: str) -> str:
    """A route template with its parameters filled in."""
    return re.sub(r"\{[^}]+\}", lambda m: str(uuid.uuid4()) if "id" in m.group() else "1", path)


def _page_routes() -> list[tuple[str, str]]:
    routes = []
    for route in (*router.routes, *collab_router.routes, *imaging_router.routes):
        assert isinstance(route, APIRoute)
        for method in sorted(route.methods):
            routes.append((method, route.path))
    return routes


def test_every_page_route_lies_under_the_page_csp() -> None:
    for _method, path in _page_routes():
        if path == "/":
            continue  # Only redirects; keeps the API policy.
        concrete = _concrete(path)
        assert is_web_path(concrete), path
        assert content_security_policy(concrete) == PAGE_CSP, path
    for prefix in WEB_PREFIXES:
        assert content_security_policy(prefix + "/x") == PAGE_CSP
    for api in ("/", "/auth/login", "/fhir/R4/Patient", "/me/access-history", "/audit/checkpoint"):
        assert content_security_policy(api) == API_CSP
    # Whole segments only: an API path that merely starts with the same letters is not a page.
    assert content_security_policy("/myapi") == API_CSP
    assert content_security_policy("/organizations") == API_CSP


def test_pages_carry_the_page_csp_and_apis_keep_theirs(web_client: TestClient) -> None:
    page = web_client.get("/login")
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == PAGE_CSP
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["content-type"].startswith("text/html")
    script = web_client.get("/static/app.js")
    assert script.status_code == 200
    assert script.headers["content-security-policy"] == PAGE_CSP
    api = web_client.get("/auth/me")
    assert api.headers["content-security-policy"] == API_CSP
    # No inline script or style anywhere in the page: everything comes from /static.
    assert "<script>" not in page.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text)
    assert " style=" not in page.text
    assert "<style" not in page.text


@pytest.mark.parametrize("method_path", _page_routes(), ids=lambda mp: f"{mp[0]} {mp[1]}")
def test_every_page_needs_a_session(web_client: TestClient, method_path: tuple[str, str]) -> None:
    method, path = method_path
    if path in ("/", "/login") or path.startswith(("/login/", "/lang")):
        return  # The sign-in forms and the language switch work before a session exists.
    response = web_client.request(method, _concrete(path), follow_redirects=False)
    if method == "GET":
        assert response.status_code == 303, response.text
        assert response.headers["location"].startswith("/login")
    else:
        # Unsafe requests are refused before anything else: no session, no token.
        assert response.status_code in (303, 403), response.text
        if response.status_code == 303:
            assert response.headers["location"].startswith("/login")


def test_sign_in_sets_strict_cookies(web_world: WebWorld) -> None:
    client = web_world.browser()
    web_sign_in(client, web_world.patient, web_world.clock)
    session = [c for c in client.cookies.jar if c.name == "__Host-medcollab_session"]
    csrf = [c for c in client.cookies.jar if c.name == "__Host-medcollab_csrf"]
    assert session
    assert csrf
    for cookie in (*session, *csrf):
        assert cookie.secure
        assert cookie.path == "/"
        assert cookie.has_nonstandard_attr("HttpOnly")
        assert cookie.get_nonstandard_attr("SameSite") in ("strict", "Strict")
        assert not cookie.domain_specified


def test_a_post_without_a_csrf_token_is_refused(web_world: WebWorld) -> None:
    client = web_world.browser()
    token = web_sign_in(client, web_world.patient, web_world.clock)
    form = {"org": "", "category": "PSY", "share": "no", "patient": web_world.patient_id}

    def consents() -> int:
        with web_world.runtime.database.unit_of_work() as session:
            return len(
                session.scalars(
                    select(FhirResource).where(FhirResource.resource_type == "Consent")
                ).all()
            )

    for data, headers in (
        (form, {}),
        ({**form, "csrf_token": "mcx_forged"}, {}),
        (form, {"X-CSRF-Token": "mcx_forged"}),
        # A valid token from another site's page is still refused.
        ({**form, "csrf_token": token}, {"Sec-Fetch-Site": "cross-site"}),
        ({**form, "csrf_token": token}, {"Origin": "https://evil.example"}),
    ):
        refused = client.post("/my/consents", data=data, headers=headers)
        assert refused.status_code == 403, refused.text
        assert "did not come from this site" in refused.text
        assert refused.headers["content-type"].startswith("text/html")
    assert consents() == 0
    logout = client.post("/logout", follow_redirects=False)
    assert logout.status_code == 403
    assert client.get("/my/record").status_code == 200  # The session survived.

    # With the token (hidden field or HTMX header) the same requests work.
    accepted = client.post(
        "/my/consents", data={**form, "csrf_token": token}, follow_redirects=False
    )
    assert accepted.status_code == 303
    assert consents() == 1
    htmx = client.post(
        "/my/consents",
        data={**form, "share": "yes"},
        headers={"X-CSRF-Token": token, "HX-Request": "true"},
        follow_redirects=False,
    )
    assert htmx.status_code == 204
    assert htmx.headers["hx-redirect"] == "/my/consents?patient=" + web_world.patient_id


def test_sign_in_forms_need_the_pre_session_token(web_client: TestClient) -> None:
    refused = web_client.post("/login", data={"username": "x", "password": "y"})
    assert refused.status_code == 403
    page = web_client.get("/login")
    forged = web_client.post(
        "/login", data={"username": "x", "password": "y", "csrf_token": "not-the-cookie"}
    )
    assert forged.status_code == 403
    wrong = web_client.post(
        "/login", data={"username": "x", "password": "y", "csrf_token": csrf_of(page.text)}
    )
    assert wrong.status_code == 401
    assert "The username or password is not correct." in wrong.text
    assert web_client.post("/login/mfa", data={"mfa_token": "x", "code": "1"}).status_code == 403


def test_script_in_content_is_shown_as_text(web_world: WebWorld) -> None:
    hostile = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'
    condition = {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient/{web_world.patient_id}"},
        "code": {"text": hostile},
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
    }
    made = web_world.api.post(
        "/fhir/R4/Condition", json=condition, headers=fhir_headers(web_world.doctor_token)
    )
    assert made.status_code == 201, made.text
    # An emergency reason is content too, shown to the patient and the privacy officer.
    outsider = web_world.browser()
    token = web_sign_in(outsider, web_world.outsider, web_world.clock)
    opened = outsider.post(
        f"/clinic/patients/{web_world.patient_id}/break-glass",
        data={"reason": "Unconscious " + hostile, "csrf_token": token},
    )
    assert opened.status_code == 200, opened.text

    patient = web_world.browser()
    web_sign_in(patient, web_world.patient, web_world.clock)
    for page in (patient.get("/my/record"), patient.get("/my/notifications")):
        assert page.status_code == 200
        assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in page.text
        assert "<script>alert" not in page.text
        assert "<img src=x" not in page.text


def test_no_open_redirect_after_sign_in() -> None:
    assert safe_next("/my/record", "/x") == "/my/record"
    assert safe_next("/clinic/patients/abc?x=1", "/x") == "/clinic/patients/abc?x=1"
    for hostile in (
        "//evil.example",
        "https://evil.example",
        "/\\evil.example",
        "evil",
        "/fhir/R4/Patient",
        "/login\r\nSet-Cookie: x",
    ):
        assert safe_next(hostile, "/x") == "/x", hostile


def test_errors_on_pages_are_pages_and_apis_keep_json(web_world: WebWorld) -> None:
    client = web_world.browser()
    web_sign_in(client, web_world.patient, web_world.clock)
    missing = client.get("/my/nothing-here")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("text/html")
    assert "Not found" in missing.text
    forbidden = client.get("/org/users")
    assert forbidden.status_code == 403
    assert "Your role does not allow this here." in forbidden.text
    api = client.get("/auth/nothing")
    assert api.status_code == 404
    assert api.json()["error"] == "not_found"
    fhir = client.get(f"/fhir/R4/Observation/{uuid.uuid4()}")
    assert fhir.json()["resourceType"] == "OperationOutcome"


def test_an_expired_session_goes_back_to_sign_in(web_world: WebWorld) -> None:
    from datetime import timedelta  # noqa: PLC0415

    client = web_world.browser()
    web_sign_in(client, web_world.patient, web_world.clock)
    web_world.clock.advance(timedelta(hours=2))
    expired = client.get("/my/record", follow_redirects=False)
    assert expired.status_code == 303
    assert expired.headers["location"] == "/login?expired=1"
    page = client.get("/login?expired=1")
    assert "Your session ended. Please sign in again." in page.text
    htmx = client.get("/my/record", headers={"HX-Request": "true"}, follow_redirects=False)
    assert htmx.headers["hx-redirect"].startswith("/login")


def test_vendored_htmx_is_the_pinned_release() -> None:
    digest = hashlib.sha256((STATIC_DIR / "htmx.min.js").read_bytes()).hexdigest()
    note = (STATIC_DIR / "THIRD_PARTY.md").read_text(encoding="utf-8")
    assert digest in note
    assert "htmx.org@2.0.11" in note
    assert "0BSD" in note


def test_templates_never_disable_autoescaping() -> None:
    templates = Path(STATIC_DIR).parent / "templates"
    for template in templates.glob("*.html"):
        text = template.read_text(encoding="utf-8")
        assert "|safe" not in text.replace(" ", ""), template.name
        assert "autoescape false" not in text, template.name
        assert " style=" not in text, template.name
        assert "<script>" not in text, template.name
        # Inline event handlers are inline script, which the CSP would refuse anyway.
        assert not re.search(r"<[^>]*\son[a-z]+\s*=", text), template.name


def test_install_is_idempotent_and_needs_the_api_error_handlers(runtime: Runtime) -> None:
    app = create_app(runtime)
    install(app)
    routes = len(app.routes)
    install(app)
    assert len(app.routes) == routes
    with pytest.raises(RuntimeError, match=r"api\.errors"):
        install(FastAPI())
