"""Shared helpers for the collaboration API tests.

``collab_app`` mounts the ``/collab`` router on the real application (until ``create_app`` wires
it); ``build_world`` makes two hospitals with clinicians and a patient registered at the first.
The test modules turn both into fixtures.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from medcollab.app import create_app
from medcollab.audit.models import AuditEventPatient, AuditEventRecord
from medcollab.collaboration.api import router as collab_router
from medcollab.kernel.clock import FrozenClock
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime
from tests.support.factories import (
    Account,
    fhir_headers,
    link,
    make_org,
    make_user,
    patient_resource,
    sign_in,
)


def collab_app(runtime: Runtime) -> FastAPI:
    app = create_app(runtime)
    if not any(str(getattr(route, "path", "")).startswith("/collab/") for route in app.routes):
        app.include_router(collab_router)
    return app


def headers(token: str, *, org: str | None = None, purpose: str | None = None) -> dict[str, str]:
    out = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if org:
        out["X-Organization"] = org
    if purpose:
        out["X-Purpose-Of-Use"] = purpose
    return out


@dataclass
class CollabWorld:
    client: TestClient
    runtime: Runtime
    clock: FrozenClock
    h1_id: str
    h2_id: str
    doctor: Account
    receiver: Account
    colleague: Account
    patient_id: str
    patient: Account
    tokens: dict[str, str]

    def token(self, account: Account) -> str:
        return self.tokens[account.username]

    def sign_in(self, account: Account) -> str:
        """A fresh session (the clock moves 30 s for the TOTP step)."""
        self.tokens[account.username] = sign_in(self.client, account, self.clock)
        return self.tokens[account.username]

    def refresh(self, *accounts: Account, at: datetime | None = None) -> None:
        """Sign in again shortly before ``at`` (sessions idle out after 15 minutes), then stop
        the clock exactly at ``at``."""
        if at is not None:
            self.clock.set(at - timedelta(minutes=5))
        for account in accounts:
            self.sign_in(account)
        if at is not None:
            self.clock.set(at)

    def h(self, account: Account, **kw: str) -> dict[str, str]:
        return headers(self.token(account), **kw)

    def fhir(self, account: Account, **kw: str) -> dict[str, str]:
        return fhir_headers(self.token(account), **kw)

    def create(self, account: Account, resource: dict[str, Any]) -> str:
        response = self.client.post(
            f"/fhir/R4/{resource['resourceType']}", json=resource, headers=self.fhir(account)
        )
        assert response.status_code == 201, response.text
        resource_id: str = response.json()["id"]
        return resource_id

    def read_status(self, account: Account, path: str, **kw: str) -> int:
        return self.client.get(f"/fhir/R4/{path}", headers=self.fhir(account, **kw)).status_code

    def practitioner(self, account: Account, family: str) -> str:
        """A FHIR Practitioner created by ``account`` and linked to it."""
        practitioner_id = self.create(
            account, {"resourceType": "Practitioner", "name": [{"family": family}]}
        )
        link(self.runtime, account.user_id, "practitioner", practitioner_id)
        return practitioner_id


def build_world(client: TestClient, runtime: Runtime, clock: FrozenClock) -> CollabWorld:
    h1 = make_org(runtime, "H1")
    h2 = make_org(runtime, "H2", region="HK")
    doctor = make_user(runtime, "dr.one", [("H1", Role.PHYSICIAN)])
    receiver = make_user(runtime, "dr.two", [("H2", Role.PHYSICIAN)])
    colleague = make_user(runtime, "dr.three", [("H2", Role.PHYSICIAN)])
    tokens = {a.username: sign_in(client, a, clock) for a in (doctor, receiver, colleague)}
    created = client.post(
        "/fhir/R4/Patient", json=patient_resource(), headers=fhir_headers(tokens["dr.one"])
    )
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    patient = make_user(
        runtime, "pat.one", [("H1", Role.PATIENT)], password="a long patient pass phrase"
    )
    link(runtime, patient.user_id, "patient", patient_id)
    tokens[patient.username] = sign_in(client, patient, clock)
    return CollabWorld(
        client,
        runtime,
        clock,
        str(h1.id),
        str(h2.id),
        doctor,
        receiver,
        colleague,
        patient_id,
        patient,
        tokens,
    )


def audit_types(runtime: Runtime, patient_id: str, prefix: str = "collab:") -> list[str]:
    """The types of the audit events that name the patient, oldest first."""
    with runtime.database.unit_of_work() as session:
        rows = session.scalars(
            select(AuditEventRecord.type)
            .join(AuditEventPatient, AuditEventPatient.seq == AuditEventRecord.seq)
            .where(
                AuditEventPatient.patient_id == patient_id,
                AuditEventRecord.type.startswith(prefix),
            )
            .order_by(AuditEventRecord.seq)
        )
        return list(rows)
