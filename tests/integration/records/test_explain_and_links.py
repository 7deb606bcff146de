"""Explaining decisions (CLI and admin API) and linking accounts to FHIR resources."""

from __future__ import annotations

from sqlalchemy import select

from medcollab.audit.models import AuditEventRecord
from medcollab.kernel.permissions import Role
from tests.integration.records.conftest import World
from tests.support.factories import STRONG_PASSWORD, bearer, make_user, sign_in


def test_admin_explain_api(world: World) -> None:
    officer = make_user(world.runtime, "priv.h1", [("H1", Role.PRIVACY_OFFICER)])
    token = sign_in(world.client, officer, world.clock)
    params = {
        "user": world.doctor.user_id,
        "patient": world.patient_id,
        "action": "read",
        "type": "Observation",
    }
    response = world.client.get("/admin/access/explain", params=params, headers=bearer(token))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["permitted"] is True
    assert body["reasons"][0].startswith("care-relationship: registration")
    outsider = world.client.get(
        "/admin/access/explain",
        params={**params, "user": world.outsider.user_id},
        headers=bearer(token),
    )
    assert outsider.status_code == 404  # The outsider belongs to another organisation.
    # A clinician cannot ask.
    assert (
        world.client.get(
            "/admin/access/explain", params=params, headers=bearer(world.doctor_token)
        ).status_code
        == 403
    )
    with world.runtime.database.unit_of_work() as session:
        kinds = session.scalars(select(AuditEventRecord.type)).all()
    assert "access:decision:explained" in kinds


def test_admin_creates_linked_accounts(world: World) -> None:
    admin = make_user(world.runtime, "admin.h1", [("H1", Role.ORG_ADMIN)])
    token = sign_in(world.client, admin, world.clock)
    created = world.client.post(
        "/admin/users",
        headers=bearer(token),
        json={
            "username": "pat.linked",
            "display_name": "Linked Patient",
            "password": "another long patient passphrase",
            "memberships": [{"org": "H1", "role": "patient"}],
            "patient": world.patient_id,
        },
    )
    assert created.status_code == 201, created.text
    login = world.client.post(
        "/auth/login",
        json={"username": "pat.linked", "password": "another long patient passphrase"},
    )
    patient_token = login.json()["access_token"]
    response = world.client.get(
        f"/fhir/R4/Patient/{world.patient_id}", headers=bearer(patient_token)
    )
    assert response.status_code == 200
    wrong = world.client.post(
        "/admin/users",
        headers=bearer(token),
        json={
            "username": "nurse.bad",
            "display_name": "N",
            "password": STRONG_PASSWORD,
            "memberships": [{"org": "H1", "role": "nurse"}],
            "patient": world.patient_id,
        },
    )
    assert wrong.status_code == 400  # A nurse account cannot be linked as a patient.
