"""The HTTP login contract, end to end through the real app and database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from medcollab.audit.models import AuditEventRecord
from medcollab.kernel.clock import FrozenClock
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime
from tests.support.factories import bearer, make_org, make_user, sign_in


@pytest.fixture
def org(runtime: Runtime) -> str:
    return make_org(runtime).code


def test_staff_login_requires_mfa_and_returns_bearer_token(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    doctor = make_user(runtime, "dr.li", [(org, Role.PHYSICIAN)])
    first = client.post("/auth/login", json={"username": "dr.li", "password": doctor.password})
    assert first.status_code == 200
    assert first.json().keys() == {"mfa_required", "mfa_token"}
    assert first.json()["mfa_required"] is True

    second = client.post(
        "/auth/mfa", json={"mfa_token": first.json()["mfa_token"], "code": doctor.code(clock)}
    )
    assert second.status_code == 200, second.text
    body = second.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 15 * 60
    assert len(body["recovery_codes"]) == 10  # First use confirms the provisioned authenticator.

    me = client.get("/auth/me", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json()["user"]["username"] == "dr.li"
    assert me.json()["roles"] == ["physician"]
    assert me.json()["user"]["memberships"][0]["org_code"] == org


def test_patient_without_mfa_gets_token_directly(
    client: TestClient, runtime: Runtime, org: str
) -> None:
    patient = make_user(
        runtime, "wang.fang", [(org, Role.PATIENT)], password="a much longer patient passphrase"
    )
    response = client.post(
        "/auth/login", json={"username": "wang.fang", "password": patient.password}
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "mfa_enrollment_required"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 60 * 60
    assert body["mfa_enrollment_required"] is False


@pytest.mark.parametrize("username", ["dr.li", "nobody.here", "DR.LI "])
def test_wrong_credentials_get_one_generic_401(
    client: TestClient, runtime: Runtime, org: str, username: str
) -> None:
    make_user(runtime, "dr.li", [(org, Role.PHYSICIAN)])
    response = client.post("/auth/login", json={"username": username, "password": "wrong" * 4})
    assert response.status_code == 401
    assert response.json() == {
        "error": "authentication_failed",
        "message": "invalid username or password",
    }


def test_totp_code_is_accepted_once(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    doctor = make_user(runtime, "dr.chen", [(org, Role.PHYSICIAN)])
    code = doctor.code(clock)

    def attempt() -> int:
        login = client.post(
            "/auth/login", json={"username": "dr.chen", "password": doctor.password}
        )
        return client.post(
            "/auth/mfa", json={"mfa_token": login.json()["mfa_token"], "code": code}
        ).status_code

    assert attempt() == 200
    clock.advance(timedelta(seconds=5))
    assert attempt() == 401  # Same code, same time step: a replay.
    with runtime.database.unit_of_work() as session:
        types = list(session.scalars(select(AuditEventRecord.type)))
    assert "auth:mfa:replay" in types


def test_ten_wrong_totp_codes_lock_the_account(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    doctor = make_user(runtime, "dr.zhao", [(org, Role.NURSE)])
    statuses = []
    for _ in range(10):
        login = client.post(
            "/auth/login", json={"username": "dr.zhao", "password": doctor.password}
        )
        if login.status_code == 429:
            # Exponential backoff: wait as told, then try again.
            clock.advance(timedelta(seconds=int(login.headers["Retry-After"])))
            login = client.post(
                "/auth/login", json={"username": "dr.zhao", "password": doctor.password}
            )
        assert login.status_code == 200, login.text
        wrong = client.post(
            "/auth/mfa", json={"mfa_token": login.json()["mfa_token"], "code": "000000"}
        )
        statuses.append(wrong.status_code)
        if wrong.status_code == 401:
            clock.advance(timedelta(minutes=2))
    assert statuses[:9] == [401] * 9
    assert statuses[9] == 429
    # Locked: even the right password and a fresh code are refused, with Retry-After.
    locked = client.post("/auth/login", json={"username": "dr.zhao", "password": doctor.password})
    assert locked.status_code == 429
    assert 0 < int(locked.headers["Retry-After"]) <= 15 * 60
    with runtime.database.unit_of_work() as session:
        locks = session.scalars(
            select(AuditEventRecord).where(AuditEventRecord.type == "auth:account:locked")
        ).all()
        failures = session.scalars(
            select(AuditEventRecord).where(AuditEventRecord.type == "auth:mfa:failure")
        ).all()
    assert len(locks) == 1
    assert str(locks[0].subject_user_id) == doctor.user_id
    assert len(failures) == 10


def test_idle_session_expires(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    doctor = make_user(runtime, "dr.sun", [(org, Role.PHYSICIAN)])
    token = sign_in(client, doctor, clock)
    clock.advance(timedelta(minutes=14, seconds=59))
    assert client.get("/auth/me", headers=bearer(token)).status_code == 200
    clock.advance(timedelta(minutes=15))
    response = client.get("/auth/me", headers=bearer(token))
    assert response.status_code == 401
    assert response.json()["error"] == "session_expired"
