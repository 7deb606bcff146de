"""DICOM imaging: upload into an encrypted ImagingStudy, view and download inside the care team,
de-identified copies for consultation participants outside it, bad uploads refused whole.

The images are pydicom's bundled test files: an MR series of seven instances of one study
(``dicomdirtests/98892003/MR700``), a CT instance, and ultrasound and secondary-capture images
that the burned-in-annotation check flags.
"""

from __future__ import annotations

import io
import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from medcollab.audit.models import AuditEventPatient, AuditEventRecord
from medcollab.config import Settings
from medcollab.imaging.models import ImagingInstanceRecord, ImagingShareRecord, ImagingStudyRecord
from medcollab.kernel.clock import FrozenClock
from medcollab.records.models import FhirResource
from medcollab.runtime import Runtime
from tests.integration.collaboration import CollabWorld, audit_types, build_world, collab_app

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
MR_SERIES = sorted((TEST_FILES / "dicomdirtests" / "98892003" / "MR700").iterdir())
CT = TEST_FILES / "CT_small.dcm"
ULTRASOUND = TEST_FILES / "ExplVR_BigEnd.dcm"
SECONDARY_CAPTURE = TEST_FILES / "SC_rgb_small_odd.dcm"
UPLOAD_LIMIT = 128 * 1024


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        mode="dev",
        secret_key=secrets.token_urlsafe(32),
        data_dir=tmp_path,
        audit_integrate_seconds=0,
        max_upload_bytes=UPLOAD_LIMIT,
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


def _auth(w: CollabWorld, account: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {w.token(account)}"}


def _upload(w: CollabWorld, account: Any, paths: list[Path], patient: str | None = None) -> Any:
    files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    return w.client.post(
        "/imaging/studies",
        params={"patient": patient or w.patient_id},
        files=files,
        headers=_auth(w, account),
    )


def _raw(w: CollabWorld, account: Any, content: bytes, content_type: str) -> Any:
    return w.client.post(
        "/imaging/studies",
        params={"patient": w.patient_id},
        content=content,
        headers={**_auth(w, account), "Content-Type": content_type},
    )


def _read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _counts(runtime: Runtime) -> tuple[int, int, int]:
    with runtime.database.unit_of_work() as session:
        studies = session.scalar(select(func.count()).select_from(ImagingStudyRecord)) or 0
        instances = session.scalar(select(func.count()).select_from(ImagingInstanceRecord)) or 0
        resources = (
            session.scalar(
                select(func.count())
                .select_from(FhirResource)
                .where(FhirResource.resource_type == "ImagingStudy")
            )
            or 0
        )
    return studies, instances, resources


def _events(runtime: Runtime, patient_id: str, prefix: str) -> list[tuple[str, str, str]]:
    """(type, outcome, reasons) of the audit events naming the patient, oldest first."""
    with runtime.database.unit_of_work() as session:
        rows = session.execute(
            select(AuditEventRecord.type, AuditEventRecord.outcome, AuditEventRecord.body)
            .join(AuditEventPatient, AuditEventPatient.seq == AuditEventRecord.seq)
            .where(
                AuditEventPatient.patient_id == patient_id,
                AuditEventRecord.type.startswith(prefix),
            )
            .order_by(AuditEventRecord.seq)
        ).all()
    return [(t, o, json.dumps(body)) for t, o, body in rows]


def test_upload_view_and_download_inside_the_care_team(w: CollabWorld) -> None:
    originals = {_read(p.read_bytes()).SOPInstanceUID: p.read_bytes() for p in MR_SERIES}
    uploaded = _upload(w, w.doctor, MR_SERIES)
    assert uploaded.status_code == 201, uploaded.text
    body = uploaded.json()
    assert len(body["stored"]) == len(MR_SERIES) == 7
    assert body["unchanged"] == []
    # The DICOM PatientID (98890234) is not an identifier of this patient: a wrong-patient warning.
    assert body["patient_match"] == "mismatch"
    assert any("belong to this patient" in warning for warning in body["warnings"])
    study = body["study"]
    resource = study["imaging_study"]
    first = _read(MR_SERIES[0].read_bytes())
    assert resource["resourceType"] == "ImagingStudy"
    assert resource["subject"] == {"reference": f"Patient/{w.patient_id}"}
    assert resource["identifier"] == [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{first.StudyInstanceUID}"}
    ]
    assert resource["numberOfInstances"] == 7
    assert resource["numberOfSeries"] == len(
        {_read(p.read_bytes()).SeriesInstanceUID for p in MR_SERIES}
    )
    assert [m["code"] for m in resource["modality"]] == ["MR"]
    assert {i["uid"] for s in resource["series"] for i in s["instance"]} == set(originals)
    assert not any(i["burned_in_risk"] for i in study["instances"])

    # The ImagingStudy is an ordinary FHIR resource: the FHIR API finds it too.
    found = w.client.get(
        "/fhir/R4/ImagingStudy", params={"patient": w.patient_id}, headers=w.fhir(w.doctor)
    ).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [study["id"]]

    viewed = w.client.get(f"/imaging/studies/{study['id']}", headers=_auth(w, w.doctor))
    assert viewed.status_code == 200
    instances = viewed.json()["instances"]
    assert {i["sop_instance_uid"] for i in instances} == set(originals)
    for instance in instances[:3]:
        got = w.client.get(
            f"/imaging/studies/{study['id']}/instances/{instance['id']}", headers=_auth(w, w.doctor)
        )
        assert got.status_code == 200
        assert got.headers["content-type"] == "application/dicom"
        assert got.headers["x-deidentified"] == "false"
        assert got.content == originals[instance["sop_instance_uid"]]
        assert "98890234" not in got.headers["content-disposition"]

    # A repeated upload is idempotent.
    again = _upload(w, w.doctor, MR_SERIES[:3])
    assert again.status_code == 200, again.text
    assert again.json()["stored"] == []
    assert len(again.json()["unchanged"]) == 3
    # A second study, sent as one application/dicom body.
    single = _raw(w, w.doctor, CT.read_bytes(), "application/dicom")
    assert single.status_code == 201, single.text
    listed = w.client.get(
        "/imaging/studies", params={"patient": w.patient_id}, headers=_auth(w, w.doctor)
    )
    assert len(listed.json()) == 2
    assert _counts(w.runtime) == (2, 8, 2)

    # At rest: no file, no UID and no name in the clear.
    with w.runtime.database.unit_of_work() as session:
        rows = session.scalars(select(ImagingInstanceRecord)).all()
        study_rows = session.scalars(select(ImagingStudyRecord)).all()
    for row in rows:
        for needle in (b"DICM", first.StudyInstanceUID.encode(), b"98890234", b"CompressedSamples"):
            assert needle not in row.content_enc
            assert needle not in row.metadata_enc
    assert all(first.StudyInstanceUID not in r.study_uid_index for r in study_rows)

    types = [t for t, _o, _r in _events(w.runtime, w.patient_id, "imaging:")]
    assert types.count("imaging:study:uploaded") == 3
    assert types.count("imaging:instance:downloaded") == 3


def test_outside_the_care_relationship_nothing_is_visible(w: CollabWorld) -> None:
    study = _upload(w, w.doctor, MR_SERIES[:2]).json()["study"]
    instance = study["instances"][0]["id"]
    outsider = _auth(w, w.receiver)
    assert w.client.get(f"/imaging/studies/{study['id']}", headers=outsider).status_code == 404
    got = w.client.get(f"/imaging/studies/{study['id']}/instances/{instance}", headers=outsider)
    assert got.status_code == 404
    assert b"DICM" not in got.content
    assert (
        w.client.get("/imaging/studies", params={"patient": w.patient_id}, headers=outsider).json()
        == []
    )
    # Uploading for a patient one may not write for is refused before anything is stored.
    refused = _upload(w, w.receiver, [CT])
    assert refused.status_code == 404
    assert _counts(w.runtime) == (1, 2, 1)
    # Adding to someone else's stored study is refused the same way.
    assert _upload(w, w.receiver, MR_SERIES[2:4]).status_code == 404
    # So is filing that study under a patient the outsider may not write for: no hint that
    # the study exists for somebody else.
    other = w.create(w.doctor, {"resourceType": "Patient", "name": [{"family": "Other"}]})
    hidden = _upload(w, w.receiver, MR_SERIES[2:3], patient=other)
    assert hidden.status_code == 404
    assert "another patient" not in hidden.text
    assert _counts(w.runtime) == (1, 2, 1)
    # Every refusal is in the log, naming the outsider's attempt.
    denied = [
        (t, o)
        for t, o, entry in _events(w.runtime, w.patient_id, "fhir:")
        if w.receiver.user_id in entry
    ]
    assert ("fhir:resource:read", "4") in denied
    assert ("fhir:resource:create", "4") in denied
    # The random ids of another study do not help either.
    bogus = "00000000-0000-4000-8000-000000000000"
    assert w.client.get(f"/imaging/studies/{bogus}", headers=_auth(w, w.doctor)).status_code == 404
    assert (
        w.client.get("/imaging/studies/not-a-uuid", headers=_auth(w, w.doctor)).status_code == 404
    )


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("pdf-named-dcm", 415),
        ("elf-with-dicm-marker", 415),
        ("plain-text-body", 415),
        ("truncated", 400),
        ("dicomdir", 400),
        ("two-studies", 400),
        ("no-file-field", 400),
        ("too-large", 413),
        ("missing-patient", 422),
    ],
)
def test_bad_uploads_get_a_clear_4xx_and_store_nothing(
    w: CollabWorld, case: str, status: int
) -> None:
    mr = MR_SERIES[0].read_bytes()
    auth = _auth(w, w.doctor)
    if case == "pdf-named-dcm":
        response = w.client.post(
            "/imaging/studies",
            params={"patient": w.patient_id},
            files={"file": ("scan.dcm", b"%PDF-1.7\n%%EOF\n", "application/dicom")},
            headers=auth,
        )
    elif case == "elf-with-dicm-marker":
        polyglot = b"\x7fELF" + mr[4:]
        response = _raw(w, w.doctor, polyglot, "application/dicom")
    elif case == "plain-text-body":
        response = _raw(w, w.doctor, mr, "text/plain")
    elif case == "truncated":
        response = _raw(w, w.doctor, mr[: len(mr) // 3], "application/dicom")
    elif case == "dicomdir":
        dicomdir = (TEST_FILES / "dicomdirtests" / "DICOMDIR").read_bytes()
        response = _raw(w, w.doctor, dicomdir, "application/dicom")
    elif case == "two-studies":
        response = _upload(w, w.doctor, [MR_SERIES[0], CT])
    elif case == "no-file-field":
        response = w.client.post(
            "/imaging/studies",
            params={"patient": w.patient_id},
            files={"image": ("scan.dcm", mr, "application/dicom")},
            headers=auth,
        )
    elif case == "too-large":
        big = (TEST_FILES / "examples_rgb_color.dcm").read_bytes()
        assert len(big) > UPLOAD_LIMIT
        response = _raw(w, w.doctor, big, "application/dicom")
    else:
        response = w.client.post(
            "/imaging/studies",
            content=mr,
            headers={**auth, "Content-Type": "application/dicom"},
        )
    assert response.status_code == status, response.text
    assert response.json()["message"]
    assert _counts(w.runtime) == (0, 0, 0)


def test_conflicting_uploads_are_refused(w: CollabWorld) -> None:
    assert _upload(w, w.doctor, MR_SERIES[:1]).status_code == 201
    # The same SOP instance with other content: a silent replacement is refused.
    original = _read(MR_SERIES[0].read_bytes())
    original.SeriesDescription = "altered"
    buffer = io.BytesIO()
    original.save_as(buffer, enforce_file_format=True)
    altered = _raw(w, w.doctor, buffer.getvalue(), "application/dicom")
    assert altered.status_code == 409
    assert "SOP Instance UID" in altered.json()["message"]
    # The same study for another patient: refused without naming the first patient.
    other = w.create(w.doctor, {"resourceType": "Patient", "name": [{"family": "Other"}]})
    moved = _upload(w, w.doctor, MR_SERIES[1:2], patient=other)
    assert moved.status_code == 409
    assert w.patient_id not in moved.text
    assert _counts(w.runtime) == (1, 1, 1)
    assert ("imaging:study:uploaded", "4") in [
        (t, o) for t, o, _ in _events(w.runtime, other, "imaging:")
    ]


def _consultation_with_outsider(w: CollabWorld) -> str:
    """A consultation opened by H1's doctor, joined by H2's clinician on the patient's consent."""
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
            "type": "permit",
            "actor": [
                {
                    "role": {"coding": [{"code": "IRCP"}]},
                    "reference": {"reference": f"Organization/{w.h2_id}"},
                }
            ],
        },
    }
    w.create(w.patient, consent)
    thread = w.client.post(
        "/collab/consultations",
        json={"patient_id": w.patient_id, "topic": "MR review"},
        headers=w.h(w.doctor),
    ).json()
    invited = w.client.post(
        f"/collab/consultations/{thread['id']}/invitations",
        json={"user_id": w.receiver.user_id, "org": "H2", "days": 7},
        headers=w.h(w.doctor),
    )
    assert invited.status_code == 201, invited.text
    accepted = w.client.post(
        f"/collab/consultations/{thread['id']}/invitations/{invited.json()['id']}/accept",
        headers=w.h(w.receiver),
    )
    assert accepted.status_code == 200, accepted.text
    return str(thread["id"])


def test_shared_imaging_is_deidentified_outside_the_care_relationship(w: CollabWorld) -> None:
    consult = _consultation_with_outsider(w)
    study = _upload(w, w.doctor, MR_SERIES).json()["study"]
    by_id = {i["id"]: i for i in study["instances"]}
    shared = w.client.post(
        f"/imaging/studies/{study['id']}/shares",
        json={"consultation": consult},
        headers=w.h(w.doctor),
    )
    assert shared.status_code == 201, shared.text
    share = shared.json()
    assert share["deidentified_for_me"] is False  # The sharer is inside the care relationship.

    # The consultant sees the shared study, marked as de-identified for them, with no UIDs.
    listing = w.client.get(f"/collab/consultations/{consult}/imaging", headers=w.h(w.receiver))
    assert listing.status_code == 200
    [seen] = listing.json()
    assert seen["deidentified_for_me"] is True
    assert "uid" not in listing.text.lower()
    copies = []
    for instance in seen["instances"][:3]:
        got = w.client.get(
            f"/collab/consultations/{consult}/imaging/{share['id']}/instances/{instance['id']}",
            headers=w.h(w.receiver),
        )
        assert got.status_code == 200, got.text
        assert got.headers["x-deidentified"] == "true"
        original_bytes = next(
            p.read_bytes()
            for p in MR_SERIES
            if _read(p.read_bytes()).SOPInstanceUID == by_id[instance["id"]]["sop_instance_uid"]
        )
        copies.append((_read(original_bytes), _read(got.content)))
    for original, copy in copies:
        assert copy.PatientIdentityRemoved == "YES"
        assert str(copy.PatientName) != str(original.PatientName)
        assert copy.get("PatientID", "") != original.PatientID
        assert copy.SOPInstanceUID != original.SOPInstanceUID
        assert copy.StudyInstanceUID != original.StudyInstanceUID
        assert copy.get("StudyDate", "") != original.StudyDate
        assert copy.PixelData == original.PixelData
    # UIDs and dates are remapped consistently within the study.
    assert len({c.StudyInstanceUID for _o, c in copies}) == 1
    assert len({c.SeriesInstanceUID for _o, c in copies}) == 1
    assert len({c.get("StudyDate", "") for _o, c in copies}) == 1
    # A second download of the same instance gives the same de-identified UIDs.
    again = w.client.get(
        f"/collab/consultations/{consult}/imaging/{share['id']}/instances/{seen['instances'][0]['id']}",
        headers=w.h(w.receiver),
    )
    assert _read(again.content).SOPInstanceUID == copies[0][1].SOPInstanceUID

    # The doctor, inside the care relationship, gets the original through the same route.
    mine = w.client.get(
        f"/collab/consultations/{consult}/imaging/{share['id']}/instances/{seen['instances'][0]['id']}",
        headers=w.h(w.doctor),
    )
    assert mine.headers["x-deidentified"] == "false"
    assert _read(mine.content).PatientID == "98890234"

    # The consultant still cannot reach the study directly.
    assert (
        w.client.get(f"/imaging/studies/{study['id']}", headers=w.h(w.receiver)).status_code == 404
    )
    history = [t for t, _o, _r in _events(w.runtime, w.patient_id, "imaging:")]
    assert "imaging:study:shared" in history
    assert history.count("imaging:instance:deidentified-download") == 4


def test_burned_in_images_are_withheld_until_released(w: CollabWorld) -> None:
    consult = _consultation_with_outsider(w)
    study = _upload(w, w.doctor, [ULTRASOUND]).json()["study"]
    [instance] = study["instances"]
    assert instance["burned_in_risk"] is True
    assert any("US" in reason for reason in instance["burned_in_reasons"])
    share = w.client.post(
        f"/imaging/studies/{study['id']}/shares",
        json={"consultation": consult},
        headers=w.h(w.doctor),
    ).json()
    url = f"/collab/consultations/{consult}/imaging/{share['id']}/instances/{instance['id']}"
    [seen] = w.client.get(
        f"/collab/consultations/{consult}/imaging", headers=w.h(w.receiver)
    ).json()
    assert seen["instances"][0]["withheld"] is True
    withheld = w.client.get(url, headers=w.h(w.receiver))
    assert withheld.status_code == 403
    assert withheld.json()["error"] == "burned_in_withheld"
    assert ("imaging:instance:deidentified-download", "4") in [
        (t, o) for t, o, _ in _events(w.runtime, w.patient_id, "imaging:")
    ]
    # The sharer reviews the image and releases it; the copy then goes out de-identified.
    released = w.client.post(
        f"/imaging/studies/{study['id']}/shares",
        json={"consultation": consult, "release_flagged": True},
        headers=w.h(w.doctor),
    )
    assert released.json()["release_flagged"] is True
    got = w.client.get(url, headers=w.h(w.receiver))
    assert got.status_code == 200
    assert got.headers["x-burned-in-annotation-risk"] == "true"
    assert _read(got.content).PatientIdentityRemoved == "YES"


def test_sharing_needs_a_participant_and_the_same_patient(w: CollabWorld) -> None:
    consult = _consultation_with_outsider(w)
    study = _upload(w, w.doctor, [CT]).json()["study"]
    # Someone outside the thread cannot share into it, nor list or fetch from it.
    outsider = w.client.post(
        f"/imaging/studies/{study['id']}/shares",
        json={"consultation": consult},
        headers=w.h(w.colleague),
    )
    assert outsider.status_code == 404
    assert (
        w.client.get(
            f"/collab/consultations/{consult}/imaging", headers=w.h(w.colleague)
        ).status_code
        == 404
    )
    # A study of another patient cannot go into this patient's thread.
    other = w.create(w.doctor, {"resourceType": "Patient", "name": [{"family": "Other"}]})
    other_study = _upload(w, w.doctor, [SECONDARY_CAPTURE], patient=other).json()["study"]
    mixed = w.client.post(
        f"/imaging/studies/{other_study['id']}/shares",
        json={"consultation": consult},
        headers=w.h(w.doctor),
    )
    assert mixed.status_code == 400
    share = w.client.post(
        f"/imaging/studies/{study['id']}/shares",
        json={"consultation": consult},
        headers=w.h(w.doctor),
    ).json()
    # Another share's id, a made-up id or an instance of another study: not found.
    other_instance = other_study["instances"][0]["id"]
    base = f"/collab/consultations/{consult}/imaging"
    assert (
        w.client.get(
            f"{base}/{share['id']}/instances/{other_instance}", headers=w.h(w.receiver)
        ).status_code
        == 404
    )
    assert (
        w.client.get(
            f"{base}/{other_instance}/instances/{other_instance}", headers=w.h(w.receiver)
        ).status_code
        == 404
    )
    assert w.client.get(f"{base}/x/instances/y", headers=w.h(w.receiver)).status_code == 404
    with w.runtime.database.unit_of_work() as session:
        assert session.scalar(select(func.count()).select_from(ImagingShareRecord)) == 1


def test_tampered_images_fail_closed_and_shredding_erases_them(w: CollabWorld) -> None:
    study = _upload(w, w.doctor, MR_SERIES[:2]).json()["study"]
    first, second = (i["id"] for i in study["instances"])
    with w.runtime.database.unit_of_work() as session:
        a, b = (session.get(ImagingInstanceRecord, uuid.UUID(i)) for i in (first, second))
        assert a is not None
        assert b is not None
        a_blob, b_blob = a.content_enc, b.content_enc
        session.execute(
            update(ImagingInstanceRecord)
            .where(ImagingInstanceRecord.id == a.id)
            .values(content_enc=b_blob)
        )
        session.execute(
            update(ImagingInstanceRecord)
            .where(ImagingInstanceRecord.id == b.id)
            .values(content_enc=a_blob)
        )
    swapped = w.client.get(
        f"/imaging/studies/{study['id']}/instances/{first}", headers=_auth(w, w.doctor)
    )
    assert swapped.status_code == 500
    assert swapped.json()["error"] == "integrity_error"
    assert b"DICM" not in swapped.content
    assert ("fhir:resource:integrity-failure", "12") in [
        (t, o) for t, o, _ in _events(w.runtime, w.patient_id, "fhir:resource:integrity")
    ]

    with w.runtime.database.unit_of_work() as session:
        w.runtime.key_service(session).shred("patient", w.patient_id)
    erased = w.client.get(
        f"/imaging/studies/{study['id']}/instances/{second}", headers=_auth(w, w.doctor)
    )
    assert erased.status_code == 410
    assert b"DICM" not in erased.content


def test_the_patient_sees_imaging_access_in_their_history(w: CollabWorld) -> None:
    study = _upload(w, w.doctor, [CT]).json()["study"]
    instance = study["instances"][0]["id"]
    w.client.get(f"/imaging/studies/{study['id']}/instances/{instance}", headers=_auth(w, w.doctor))
    history = w.client.get("/me/access-history", headers=w.h(w.patient))
    assert history.status_code == 200, history.text
    seen = {(e["action"], tuple(e["resource_types"])) for e in history.json()["entries"]}
    assert ("uploaded", ("ImagingStudy",)) in seen
    assert ("downloaded", ("ImagingStudy",)) in seen
    assert audit_types(w.runtime, w.patient_id, "imaging:")[-1] == "imaging:instance:downloaded"
