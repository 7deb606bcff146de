"""Factories for identity objects, going through the real services (hashing, sealing, audit)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pyotp
from fastapi.testclient import TestClient

from medcollab.identity.models import Organization, OrgKind
from medcollab.identity.services import NewUser, UserService, operator_agent
from medcollab.kernel.clock import FrozenClock
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime

STRONG_PASSWORD = "violet tractor sings at dawn"


@dataclass
class Account:
    username: str
    password: str
    user_id: str
    otpauth_uri: str | None

    def totp(self) -> pyotp.TOTP:
        assert self.otpauth_uri is not None
        return pyotp.parse_uri(self.otpauth_uri)  # type: ignore[return-value]

    def code(self, clock: FrozenClock, offset_steps: int = 0) -> str:
        moment = clock.now().timestamp() + 30 * offset_steps
        return self.totp().at(moment)


def make_org(
    runtime: Runtime, code: str = "H1", kind: OrgKind = OrgKind.HOSPITAL, region: str = "CN"
) -> Organization:
    with runtime.database.unit_of_work() as session:
        return UserService(session=session, runtime=runtime).create_org(
            code=code,
            name=f"Organisation {code}",
            kind=kind,
            region=region,
            agent=operator_agent("test"),
        )


def make_user(
    runtime: Runtime,
    username: str,
    roles: list[tuple[str, Role]],
    password: str = STRONG_PASSWORD,
    *,
    provision_mfa: bool = True,
) -> Account:
    with runtime.database.unit_of_work() as session:
        created: NewUser = UserService(session=session, runtime=runtime).create_user(
            username=username,
            display_name=f"Test {username}",
            password=password,
            grants=roles,
            agent=operator_agent("test"),
            provision_mfa=provision_mfa,
        )
        return Account(username, password, str(created.user.id), created.otpauth_uri)


def secret_of(uri: str) -> bytes:
    secret = pyotp.parse_uri(uri).secret
    return base64.b32decode(secret + "=" * (-len(secret) % 8))


def sign_in(client: TestClient, account: Account, clock: FrozenClock) -> str:
    """Full login (password, then TOTP if the account has one); returns the bearer token."""
    response = client.post(
        "/auth/login", json={"username": account.username, "password": account.password}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    if body.get("mfa_required"):
        clock.advance(__import__("datetime").timedelta(seconds=30))
        response = client.post(
            "/auth/mfa", json={"mfa_token": body["mfa_token"], "code": account.code(clock)}
        )
        assert response.status_code == 200, response.text
        body = response.json()
    token: str = body["access_token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def fhir_headers(
    token: str, purpose: str | None = None, reason: str | None = None, org: str | None = None
) -> dict[str, str]:
    headers = {**bearer(token), "Content-Type": "application/fhir+json"}
    if purpose:
        headers["X-Purpose-Of-Use"] = purpose
    if reason:
        headers["X-Break-Glass-Reason"] = reason
    if org:
        headers["X-Organization"] = org
    return headers


def link(runtime: Runtime, user_id: str, kind: str, resource_id: str) -> None:
    """Link an account to a FHIR Patient/Practitioner through the real service."""
    import uuid  # noqa: PLC0415

    from medcollab.identity.models import FhirLinkKind  # noqa: PLC0415

    with runtime.database.unit_of_work() as session:
        UserService(session=session, runtime=runtime).link(
            uuid.UUID(user_id), FhirLinkKind(kind), resource_id, agent=operator_agent("test")
        )


def patient_resource(
    family: str = "Zhang",
    given: str = "Wei",
    phone: str = "+86 138 0013 8000",
    identifier: str = "110101199003074514",
) -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.156.10011.1.1", "value": identifier}],
        "name": [{"family": family, "given": [given]}],
        "telecom": [{"system": "phone", "value": phone}],
        "gender": "male",
        "birthDate": "1990-03-07",
        "address": [{"text": "上海市浦东新区世纪大道100号", "city": "上海"}],
    }


def observation(
    patient_id: str, value: float = 72.0, code: str = "8867-4", labels: list[str] | None = None
) -> dict[str, object]:
    body: dict[str, object] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2026-01-01T08:00:00Z",
        "valueQuantity": {
            "value": value,
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }
    if labels:
        body["meta"] = {
            "security": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": c}
                for c in labels
            ]
        }
    return body
