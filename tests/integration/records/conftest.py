"""A small world for the records tests: two hospitals, clinicians, a registered patient."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

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


@dataclass
class World:
    client: TestClient
    runtime: Runtime
    clock: FrozenClock
    doctor: Account
    doctor_token: str
    outsider: Account
    outsider_token: str
    patient_id: str
    patient_account: Account
    patient_token: str

    def as_doctor(self, **kw: str) -> dict[str, str]:
        return fhir_headers(self.doctor_token, **kw)

    def as_outsider(self, **kw: str) -> dict[str, str]:
        return fhir_headers(self.outsider_token, **kw)

    def as_patient(self, **kw: str) -> dict[str, str]:
        return fhir_headers(self.patient_token, **kw)


@pytest.fixture
def world(client: TestClient, runtime: Runtime, clock: FrozenClock) -> World:
    make_org(runtime, "H1")
    make_org(runtime, "H2", region="HK")
    doctor = make_user(runtime, "dr.one", [("H1", Role.PHYSICIAN)])
    outsider = make_user(runtime, "dr.two", [("H2", Role.PHYSICIAN)])
    doctor_token = sign_in(client, doctor, clock)
    outsider_token = sign_in(client, outsider, clock)
    created = client.post(
        "/fhir/R4/Patient", json=patient_resource(), headers=fhir_headers(doctor_token)
    )
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    patient_account = make_user(
        runtime, "pat.one", [("H1", Role.PATIENT)], password="a long patient pass phrase"
    )
    link(runtime, patient_account.user_id, "patient", patient_id)
    patient_token = sign_in(client, patient_account, clock)
    return World(
        client,
        runtime,
        clock,
        doctor,
        doctor_token,
        outsider,
        outsider_token,
        patient_id,
        patient_account,
        patient_token,
    )
