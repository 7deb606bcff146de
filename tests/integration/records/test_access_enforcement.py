"""The chokepoint: every FHIR route answers 404 to callers who may not see, and audits it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from medcollab.access.models import PatientNotification, ReviewTask
from medcollab.audit.models import AuditEventRecord
from medcollab.identity.models import Organization, User
from medcollab.kernel.permissions import Role
from tests.integration.records.conftest import World
from tests.support.factories import (
    fhir_headers,
    link,
    make_user,
    observation,
    patient_resource,
    sign_in,
)


def _events(world: World) -> list[AuditEventRecord]:
    with world.runtime.database.unit_of_work() as session:
        return list(session.scalars(select(AuditEventRecord).order_by(AuditEventRecord.seq)))


def _new_observation(world: World, **kw: object) -> str:
    response = world.client.post(
        "/fhir/R4/Observation", json=observation(world.patient_id, **kw), headers=world.as_doctor()
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


ROUTES = [
    ("GET", "/fhir/R4/Observation/{oid}", None, "fhir:resource:read"),
    ("GET", "/fhir/R4/Observation/{oid}/_history/1", None, "fhir:resource:vread"),
    ("GET", "/fhir/R4/Observation/{oid}/_history", None, "fhir:resource:history"),
    ("PUT", "/fhir/R4/Observation/{oid}", "observation", "fhir:resource:update"),
    ("DELETE", "/fhir/R4/Observation/{oid}", None, "fhir:resource:delete"),
    ("GET", "/fhir/R4/Patient/{pid}/$everything", None, "fhir:patient:everything"),
    ("POST", "/fhir/R4/Observation", "observation", "fhir:resource:create"),
]


@pytest.mark.parametrize(("method", "path", "body", "event"), ROUTES, ids=[r[3] for r in ROUTES])
def test_other_organisation_gets_404_and_the_denial_is_audited(
    world: World, method: str, path: str, body: str | None, event: str
) -> None:
    oid = _new_observation(world)
    url = path.format(oid=oid, pid=world.patient_id)
    payload = None
    if body:
        payload = observation(world.patient_id)
        if method == "PUT":
            payload["id"] = oid
    before = len(_events(world))
    response = world.client.request(method, url, json=payload, headers=world.as_outsider())
    assert response.status_code == 404, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    new = _events(world)[before:]
    denied = [e for e in new if e.type == event]
    assert denied, f"no {event} event"
    assert denied[-1].outcome == "4"
    assert str(denied[-1].agent_user_id) == world.outsider.user_id
    # The record is still intact for its own clinicians.
    assert (
        world.client.get(f"/fhir/R4/Observation/{oid}", headers=world.as_doctor()).status_code
        == 200
    )


def test_search_filters_silently_and_counts_only_visible(world: World) -> None:
    _new_observation(world)
    _new_observation(world)
    mine = world.client.get("/fhir/R4/Observation", headers=world.as_doctor()).json()
    theirs = world.client.get("/fhir/R4/Observation", headers=world.as_outsider()).json()
    assert mine["total"] == 2
    assert theirs["total"] == 0
    assert theirs["entry"] == []
    searches = [e for e in _events(world) if e.type == "fhir:resource:search"]
    assert len(searches) == 2


def test_patient_sees_own_record_only(world: World) -> None:
    oid = _new_observation(world)
    other = world.client.post(
        "/fhir/R4/Patient",
        json=patient_resource(family="Other", identifier="X9"),
        headers=world.as_doctor(),
    ).json()["id"]
    other_obs = world.client.post(
        "/fhir/R4/Observation", json=observation(other), headers=world.as_doctor()
    ).json()["id"]
    c, h = world.client, world.as_patient()
    assert c.get(f"/fhir/R4/Observation/{oid}", headers=h).status_code == 200
    assert c.get(f"/fhir/R4/Observation/{other_obs}", headers=h).status_code == 404
    assert c.get(f"/fhir/R4/Patient/{other}", headers=h).status_code == 404
    found = c.get("/fhir/R4/Observation", headers=h).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [oid]
    # Patients do not write clinical data.
    assert (
        c.post("/fhir/R4/Observation", json=observation(world.patient_id), headers=h).status_code
        == 404
    )


def test_guardian_sees_the_ward(world: World) -> None:
    guardian = make_user(
        world.runtime, "guard.one", [("H1", Role.GUARDIAN)], password="guardian pass phrase long"
    )
    link(world.runtime, guardian.user_id, "guardian", world.patient_id)
    token = sign_in(world.client, guardian, world.clock)
    response = world.client.get(f"/fhir/R4/Patient/{world.patient_id}", headers=fhir_headers(token))
    assert response.status_code == 200


def _team(patient_id: str, practitioner: str, end: str) -> dict[str, object]:
    return {
        "resourceType": "CareTeam",
        "status": "active",
        "subject": {"reference": f"Patient/{patient_id}"},
        "participant": [{"member": {"reference": f"Practitioner/{practitioner}"}}],
        "period": {"start": "2025-12-01T00:00:00Z", "end": end},
    }


def test_care_team_membership_outlives_the_registration_period(world: World) -> None:
    """Registration gives the registering organisation 30 days; a CareTeam naming the nurse's
    Practitioner keeps that nurse (and only that nurse) in until the team's period ends."""
    member = make_user(world.runtime, "nurse.member", [("H1", Role.NURSE)])
    link(world.runtime, member.user_id, "practitioner", "prac-member")
    bystander = make_user(world.runtime, "nurse.bystander", [("H1", Role.NURSE)])
    oid = _new_observation(world)
    url = f"/fhir/R4/Observation/{oid}"
    team = _team(world.patient_id, "prac-member", "2026-06-01T00:00:00Z")
    assert (
        world.client.post("/fhir/R4/CareTeam", json=team, headers=world.as_doctor()).status_code
        == 201
    )

    world.clock.advance(timedelta(days=31))  # Registration relationship over.
    member_token = sign_in(world.client, member, world.clock)
    bystander_token = sign_in(world.client, bystander, world.clock)
    assert world.client.get(url, headers=fhir_headers(member_token)).status_code == 200
    assert world.client.get(url, headers=fhir_headers(bystander_token)).status_code == 404

    world.clock.set(world.clock.now().replace(year=2026, month=6, day=2))  # Team period over.
    member_token = sign_in(world.client, member, world.clock)
    assert world.client.get(url, headers=fhir_headers(member_token)).status_code == 404


def test_break_glass_flow(world: World) -> None:
    oid = _new_observation(world)
    url = f"/fhir/R4/Observation/{oid}"
    c = world.client
    assert c.get(url, headers=world.as_outsider(purpose="ETREAT")).status_code == 404
    assert (
        c.get(url, headers=world.as_outsider(purpose="ETREAT", reason="short")).status_code == 400
    )
    reason = "Unconscious patient in ED, allergy check"
    ok = c.get(url, headers=world.as_outsider(purpose="ETREAT", reason=reason))
    assert ok.status_code == 200, ok.text
    # The grant lasts: later reads with ETREAT need no new reason, but TREAT still does not reach.
    assert c.get(url, headers=world.as_outsider(purpose="ETREAT")).status_code == 200
    assert c.get(url, headers=world.as_outsider()).status_code == 404
    # Read-only: no writes under break-glass.
    changed = {**ok.json(), "status": "amended"}
    assert c.put(url, json=changed, headers=world.as_outsider(purpose="ETREAT")).status_code == 404
    events = _events(world)
    granted = [e for e in events if e.type == "access:break-glass:granted"]
    assert len(granted) == 1
    reads = [e for e in events if e.type == "fhir:resource:read" and e.body.get("break_glass")]
    assert reads
    with world.runtime.database.unit_of_work() as session:
        assert session.scalars(select(ReviewTask)).one().status == "open"
        note = session.scalars(select(PatientNotification)).one()
        assert note.patient_id == world.patient_id
        assert note.kind == "break-glass-access"
    # After 60 minutes the grant has lapsed.
    world.clock.advance(timedelta(minutes=61))
    token = sign_in(c, world.outsider, world.clock)
    assert c.get(url, headers=fhir_headers(token, purpose="ETREAT")).status_code == 404


def _consent(patient_id: str, provision: dict[str, object]) -> dict[str, object]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}
            ]
        },
        "provision": provision,
    }


def test_consent_withdrawing_an_organisation(world: World) -> None:
    oid = _new_observation(world)
    with world.runtime.database.unit_of_work() as session:
        h1 = session.scalars(select(Organization).where(Organization.code == "H1")).one()
    consent = _consent(
        world.patient_id,
        {
            "type": "deny",
            "actor": [
                {
                    "role": {"coding": [{"code": "IRCP"}]},
                    "reference": {"reference": f"Organization/{h1.id}"},
                }
            ],
        },
    )
    created = world.client.post("/fhir/R4/Consent", json=consent, headers=world.as_patient())
    assert created.status_code == 201, created.text
    assert (
        world.client.get(f"/fhir/R4/Observation/{oid}", headers=world.as_doctor()).status_code
        == 404
    )
    assert "consent:patient:changed" in [e.type for e in _events(world)]
    # Break-glass overrides the denial under PIPL (the default profile), flagged in the audit.
    reason = "Cardiac arrest, need medication history"
    response = world.client.get(
        f"/fhir/R4/Observation/{oid}", headers=world.as_doctor(purpose="ETREAT", reason=reason)
    )
    assert response.status_code == 200
    last = [e for e in _events(world) if e.type == "fhir:resource:read"][-1]
    assert any("consent-overridden" in r for r in last.body["reasons"])


def test_consent_hiding_sensitive_labels(world: World) -> None:
    psy = _new_observation(world, labels=["PSY"])
    plain = _new_observation(world)
    consent = _consent(
        world.patient_id,
        {
            "type": "permit",
            "provision": [
                {
                    "type": "deny",
                    "securityLabel": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                            "code": "PSY",
                        }
                    ],
                }
            ],
        },
    )
    assert (
        world.client.post("/fhir/R4/Consent", json=consent, headers=world.as_patient()).status_code
        == 201
    )
    h = world.as_doctor()
    assert world.client.get(f"/fhir/R4/Observation/{psy}", headers=h).status_code == 404
    assert world.client.get(f"/fhir/R4/Observation/{plain}", headers=h).status_code == 200
    everything = world.client.get(
        f"/fhir/R4/Patient/{world.patient_id}/$everything", headers=h
    ).json()
    ids = {e["resource"]["id"] for e in everything["entry"]}
    assert plain in ids
    assert psy not in ids


def test_pharmacist_gets_minimum_necessary(world: World) -> None:
    pharmacist = make_user(world.runtime, "pharm.h1", [("H1", Role.PHARMACIST)])
    token = sign_in(world.client, pharmacist, world.clock)
    oid = _new_observation(world)
    doc = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": f"Patient/{world.patient_id}"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "bm90ZXM="}}],
    }
    did = world.client.post(
        "/fhir/R4/DocumentReference", json=doc, headers=world.as_doctor()
    ).json()["id"]
    h = fhir_headers(token)
    assert world.client.get(f"/fhir/R4/Observation/{oid}", headers=h).status_code == 404
    shown = world.client.get(f"/fhir/R4/DocumentReference/{did}", headers=h)
    assert shown.status_code == 200
    assert "content" not in shown.json()
    assert any(s["code"] == "REDACTED" for s in shown.json()["meta"]["security"])
    assert world.client.get(f"/fhir/R4/Patient/{world.patient_id}", headers=h).status_code == 200


@pytest.mark.parametrize("flag", ["training_current", "sanction_frozen"])
def test_lapsed_training_or_freeze_denies_phi(world: World, flag: str) -> None:
    with world.runtime.database.unit_of_work() as session:
        session.execute(
            update(User).where(User.username == "dr.one").values({flag: flag != "training_current"})
        )
    response = world.client.get(f"/fhir/R4/Patient/{world.patient_id}", headers=world.as_doctor())
    assert response.status_code == 404


def test_transaction_touching_an_invisible_record_fails_whole_and_is_audited(world: World) -> None:
    oid = _new_observation(world)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": observation(world.patient_id),
                "request": {"method": "POST", "url": "Observation"},
            },
            {"request": {"method": "GET", "url": f"Observation/{oid}"}},
        ],
    }
    before = len(_events(world))
    response = world.client.post("/fhir/R4", json=bundle, headers=world.as_outsider())
    assert response.status_code == 404
    new = [e.type for e in _events(world)[before:]]
    assert "fhir:bundle:transaction" in new
    searched = world.client.get("/fhir/R4/Observation", headers=world.as_doctor()).json()
    assert searched["total"] == 1  # The outsider's POST entry was not kept.


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/fhir/R4/Observation/{oid}"),
        ("GET", "/fhir/R4/Observation"),
        ("GET", "/fhir/R4/Observation/{oid}/_history"),
        ("GET", "/fhir/R4/Observation/{oid}/_history/1"),
        ("GET", "/fhir/R4/Patient/{pid}/$everything"),
        ("POST", "/fhir/R4/Observation"),
        ("PUT", "/fhir/R4/Observation/{oid}"),
        ("DELETE", "/fhir/R4/Observation/{oid}"),
        ("POST", "/fhir/R4"),
    ],
)
def test_forbidden_purpose_is_403_on_every_route(world: World, method: str, path: str) -> None:
    oid = _new_observation(world)
    url = path.format(oid=oid, pid=world.patient_id)
    body = (
        {"resourceType": "Bundle", "type": "batch", "entry": []}
        if url.endswith("R4")
        else (observation(world.patient_id) if method in ("POST", "PUT") else None)
    )
    # A patient may only act for PATRQT; a nurse may not claim research (HRESCH).
    response = world.client.request(
        method, url, json=body, headers=world.as_patient(purpose="TREAT")
    )
    assert response.status_code == 403, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    response = world.client.request(
        method, url, json=body, headers=world.as_doctor(purpose="HRESCH")
    )
    assert response.status_code == 403


def test_unauthenticated_gets_401_not_data(world: World) -> None:
    oid = _new_observation(world)
    response = world.client.get(f"/fhir/R4/Observation/{oid}")
    assert response.status_code == 401
    assert "valueQuantity" not in response.text


def test_staff_session_without_mfa_reaches_no_phi(world: World) -> None:
    officer = make_user(world.runtime, "sec.nomfa", [("H1", Role.PHYSICIAN)], provision_mfa=False)
    login = world.client.post(
        "/auth/login", json={"username": "sec.nomfa", "password": officer.password}
    )
    token = login.json()["access_token"]
    response = world.client.get(f"/fhir/R4/Patient/{world.patient_id}", headers=fhir_headers(token))
    assert response.status_code == 403
    assert "multi-factor" in response.json()["issue"][0]["diagnostics"]
