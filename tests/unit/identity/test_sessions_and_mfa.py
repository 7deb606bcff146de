"""Sessions, enrolment, recovery codes, cookies with CSRF, and administrator actions."""

from __future__ import annotations

from datetime import timedelta

import pyotp
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from medcollab.api.deps import SESSION_COOKIE
from medcollab.identity.models import AuthSession, RecoveryCode, User
from medcollab.kernel.clock import FrozenClock
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime
from tests.support.factories import STRONG_PASSWORD, bearer, make_org, make_user, sign_in


@pytest.fixture
def org(runtime: Runtime) -> str:
    return make_org(runtime).code


def test_session_tokens_are_stored_only_as_hashes(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    doctor = make_user(runtime, "dr.hash", [(org, Role.PHYSICIAN)])
    token = sign_in(client, doctor, clock)
    assert len(token) >= 43 + 4  # "mcs_" + 256 bits in URL-safe base64.
    with runtime.database.unit_of_work() as session:
        stored = session.scalars(select(AuthSession.token_hash)).all()
    assert stored
    assert token not in stored
    assert all(token.split("_", 1)[1] not in value for value in stored)


def test_absolute_lifetime_ends_an_active_session(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    doctor = make_user(runtime, "dr.busy", [(org, Role.PHYSICIAN)])
    token = sign_in(client, doctor, clock)
    for _ in range(12 * 6 - 1):  # Active every 10 minutes for just under 12 hours.
        clock.advance(timedelta(minutes=10))
        assert client.get("/auth/me", headers=bearer(token)).status_code == 200
    clock.advance(timedelta(minutes=10))
    assert client.get("/auth/me", headers=bearer(token)).status_code == 401


def test_logout_and_revoke_all(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    doctor = make_user(runtime, "dr.out", [(org, Role.PHYSICIAN)])
    first = sign_in(client, doctor, clock)
    second = sign_in(client, doctor, clock)
    assert client.post("/auth/logout", headers=bearer(first)).status_code == 204
    assert client.get("/auth/me", headers=bearer(first)).status_code == 401
    assert client.get("/auth/me", headers=bearer(second)).status_code == 200
    revoked = client.post("/auth/sessions/revoke-all", headers=bearer(second))
    assert revoked.status_code == 200
    assert revoked.json() == {"revoked_sessions": 1}
    assert client.get("/auth/me", headers=bearer(second)).status_code == 401


def test_staff_without_authenticator_gets_enrolment_only_session(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    make_user(runtime, "sec.officer", [(org, Role.SECURITY_OFFICER)], provision_mfa=False)
    login = client.post(
        "/auth/login", json={"username": "sec.officer", "password": STRONG_PASSWORD}
    )
    assert login.status_code == 200
    assert login.json()["mfa_enrollment_required"] is True
    token = login.json()["access_token"]
    # Everything but enrolment is refused until an authenticator is confirmed.
    refused = client.get("/admin/users", headers=bearer(token))
    assert refused.status_code == 403
    assert refused.json()["error"] == "mfa_enrollment_required"

    enroll = client.post("/auth/mfa/enroll", headers=bearer(token))
    assert enroll.status_code == 200
    body = enroll.json()
    assert body["otpauth_uri"].startswith("otpauth://totp/medcollab:sec.officer?secret=")
    assert "<svg" in body["qr_svg"]
    totp = pyotp.TOTP(body["secret"])
    wrong = client.post("/auth/mfa/confirm", json={"code": "000000"}, headers=bearer(token))
    assert wrong.status_code == 401
    confirm = client.post(
        "/auth/mfa/confirm", json={"code": totp.at(clock.now())}, headers=bearer(token)
    )
    assert confirm.status_code == 200
    codes = confirm.json()["recovery_codes"]
    assert len(codes) == 10
    assert len(set(codes)) == 10
    # A new token for the upgraded session; the enrolment-only token is finished.
    new_token = confirm.json()["access_token"]
    assert new_token != token
    assert client.get("/auth/me", headers=bearer(token)).status_code == 401
    assert client.get("/admin/users", headers=bearer(new_token)).status_code == 200
    # Recovery codes are stored only as keyed hashes.
    with runtime.database.unit_of_work() as session:
        hashes = session.scalars(select(RecoveryCode.code_hash)).all()
    assert len(hashes) == 10
    assert not set(codes) & set(hashes)


def test_abandoned_self_enrolment_does_not_lock_the_patient_out(
    client: TestClient, runtime: Runtime, org: str
) -> None:
    patient = make_user(
        runtime, "pat.enrol", [(org, Role.PATIENT)], password="a much longer patient passphrase"
    )
    login = client.post("/auth/login", json={"username": "pat.enrol", "password": patient.password})
    token = login.json()["access_token"]
    assert client.post("/auth/mfa/enroll", headers=bearer(token)).status_code == 200
    # Never confirmed: the next sign-in still needs only the password.
    again = client.post("/auth/login", json={"username": "pat.enrol", "password": patient.password})
    assert again.status_code == 200
    assert "access_token" in again.json()


def test_recovery_code_works_once(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    doctor = make_user(runtime, "dr.lost", [(org, Role.PHYSICIAN)])
    login = client.post("/auth/login", json={"username": "dr.lost", "password": doctor.password})
    first = client.post(
        "/auth/mfa", json={"mfa_token": login.json()["mfa_token"], "code": doctor.code(clock)}
    )
    code = first.json()["recovery_codes"][0]

    def use(recovery: str) -> int:
        login = client.post(
            "/auth/login", json={"username": "dr.lost", "password": doctor.password}
        )
        return client.post(
            "/auth/mfa", json={"mfa_token": login.json()["mfa_token"], "code": recovery}
        ).status_code

    assert use(code.upper().replace("-", " ")) == 200  # Typed loosely, still accepted.
    assert use(code) == 401  # Spent.


def test_mfa_token_is_single_use_and_expires(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    doctor = make_user(runtime, "dr.once", [(org, Role.PHYSICIAN)])
    login = client.post("/auth/login", json={"username": "dr.once", "password": doctor.password})
    token = login.json()["mfa_token"]
    assert (
        client.post("/auth/mfa", json={"mfa_token": token, "code": doctor.code(clock)}).status_code
        == 200
    )
    clock.advance(timedelta(seconds=30))
    again = client.post("/auth/mfa", json={"mfa_token": token, "code": doctor.code(clock)})
    assert again.status_code == 401
    late = client.post("/auth/login", json={"username": "dr.once", "password": doctor.password})
    clock.advance(timedelta(minutes=6))
    expired = client.post(
        "/auth/mfa", json={"mfa_token": late.json()["mfa_token"], "code": doctor.code(clock)}
    )
    assert expired.status_code == 401


def test_web_session_uses_secure_cookie_and_csrf(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    doctor = make_user(runtime, "dr.web", [(org, Role.PHYSICIAN)])
    login = client.post(
        "/auth/login", json={"username": "dr.web", "password": doctor.password, "cookie": True}
    )
    response = client.post(
        "/auth/mfa", json={"mfa_token": login.json()["mfa_token"], "code": doctor.code(clock)}
    )
    assert response.status_code == 200
    assert "access_token" not in response.json()
    csrf = response.json()["csrf_token"]
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert attribute.lower() in cookie.lower()
    assert client.get("/auth/me").status_code == 200  # Safe method: the cookie suffices.
    assert client.post("/auth/logout").status_code == 403  # Unsafe without CSRF token.
    assert client.post("/auth/logout", headers={"X-CSRF-Token": "mcx_forged"}).status_code == 403
    assert client.post("/auth/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert client.get("/auth/me").status_code == 401


def test_org_admin_manages_only_their_organisation(
    client: TestClient, runtime: Runtime, clock: FrozenClock
) -> None:
    make_org(runtime, "H1")
    make_org(runtime, "H2")
    admin = make_user(runtime, "admin.h1", [("H1", Role.ORG_ADMIN)])
    local = make_user(runtime, "nurse.h1", [("H1", Role.NURSE)])
    foreign = make_user(runtime, "nurse.h2", [("H2", Role.NURSE)])
    token = sign_in(client, admin, clock)

    listed = client.get("/admin/users", headers=bearer(token)).json()
    assert {u["username"] for u in listed} == {"admin.h1", "nurse.h1"}
    for action in ("disable", "reset-mfa", "revoke-sessions"):
        response = client.post(f"/admin/users/{foreign.user_id}/{action}", headers=bearer(token))
        assert response.status_code == 404, action  # Another tenant's user does not exist here.
    created = client.post(
        "/admin/users",
        headers=bearer(token),
        json={
            "username": "x.h2",
            "display_name": "X",
            "password": STRONG_PASSWORD,
            "memberships": [{"org": "H2", "role": "nurse"}],
        },
    )
    assert created.status_code == 404
    disabled = client.post(f"/admin/users/{local.user_id}/disable", headers=bearer(token))
    assert disabled.status_code == 200
    assert disabled.json()["disabled"] is True
    assert client.get("/admin/orgs", headers=bearer(token)).status_code == 403


def test_disabled_user_cannot_sign_in_and_loses_sessions(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    admin = make_user(runtime, "root.admin", [(org, Role.PLATFORM_ADMIN)])
    patient = make_user(
        runtime, "pat.gone", [(org, Role.PATIENT)], password="another long patient passphrase"
    )
    patient_token = sign_in(client, patient, clock)
    admin_token = sign_in(client, admin, clock)
    assert (
        client.post(
            f"/admin/users/{patient.user_id}/disable", headers=bearer(admin_token)
        ).status_code
        == 200
    )
    assert client.get("/auth/me", headers=bearer(patient_token)).status_code == 401
    login = client.post("/auth/login", json={"username": "pat.gone", "password": patient.password})
    assert login.status_code == 401
    assert login.json()["message"] == "invalid username or password"


def test_admin_reset_mfa_provisions_new_authenticator(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    admin = make_user(runtime, "root.admin", [(org, Role.PLATFORM_ADMIN)])
    nurse = make_user(runtime, "nurse.phone", [(org, Role.NURSE)])
    nurse_token = sign_in(client, nurse, clock)
    token = sign_in(client, admin, clock)
    reset = client.post(f"/admin/users/{nurse.user_id}/reset-mfa", headers=bearer(token))
    assert reset.status_code == 200
    assert reset.json()["otpauth_uri"] != nurse.otpauth_uri
    assert client.get("/auth/me", headers=bearer(nurse_token)).status_code == 401
    with runtime.database.unit_of_work() as session:
        user = session.scalars(select(User).where(User.username == "nurse.phone")).one()
        assert user.mfa_confirmed_at is None
