"""Remote consultations: invitations need a basis (care relationship, the patient's consent, or the
jurisdiction's treatment rule); content is sealed with the patient's key; every read is audited;
files are judged by their content; threads close and archive."""

from __future__ import annotations

import secrets
import struct
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from medcollab.audit.integrator import integrate_once
from medcollab.collaboration.models import AttachmentRecord, ConsultationRecord, MessageRecord
from medcollab.collaboration.services import MAX_ATTACHMENT_BYTES
from medcollab.config import Settings
from medcollab.identity.models import OrgKind
from medcollab.identity.services import UserService, operator_agent
from medcollab.kernel.clock import FrozenClock
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime
from tests.integration.collaboration import CollabWorld, audit_types, build_world, collab_app
from tests.support.factories import bearer, make_user, patient_resource

SCRIPT = '<script>alert("x")</script><img src=x onerror=alert(1)> & done'
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << >>\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 64
ELF = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 120
PE = b"MZ\x90\x00" + b"\x00" * 200


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian data element (PS3.5 7.1.2)."""
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _dicom() -> bytes:
    """A small DICOM Part 10 Secondary Capture instance: preamble, magic, file meta, dataset."""
    sop_class, sop_instance = b"1.2.840.10008.5.1.4.1.1.7", b"2.25.123456789"
    meta = (
        _element(0x0002, 0x0001, b"OB", b"\x00\x01")
        + _element(0x0002, 0x0002, b"UI", sop_class)
        + _element(0x0002, 0x0003, b"UI", sop_instance)
        + _element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1")
        + _element(0x0002, 0x0012, b"UI", b"2.25.1")
    )
    meta = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta))) + meta
    dataset = (
        _element(0x0008, 0x0016, b"UI", sop_class)
        + _element(0x0008, 0x0018, b"UI", sop_instance)
        + _element(0x0010, 0x0010, b"PN", b"Test^Patient")
    )
    return b"\x00" * 128 + b"DICM" + meta + dataset


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # A body limit above the attachment limit, so the service's own limit is what refuses.
    return Settings(
        mode="dev",
        secret_key=secrets.token_urlsafe(32),
        data_dir=tmp_path,
        audit_integrate_seconds=0,
        max_body_bytes=MAX_ATTACHMENT_BYTES + 4 * 1024 * 1024,
    )


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(
        collab_app(runtime), base_url="https://testserver", raise_server_exceptions=False
    ) as test_client:
        yield test_client


@pytest.fixture
def w(client: TestClient, runtime: Runtime, clock: FrozenClock) -> CollabWorld:
    return build_world(client, runtime, clock)


def _consent(w: CollabWorld, org_id: str, kind: str = "permit") -> str:
    consent = {
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
        "patient": {"reference": f"Patient/{w.patient_id}"},
        "provision": {
            "type": kind,
            "actor": [
                {
                    "role": {"coding": [{"code": "IRCP"}]},
                    "reference": {"reference": f"Organization/{org_id}"},
                }
            ],
        },
    }
    return w.create(w.patient, consent)


def _open(w: CollabWorld, topic: str = "Case: <b>arrhythmia</b>") -> dict[str, Any]:
    response = w.client.post(
        "/collab/consultations",
        json={"patient_id": w.patient_id, "topic": topic},
        headers=w.h(w.doctor),
    )
    assert response.status_code == 201, response.text
    thread: dict[str, Any] = response.json()
    return thread


def _invite(w: CollabWorld, thread_id: str, days: int = 7) -> Any:
    return w.client.post(
        f"/collab/consultations/{thread_id}/invitations",
        json={"user_id": w.receiver.user_id, "org": "H2", "days": days},
        headers=w.h(w.doctor),
    )


def _join(w: CollabWorld, thread_id: str) -> str:
    invited = _invite(w, thread_id)
    assert invited.status_code == 201, invited.text
    invitation = invited.json()["id"]
    joined = w.client.post(
        f"/collab/consultations/{thread_id}/invitations/{invitation}/accept",
        headers=w.h(w.receiver),
    )
    assert joined.status_code == 200, joined.text
    return str(invitation)


def _upload(
    w: CollabWorld, thread_id: str, name: str, content: bytes, declared: str = "application/pdf"
) -> Any:
    return w.client.post(
        f"/collab/consultations/{thread_id}/attachments",
        files={"file": (name, content, declared)},
        headers={"Authorization": f"Bearer {w.token(w.doctor)}"},
    )


def test_consent_gates_invitations_and_content_is_sealed_and_audited(w: CollabWorld) -> None:
    thread = _open(w)
    assert thread["topic"] == "Case: <b>arrhythmia</b>"
    assert thread["my_role"] == "owner"
    tid = thread["id"]

    # No care relationship and no consent (PIPL): refused, with the way forward, and audited.
    refused = _invite(w, tid)
    assert refused.status_code == 403
    assert refused.json()["error"] == "consent_required"
    assert "Consent" in refused.json()["message"]
    assert audit_types(w.runtime, w.patient_id)[-1] == "collab:consultation:invitation-refused"

    consent_id = _consent(w, w.h2_id)
    invited = _invite(w, tid)
    assert invited.status_code == 201, invited.text
    assert invited.json()["basis"] == f"consent:Consent/{consent_id}"
    pending = w.client.get("/collab/consultations/invitations", headers=w.h(w.receiver)).json()
    assert [p["id"] for p in pending] == [invited.json()["id"]]
    # Before joining, the invitee sees nothing of the thread.
    assert w.client.get(f"/collab/consultations/{tid}", headers=w.h(w.receiver)).status_code == 404
    accept = f"/collab/consultations/{tid}/invitations/{invited.json()['id']}/accept"
    assert w.client.post(accept, headers=w.h(w.receiver)).json()["my_role"] == "member"
    assert w.client.post(accept, headers=w.h(w.receiver)).status_code == 409

    # HTML and script are data: stored and returned exactly, as JSON.
    posted = w.client.post(
        f"/collab/consultations/{tid}/messages", json={"text": SCRIPT}, headers=w.h(w.receiver)
    )
    assert posted.status_code == 201, posted.text
    read = w.client.get(f"/collab/consultations/{tid}/messages", headers=w.h(w.doctor))
    assert read.headers["content-type"].startswith("application/json")
    assert [m["text"] for m in read.json()] == [SCRIPT]
    assert read.json()[0]["author_org"] == "H2"
    assert read.json()[0]["author_name"] == "Test dr.two"
    detail = w.client.get(f"/collab/consultations/{tid}", headers=w.h(w.receiver)).json()
    assert {p["org"] for p in detail["participants"]} == {"H1", "H2"}

    # At rest: ciphertext only, bound to its row (a message moved to another row does not open).
    with w.runtime.database.unit_of_work() as session:
        stored = session.scalars(select(MessageRecord)).one()
        assert b"script" not in stored.body_enc
        thread_row = session.get(ConsultationRecord, uuid.UUID(tid))
        assert thread_row is not None
        assert b"arrhythmia" not in thread_row.topic_enc
        session.add(
            MessageRecord(
                id=uuid.uuid4(),
                consult_id=stored.consult_id,
                author_user_id=stored.author_user_id,
                author_org_id=stored.author_org_id,
                created_at=stored.created_at,
                body_enc=stored.body_enc,
            )
        )
    tampered = w.client.get(f"/collab/consultations/{tid}/messages", headers=w.h(w.doctor))
    assert tampered.status_code == 500
    assert "integrity" in tampered.json()["message"]

    # Every step and read names the patient; the clinicians' reads reach the access history.
    types = audit_types(w.runtime, w.patient_id)
    for expected in (
        "collab:consultation:created",
        "collab:consultation:invited",
        "collab:consultation:joined",
        "collab:consultation:message-posted",
        "collab:consultation:read",
    ):
        assert expected in types
    integrate_once(w.runtime)
    history = w.client.get("/me/access-history?count=100", headers=bearer(w.token(w.patient)))
    entries = history.json()["entries"]
    assert {"read", "joined", "message-posted"} <= {e["action"] for e in entries}
    assert any(e["organization"] == "Organisation H2" for e in entries if e["action"] == "read")


def test_a_withdrawn_consent_ends_participation(w: CollabWorld) -> None:
    tid = _open(w)["id"]
    _consent(w, w.h2_id)
    _join(w, tid)
    url = f"/collab/consultations/{tid}/messages"
    assert w.client.get(url, headers=w.h(w.receiver)).status_code == 200
    _consent(w, w.h2_id, kind="deny")
    ended = w.client.get(url, headers=w.h(w.receiver))
    assert ended.status_code == 403
    assert ended.json()["error"] == "consultation_access_ended"
    assert "collab:consultation:access-denied" in audit_types(w.runtime, w.patient_id)
    # The owner keeps access: the denial names the other organisation only.
    assert w.client.get(url, headers=w.h(w.doctor)).status_code == 200


def test_an_expired_invitation_cannot_be_accepted(w: CollabWorld) -> None:
    tid = _open(w)["id"]
    _consent(w, w.h2_id)
    invited = _invite(w, tid, days=1)
    assert invited.status_code == 201
    w.refresh(w.receiver, at=w.clock.now() + timedelta(days=1))
    late = w.client.post(
        f"/collab/consultations/{tid}/invitations/{invited.json()['id']}/accept",
        headers=w.h(w.receiver),
    )
    assert late.status_code == 409
    assert late.json()["error"] == "invitation_expired"
    assert "expired" in late.json()["message"]
    # A new invitation is possible once the old one has expired.
    w.refresh(w.doctor)
    assert _invite(w, tid).status_code == 201


def test_a_care_relationship_needs_no_consent(w: CollabWorld) -> None:
    def refer_and_accept(scope: list[str] | None) -> None:
        referral = w.client.post(
            "/collab/referrals",
            json={
                "patient_id": w.patient_id,
                "to_org": "H2",
                "reason": "MDT",
                "days": 5,
                "scope": scope,
            },
            headers=w.h(w.doctor),
        ).json()
        accepted = w.client.post(
            f"/collab/referrals/{referral['id']}/accept", headers=w.h(w.receiver)
        )
        assert accepted.status_code == 200, accepted.text

    tid = _open(w)["id"]
    # A relationship limited to other data is not a basis for discussing the whole case.
    refer_and_accept(["Observation"])
    assert _invite(w, tid).status_code == 403
    refer_and_accept(None)
    invited = _invite(w, tid)
    assert invited.status_code == 201, invited.text
    assert invited.json()["basis"].startswith("care-relationship: referral")


def test_the_jurisdiction_may_allow_treatment_sharing_without_consent(w: CollabWorld) -> None:
    with w.runtime.database.unit_of_work() as session:
        UserService(session=session, runtime=w.runtime).create_org(
            code="US1",
            name="Organisation US1",
            kind=OrgKind.HOSPITAL,
            region="US",
            jurisdiction="HIPAA",
            agent=operator_agent("test"),
        )
    us_doctor = make_user(w.runtime, "dr.us", [("US1", Role.PHYSICIAN)])
    w.sign_in(us_doctor)
    patient = w.create(us_doctor, patient_resource(identifier="110101199003070000"))
    thread = w.client.post(
        "/collab/consultations",
        json={"patient_id": patient, "topic": "Second opinion"},
        headers=w.h(us_doctor),
    ).json()

    def invite(account: Any) -> Any:
        return w.client.post(
            f"/collab/consultations/{thread['id']}/invitations",
            json={"user_id": account.user_id, "org": "H2"},
            headers=w.h(us_doctor),
        )

    invited = invite(w.receiver)
    assert invited.status_code == 201, invited.text
    assert invited.json()["basis"] == "jurisdiction:HIPAA:45 CFR 164.506(c)(2)"
    # The patient's explicit denial of the organisation still wins (recorded by the clinician).
    denial = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "provision": {
            "type": "deny",
            "actor": [
                {
                    "role": {"coding": [{"code": "IRCP"}]},
                    "reference": {"reference": f"Organization/{w.h2_id}"},
                }
            ],
        },
    }
    w.create(us_doctor, denial)
    refused = invite(w.colleague)
    assert refused.status_code == 403
    assert "denies" in refused.json()["message"]


def test_attachments_are_typed_by_content_and_limited(w: CollabWorld) -> None:
    tid = _open(w)["id"]
    dicom = _dicom()
    for name, content, expected in (
        ("report.pdf", PDF, "application/pdf"),
        ("scan.png", PNG, "image/png"),
        ("photo.JPG", JPEG, "image/jpeg"),
        ("IM000001.dcm", dicom, "application/dicom"),
        ("IM000002", dicom, "application/dicom"),
    ):
        # The declared Content-Type is ignored: the content decides.
        added = _upload(w, tid, name, content, declared="application/octet-stream")
        assert added.status_code == 201, (name, added.text)
        assert added.json()["media_type"] == expected
        assert added.json()["filename"] == name
    listed = w.client.get(f"/collab/consultations/{tid}/attachments", headers=w.h(w.doctor))
    first = next(a for a in listed.json() if a["filename"] == "report.pdf")
    download = w.client.get(
        f"/collab/consultations/{tid}/attachments/{first['id']}", headers=w.h(w.doctor)
    )
    assert download.status_code == 200
    assert download.content == PDF
    assert download.headers["content-type"] == "application/pdf"
    assert download.headers["content-disposition"] == (
        f'attachment; filename="attachment-{first["id"]}.pdf"'
    )
    assert download.headers["x-content-type-options"] == "nosniff"
    types = audit_types(w.runtime, w.patient_id)
    assert "collab:consultation:attachment-read" in types
    with w.runtime.database.unit_of_work() as session:
        rows = session.scalars(select(AttachmentRecord)).all()
        assert all(b"%PDF" not in r.content_enc and b"report" not in r.filename_enc for r in rows)

    def refused(name: str, content: bytes, status: int = 415) -> str:
        response = _upload(w, tid, name, content)
        assert response.status_code == status, (name, response.text)
        message: str = response.json()["message"]
        return message

    assert "not a DICOM file" in refused("IM000003.dcm", b"hello, not dicom" * 20)
    assert "content is PNG" in refused("IM000004.dcm", PNG)
    assert "ELF executable" in refused("report.pdf", ELF)
    assert "Windows (PE) executable" in refused("report.pdf", PE)
    # A PE/DICOM polyglot: a program header in the DICOM preamble.
    polyglot = PE[:128].ljust(128, b"\x00") + _dicom()[128:]
    assert "Windows (PE) executable" in refused("IM000005.dcm", polyglot)
    assert "a script" in refused("run.pdf", b"#!/bin/sh\nrm -rf /\n")
    assert "content is PDF" in refused("report.exe", PDF)
    assert "not recognised" in refused("page.html", b"<html><script>x</script></html>")
    assert "active content" in refused("form.pdf", PDF + b"<< /S /JavaScript /JS (app.alert(1)) >>")
    assert "active content" in refused("form.pdf", PDF + b"<< /S /Java#53cript >>")
    assert "empty" in refused("empty.pdf", b"", status=400)
    big = b"%PDF-" + b"0" * MAX_ATTACHMENT_BYTES
    assert f"limited to {MAX_ATTACHMENT_BYTES} bytes" in refused("big.pdf", big, status=413)
    not_multipart = w.client.post(
        f"/collab/consultations/{tid}/attachments", content=PDF, headers=w.h(w.doctor)
    )
    assert not_multipart.status_code == 415
    assert "multipart/form-data" in not_multipart.json()["message"]


def test_close_archive_and_who_may_see_a_thread(w: CollabWorld) -> None:
    tid = _open(w)["id"]
    _consent(w, w.h2_id)
    _join(w, tid)
    url = f"/collab/consultations/{tid}"
    # Only the owner closes; a stranger gets "not found", and the attempt is audited.
    assert w.client.post(f"{url}/close", headers=w.h(w.receiver)).status_code == 403
    assert w.client.get(url, headers=w.h(w.colleague)).status_code == 404
    assert audit_types(w.runtime, w.patient_id)[-1] == "collab:consultation:access-denied"
    assert w.client.post(f"{url}/archive", headers=w.h(w.doctor)).status_code == 409
    closed = w.client.post(f"{url}/close", headers=w.h(w.doctor))
    assert closed.json()["status"] == "closed"
    late = w.client.post(f"{url}/messages", json={"text": "late"}, headers=w.h(w.receiver))
    assert late.status_code == 409
    assert w.client.get(f"{url}/messages", headers=w.h(w.receiver)).status_code == 200
    assert w.client.post(f"{url}/archive", headers=w.h(w.doctor)).json()["status"] == "archived"
    assert w.client.get("/collab/consultations", headers=w.h(w.doctor)).json() == []
    everything = w.client.get(
        "/collab/consultations?include_archived=true", headers=w.h(w.doctor)
    ).json()
    assert [t["id"] for t in everything] == [tid]
    assert w.client.get(url, headers=w.h(w.doctor)).json()["status"] == "archived"


def test_bad_consultation_requests(w: CollabWorld) -> None:
    def post(path: str, body: dict[str, Any], account: Any = None) -> int:
        response = w.client.post(path, json=body, headers=w.h(account or w.doctor))
        return response.status_code

    assert post("/collab/consultations", {"patient_id": "nobody", "topic": "x"}) == 404
    assert post("/collab/consultations", {"patient_id": w.patient_id, "topic": ""}) == 422
    # A clinician without a relationship cannot open a thread about the patient.
    assert (
        post("/collab/consultations", {"patient_id": w.patient_id, "topic": "x"}, w.receiver) == 404
    )
    # Patients do not open case discussions.
    assert (
        post("/collab/consultations", {"patient_id": w.patient_id, "topic": "x"}, w.patient) == 403
    )
    tid = _open(w)["id"]
    assert post(f"/collab/consultations/{tid}/messages", {"text": "  "}) == 400
    assert post(f"/collab/consultations/{tid}/messages", {"text": "x" * 20_001}) == 422
    assert (
        post(
            f"/collab/consultations/{tid}/invitations", {"user_id": str(uuid.uuid4()), "org": "H2"}
        )
        == 404
    )
    assert (
        post(
            f"/collab/consultations/{tid}/invitations",
            {"user_id": w.receiver.user_id, "org": "H2", "days": 31},
        )
        == 422
    )
    assert (
        w.client.get("/collab/consultations/not-a-uuid", headers=w.h(w.doctor)).status_code == 404
    )
