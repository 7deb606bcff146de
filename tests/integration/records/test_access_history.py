"""The patient's access history: a clinician's read appears, with a proof that the standalone,
standard-library verifier accepts against the published checkpoint; officers search AuditEvent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from medcollab.audit.integrator import integrate_once
from medcollab.kernel.permissions import Role
from tests.integration.records.conftest import World
from tests.support.factories import bearer, fhir_headers, link, make_user, observation, sign_in

TOOL = Path(__file__).resolve().parents[3] / "tools" / "verify_proof.py"


def test_patient_sees_a_clinicians_read_and_verifies_its_proof(
    world: World, tmp_path: Path
) -> None:
    oid = world.client.post(
        "/fhir/R4/Observation", json=observation(world.patient_id), headers=world.as_doctor()
    ).json()["id"]
    assert (
        world.client.get(f"/fhir/R4/Observation/{oid}", headers=world.as_doctor()).status_code
        == 200
    )
    assert (
        world.client.get(f"/fhir/R4/Observation/{oid}", headers=world.as_outsider()).status_code
        == 404
    )
    integrate_once(world.runtime)

    response = world.client.get("/me/access-history", headers=bearer(world.patient_token))
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["patient_id"] == world.patient_id
    reads = [
        e
        for e in page["entries"]
        if e["action"] == "read" and e["resource_types"] == ["Observation"]
    ]
    granted = [e for e in reads if not e["denied"]]
    denied = [e for e in reads if e["denied"]]
    assert granted
    assert denied
    entry = granted[0]
    assert entry["who"] == "Test dr.one"
    assert entry["role"] == "physician"
    assert entry["organization"] == "Organisation H1"
    assert entry["purpose"] == "TREAT"
    # Staff details stop at name, role and organisation: no address, session or user agent.
    text = response.text
    for leak in ("testclient", "address", "session", world.doctor.user_id):
        assert leak not in text
    seqs = [e["seq"] for e in page["entries"]]
    assert seqs == sorted(seqs, reverse=True)  # Newest first.

    checkpoint = world.client.get("/audit/checkpoint")
    assert checkpoint.status_code == 200
    assert checkpoint.text == page["checkpoint"]
    proof_file = tmp_path / "proof.json"
    proof_file.write_text(json.dumps(entry["proof"]), encoding="utf-8")
    cp_file = tmp_path / "checkpoint.txt"
    cp_file.write_text(checkpoint.text, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-I", str(TOOL), str(proof_file), "--checkpoint", str(cp_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"OK: seq {entry['seq']} is leaf")
    # A forged proof fails.
    forged = dict(entry["proof"])
    forged["leaf_index"] = forged["leaf_index"] + 1 if forged["leaf_index"] == 0 else 0
    proof_file.write_text(json.dumps(forged), encoding="utf-8")
    failed = subprocess.run(
        [sys.executable, "-I", str(TOOL), str(proof_file), "--checkpoint", str(cp_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert failed.returncode == 1


def test_history_never_shows_another_patients_data(world: World) -> None:
    other = world.client.post(
        "/fhir/R4/Patient",
        json={"resourceType": "Patient", "gender": "female"},
        headers=world.as_doctor(),
    ).json()["id"]
    world.client.get(f"/fhir/R4/Patient/{other}", headers=world.as_doctor())
    page = world.client.get("/me/access-history", headers=bearer(world.patient_token)).json()
    assert other not in json.dumps(page)
    assert (
        world.client.get(
            "/me/access-history", params={"patient": other}, headers=bearer(world.patient_token)
        ).status_code
        == 404
    )
    # Staff have no access history of their own to read.
    assert (
        world.client.get("/me/access-history", headers=bearer(world.doctor_token)).status_code
        == 403
    )


def test_guardian_reads_the_wards_history_and_break_glass_is_marked(world: World) -> None:
    guardian = make_user(
        world.runtime, "guard.two", [("H1", Role.GUARDIAN)], password="guardian pass phrase long"
    )
    link(world.runtime, guardian.user_id, "guardian", world.patient_id)
    token = sign_in(world.client, guardian, world.clock)
    reason = "Found unresponsive, checking medications"
    world.client.get(
        f"/fhir/R4/Patient/{world.patient_id}",
        headers=world.as_outsider(purpose="ETREAT", reason=reason),
    )
    page = world.client.get("/me/access-history", headers=bearer(token)).json()
    emergency = [e for e in page["entries"] if e["break_glass"]]
    assert emergency
    assert any(e["action"] == "emergency access granted" for e in emergency)
    assert reason not in json.dumps(page)


def test_officers_search_audit_events_others_cannot(world: World) -> None:
    officer = make_user(world.runtime, "sec.h1", [("H1", Role.SECURITY_OFFICER)])
    token = sign_in(world.client, officer, world.clock)
    world.client.get(f"/fhir/R4/Patient/{world.patient_id}", headers=world.as_doctor())
    found = world.client.get(
        "/fhir/R4/AuditEvent",
        params={"patient": world.patient_id, "type": "fhir:resource:read"},
        headers=bearer(token),
    )
    assert found.status_code == 200, found.text
    bundle = found.json()
    assert bundle["total"] >= 1
    event = bundle["entry"][0]["resource"]
    assert event["resourceType"] == "AuditEvent"
    assert {"reference": f"Patient/{world.patient_id}"} in [e["what"] for e in event["entity"]]
    single = world.client.get(f"/fhir/R4/AuditEvent/{event['id']}", headers=bearer(token))
    assert single.status_code == 200
    assert (
        world.client.get(
            "/fhir/R4/AuditEvent", headers=fhir_headers(world.doctor_token)
        ).status_code
        == 403
    )
    assert (
        world.client.get("/fhir/R4/AuditEvent", headers=bearer(world.patient_token)).status_code
        == 403
    )
    write = world.client.post(
        "/fhir/R4/AuditEvent", json={"resourceType": "AuditEvent"}, headers=bearer(token)
    )
    assert write.status_code == 403
