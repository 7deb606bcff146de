"""A small world for the web pages: two hospitals, clinicians, a patient with a record.

The pages are added to the application under test with ``medcollab.web.install``; users sign in
through the pages' own forms, so the cookies and CSRF tokens are the ones a browser would hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from medcollab.app import create_app
from medcollab.crypto.passwords import Argon2Parameters, PasswordHasher
from medcollab.kernel.clock import FrozenClock
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime
from medcollab.web import install
from tests.support.factories import (
    Account,
    fhir_headers,
    link,
    make_org,
    make_user,
    observation,
    patient_resource,
    sign_in,
)

PATIENT_PASSWORD = "a long patient pass phrase"
_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]*)"')


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match is not None, "the page has no CSRF meta tag"
    return match.group(1)


def new_client(runtime: Runtime) -> TestClient:
    app = create_app(runtime)
    install(app)
    return TestClient(app, base_url="https://testserver", raise_server_exceptions=False)


def web_sign_in(client: TestClient, account: Account, clock: FrozenClock) -> str:
    """Sign in through the pages; returns the session's CSRF token."""
    form = client.get("/login")
    assert form.status_code == 200, form.text
    response = client.post(
        "/login",
        data={
            "username": account.username,
            "password": account.password,
            "csrf_token": csrf_of(form.text),
        },
    )
    if response.status_code == 200 and 'name="mfa_token"' in response.text:
        token = re.search(r'name="mfa_token" value="([^"]+)"', response.text)
        assert token is not None
        clock.advance(timedelta(seconds=30))
        response = client.post(
            "/login/mfa",
            data={
                "mfa_token": token.group(1),
                "code": account.code(clock),
                "csrf_token": csrf_of(form.text),
            },
        )
    assert response.status_code in (200, 303), response.text
    if response.status_code == 303:
        response = client.get(response.headers["location"])
    assert response.status_code == 200, response.text
    return csrf_of(response.text)


@dataclass
class WebWorld:
    runtime: Runtime
    clock: FrozenClock
    api: TestClient
    doctor: Account
    doctor_token: str
    outsider: Account
    patient_id: str
    patient: Account

    def browser(self) -> TestClient:
        """A fresh client with its own cookie jar, like a second browser."""
        return new_client(self.runtime)


@pytest.fixture(scope="session")
def hasher() -> PasswordHasher:
    """The cheapest valid Argon2id: these tests are about pages, not hashing, and sign in often.

    The production parameters are exercised by tests/unit/crypto and every other suite.
    """
    return PasswordHasher(Argon2Parameters(time_cost=1, memory_cost_kib=1024, parallelism=1))


@pytest.fixture
def web_client(runtime: Runtime) -> Iterator[TestClient]:
    with new_client(runtime) as client:
        yield client


@pytest.fixture
def web_world(runtime: Runtime, clock: FrozenClock) -> Iterator[WebWorld]:
    make_org(runtime, "H1")
    make_org(runtime, "H2", region="HK")
    doctor = make_user(runtime, "dr.one", [("H1", Role.PHYSICIAN)])
    outsider = make_user(runtime, "dr.two", [("H2", Role.PHYSICIAN)])
    with new_client(runtime) as api:
        doctor_token = sign_in(api, doctor, clock)
        created = api.post(
            "/fhir/R4/Patient", json=patient_resource(), headers=fhir_headers(doctor_token)
        )
        assert created.status_code == 201, created.text
        patient_id = created.json()["id"]
        for days, value in ((3, 70.0), (2, 82.0), (1, 76.0)):
            body = observation(patient_id, value=value)
            body["effectiveDateTime"] = (clock.now() - timedelta(days=days)).isoformat()
            made = api.post("/fhir/R4/Observation", json=body, headers=fhir_headers(doctor_token))
            assert made.status_code == 201, made.text
        patient = make_user(runtime, "pat.one", [("H1", Role.PATIENT)], password=PATIENT_PASSWORD)
        link(runtime, patient.user_id, "patient", patient_id)
        yield WebWorld(runtime, clock, api, doctor, doctor_token, outsider, patient_id, patient)
