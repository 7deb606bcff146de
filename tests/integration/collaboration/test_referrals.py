"""Referrals: a referral grants exactly its scope for exactly its period, only once accepted; any
side can end it; every step is audited and shown to the patient."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from medcollab.audit.integrator import integrate_once
from medcollab.kernel.clock import FrozenClock
from medcollab.runtime import Runtime
from tests.integration.collaboration import CollabWorld, audit_types, build_world, collab_app
from tests.support.factories import Account, bearer, observation

TICK = timedelta(microseconds=1)


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(
        collab_app(runtime), base_url="https://testserver", raise_server_exceptions=False
    ) as test_client:
        yield test_client


@pytest.fixture
def w(client: TestClient, runtime: Runtime, clock: FrozenClock) -> CollabWorld:
    return build_world(client, runtime, clock)


def _condition(patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient/{patient_id}"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
    }


def _refer(w: CollabWorld, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "patient_id": w.patient_id,
        "to_org": "H2",
        "reason": "Suspected arrhythmia; please assess.",
        "scope": ["Observation"],
        "days": 2,
        **overrides,
    }
    response = w.client.post("/collab/referrals", json=body, headers=w.h(w.doctor))
    assert response.status_code == 201, response.text
    referral: dict[str, Any] = response.json()
    return referral


def _accept(w: CollabWorld, referral_id: str, account: Account | None = None) -> dict[str, Any]:
    response = w.client.post(
        f"/collab/referrals/{referral_id}/accept", headers=w.h(account or w.receiver)
    )
    assert response.status_code == 200, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_a_referral_grants_exactly_its_scope_for_exactly_its_period(w: CollabWorld) -> None:
    oid = w.create(w.doctor, observation(w.patient_id))
    cid = w.create(w.doctor, _condition(w.patient_id))
    start = w.clock.now() + timedelta(hours=6)
    referral = _refer(w, starts_at=start.isoformat())
    assert referral["status"] == "requested"
    assert referral["scope"] == ["Observation"]
    assert _instant(referral["starts_at"]) == start
    end = _instant(referral["ends_at"])
    assert end == start + timedelta(days=2)

    # Not accepted yet: nothing.
    assert w.read_status(w.receiver, f"Observation/{oid}") == 404
    inbox = w.client.get("/collab/referrals", headers=w.h(w.receiver)).json()
    assert [r["id"] for r in inbox] == [referral["id"]]
    assert _accept(w, referral["id"])["status"] == "accepted"

    # Accepted, but the period has not begun.
    w.refresh(w.receiver, at=start - TICK)
    assert w.read_status(w.receiver, f"Observation/{oid}") == 404
    w.clock.set(start)
    assert w.read_status(w.receiver, f"Observation/{oid}") == 200
    # Exactly the scope: not the Condition, not even the Patient resource.
    assert w.read_status(w.receiver, f"Condition/{cid}") == 404
    assert w.read_status(w.receiver, f"Patient/{w.patient_id}") == 404
    # The search sees the in-scope data only.
    found = w.client.get(
        f"/fhir/R4/Observation?patient=Patient/{w.patient_id}", headers=w.fhir(w.receiver)
    ).json()
    assert found["total"] == 1
    # A colleague at the receiving organisation is covered too (no practitioner was named);
    # a clinician of a third party is not.
    w.refresh(w.colleague)
    w.clock.set(start + timedelta(minutes=1))
    assert w.read_status(w.colleague, f"Observation/{oid}") == 200

    # The last instant of the period, then the end: access ends by itself.
    w.refresh(w.receiver, at=end - TICK)
    assert w.read_status(w.receiver, f"Observation/{oid}") == 200
    w.clock.set(end)
    assert w.read_status(w.receiver, f"Observation/{oid}") == 404
    listed = w.client.get(f"/collab/referrals/{referral['id']}", headers=w.h(w.receiver))
    assert listed.json()["status"] == "expired"


def test_a_referral_without_scope_shares_the_whole_record(w: CollabWorld) -> None:
    cid = w.create(w.doctor, _condition(w.patient_id))
    referral = _refer(w, scope=None, days=1)
    assert referral["scope"] is None
    _accept(w, referral["id"])
    assert w.read_status(w.receiver, f"Condition/{cid}") == 200
    assert w.read_status(w.receiver, f"Patient/{w.patient_id}") == 200


def test_a_named_practitioner_alone_gains_access(w: CollabWorld) -> None:
    oid = w.create(w.doctor, observation(w.patient_id))
    practitioner = w.practitioner(w.receiver, "Two")
    referral = _refer(w, to_practitioner_id=practitioner)
    assert referral["to_practitioner_id"] == practitioner
    # Any clinician of the receiving organisation may accept on its behalf.
    _accept(w, referral["id"], w.colleague)
    assert w.read_status(w.receiver, f"Observation/{oid}") == 200
    assert w.read_status(w.colleague, f"Observation/{oid}") == 404

    # A practitioner who has no account at the receiving organisation cannot be named.
    elsewhere = w.practitioner(w.doctor, "One")
    refused = w.client.post(
        "/collab/referrals",
        json={
            "patient_id": w.patient_id,
            "to_org": "H2",
            "reason": "x",
            "days": 1,
            "to_practitioner_id": elsewhere,
        },
        headers=w.h(w.doctor),
    )
    assert refused.status_code == 400
    assert "linked to" in refused.json()["message"]


@pytest.mark.parametrize("side", ["referring", "receiving", "patient"])
def test_each_side_can_revoke_and_revocation_ends_access(w: CollabWorld, side: str) -> None:
    oid = w.create(w.doctor, observation(w.patient_id))
    referral = _refer(w)
    _accept(w, referral["id"])
    assert w.read_status(w.receiver, f"Observation/{oid}") == 200
    account = {"referring": w.doctor, "receiving": w.receiver, "patient": w.patient}[side]
    revoked = w.client.post(
        f"/collab/referrals/{referral['id']}/revoke",
        json={"note": "No longer needed."},
        headers=w.h(account),
    )
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"
    assert revoked.json()["revoked_side"] == side
    assert w.read_status(w.receiver, f"Observation/{oid}") == 404
    # A revoked referral stays revoked.
    again = w.client.post(f"/collab/referrals/{referral['id']}/revoke", headers=w.h(account))
    assert again.status_code == 409
    reaccept = w.client.post(f"/collab/referrals/{referral['id']}/accept", headers=w.h(w.receiver))
    assert reaccept.status_code == 409
    # The FHIR resources record the outcome.
    task = w.client.get(f"/fhir/R4/Task/{referral['task_id']}", headers=w.fhir(w.doctor))
    assert task.json()["status"] == "cancelled"
    request = w.client.get(f"/fhir/R4/ServiceRequest/{referral['id']}", headers=w.fhir(w.doctor))
    assert request.json()["status"] == "revoked"
    assert request.json()["note"][0]["text"] == "No longer needed."
    assert audit_types(w.runtime, w.patient_id)[-1] == "collab:referral:revoked"


def test_decline_and_who_may_decide(w: CollabWorld) -> None:
    oid = w.create(w.doctor, observation(w.patient_id))
    referral = _refer(w)
    url = f"/collab/referrals/{referral['id']}"
    # The referring side does not accept its own referral; the patient does not either.
    assert w.client.post(f"{url}/accept", headers=w.h(w.doctor)).status_code == 403
    assert w.client.post(f"{url}/accept", headers=w.h(w.patient)).status_code == 403
    declined = w.client.post(
        f"{url}/decline", json={"note": "No capacity"}, headers=w.h(w.receiver)
    )
    assert declined.status_code == 200, declined.text
    assert declined.json()["status"] == "declined"
    assert w.read_status(w.receiver, f"Observation/{oid}") == 404
    assert w.client.post(f"{url}/accept", headers=w.h(w.receiver)).status_code == 409
    task = w.client.get(f"/fhir/R4/Task/{referral['task_id']}", headers=w.fhir(w.doctor)).json()
    assert task["status"] == "rejected"


def test_an_expired_referral_cannot_be_accepted(w: CollabWorld) -> None:
    referral = _refer(w, days=1)
    end = _instant(referral["ends_at"])
    w.refresh(w.receiver, at=end)
    refused = w.client.post(f"/collab/referrals/{referral['id']}/accept", headers=w.h(w.receiver))
    assert refused.status_code == 409
    assert refused.json()["error"] == "referral_expired"
    assert "period ended" in refused.json()["message"]


def test_the_patient_sees_their_referrals_and_every_step(w: CollabWorld) -> None:
    referral = _refer(w, reason="<b>Chest pain</b> since Monday")
    _accept(w, referral["id"])
    mine = w.client.get("/collab/referrals", headers=w.h(w.patient))
    assert mine.status_code == 200
    assert [r["id"] for r in mine.json()] == [referral["id"]]
    detail = w.client.get(f"/collab/referrals/{referral['id']}", headers=w.h(w.patient)).json()
    # Stored and returned exactly as given: escaping is the renderer's job.
    assert detail["reason"] == "<b>Chest pain</b> since Monday"
    assert detail["status"] == "accepted"
    # The patient also reads the ServiceRequest as part of their own record.
    own = w.client.get(f"/fhir/R4/ServiceRequest/{referral['id']}", headers=w.fhir(w.patient))
    assert own.status_code == 200
    assert own.json()["occurrencePeriod"]["end"].startswith(referral["ends_at"][:19])

    # Every step names the patient in the audit log...
    types = audit_types(w.runtime, w.patient_id)
    assert types == [
        "collab:referral:created",
        "collab:referral:accepted",
        "collab:referral:listed",
    ]
    # ...and the clinicians' steps appear in the patient's access history.
    integrate_once(w.runtime)
    history = w.client.get("/me/access-history?count=100", headers=bearer(w.token(w.patient)))
    assert history.status_code == 200, history.text
    actions = {(e["action"], e["organization"]) for e in history.json()["entries"]}
    assert ("created", "Organisation H1") in actions
    assert ("accepted", "Organisation H2") in actions


def test_bad_referrals_get_clear_4xx(w: CollabWorld) -> None:
    def refer(**body: Any) -> tuple[int, str]:
        payload = {"patient_id": w.patient_id, "to_org": "H2", "reason": "x", "days": 1, **body}
        response = w.client.post("/collab/referrals", json=payload, headers=w.h(w.doctor))
        return response.status_code, response.json().get("message", "")

    status, message = refer(scope=["Observatoin"])
    assert (status, "not a FHIR R4 resource type" in message) == (400, True)
    assert refer(scope=[])[0] == 422
    assert refer(days=0)[0] == 422
    assert refer(days=366)[0] == 422
    assert refer(to_org="H1")[0] == 400
    assert refer(to_org="NOPE")[0] == 404
    assert refer(patient_id="no-such-patient")[0] == 404
    assert refer(starts_at="2020-01-01T00:00:00Z")[0] == 400
    assert refer(starts_at="2026-02-01T00:00:00")[0] == 422  # No time zone.
    assert refer(reason="   ")[0] == 400
    assert refer(unexpected=1)[0] == 422
    # A clinician without a relationship with the patient cannot refer them (it is "not found").
    outsider = w.client.post(
        "/collab/referrals",
        json={"patient_id": w.patient_id, "to_org": "H1", "reason": "x", "days": 1},
        headers=w.h(w.receiver),
    )
    assert outsider.status_code == 404
    # Referrals are invisible to anyone not party to them.
    referral = _refer(w)
    assert w.client.get("/collab/referrals", headers=w.h(w.receiver)).status_code == 200
    form = w.client.post(
        "/collab/referrals",
        content=b"patient_id=x",
        headers={**w.h(w.doctor), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415
    assert w.client.get("/collab/referrals/not-a-uuid", headers=w.h(w.doctor)).status_code == 404
    assert w.client.get(f"/collab/referrals/{referral['id']}").status_code == 401
