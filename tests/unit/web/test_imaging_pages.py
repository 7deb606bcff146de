"""The imaging pages: DICOM upload from the chart, the study page and its downloads, sharing into
a consultation, and what a participant outside the care relationship receives (de-identified
copies, burned-in images withheld), with a TestClient on a real database and real crypto.

The images are pydicom's bundled test files, as in ``tests/integration/imaging``.
"""

from __future__ import annotations

import io
import re
import secrets
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from medcollab.config import Settings
from medcollab.identity.models import Organization
from medcollab.imaging.models import ImagingInstanceRecord, ImagingShareRecord, ImagingStudyRecord
from medcollab.runtime import Runtime
from tests.support.factories import Account, fhir_headers, patient_resource, sign_in
from tests.unit.web.conftest import WebWorld, web_sign_in

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
MR_SERIES = sorted((TEST_FILES / "dicomdirtests" / "98892003" / "MR700").iterdir())
ULTRASOUND = TEST_FILES / "ExplVR_BigEnd.dcm"
#: Small enough that an oversized file still passes the transport's body limit (1 MiB) and is
#: refused by the imaging service itself.
UPLOAD_LIMIT = 128 * 1024
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
_STUDY_URL = re.compile(r"/clinic/imaging/([0-9a-f-]{36})")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        mode="dev",
        secret_key=secrets.token_urlsafe(32),
        data_dir=tmp_path,
        audit_integrate_seconds=0,
        max_upload_bytes=UPLOAD_LIMIT,
    )


def _signed_in(world: WebWorld, account: Account) -> tuple[TestClient, str]:
    client = world.browser()
    return client, web_sign_in(client, account, world.clock)


def _upload(
    client: TestClient, token: str | None, patient_id: str, files: list[tuple[str, bytes]]
) -> Any:
    return client.post(
        f"/clinic/patients/{patient_id}/imaging",
        data={"csrf_token": token} if token else {},
        files=[("file", (name, content, "application/octet-stream")) for name, content in files],
        follow_redirects=False,
    )


def _files(paths: list[Path]) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in paths]


def _stored(runtime: Runtime) -> tuple[int, int]:
    with runtime.database.unit_of_work() as session:
        studies = session.scalar(select(func.count()).select_from(ImagingStudyRecord))
        instances = session.scalar(select(func.count()).select_from(ImagingInstanceRecord))
    return int(studies or 0), int(instances or 0)


def _uploaded_study(client: TestClient, token: str, patient_id: str, paths: list[Path]) -> str:
    answer = _upload(client, token, patient_id, _files(paths))
    assert answer.status_code == 303, answer.text
    match = _STUDY_URL.match(answer.headers["location"])
    assert match is not None, answer.headers["location"]
    return match.group(1)


def _links(html: str, prefix: str) -> list[str]:
    return re.findall(rf'href="({re.escape(prefix)}[^"]+)"', html)


def _read(content: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(content))


def test_upload_from_the_chart_shows_the_study_and_downloads_the_exact_files(
    web_world: WebWorld,
) -> None:
    doctor, token = _signed_in(web_world, web_world.doctor)
    chart = f"/clinic/patients/{web_world.patient_id}"
    before = doctor.get(chart)
    assert before.status_code == 200
    assert "Wei Zhang" in before.text  # The chart's own content is still there.
    assert "No imaging studies are stored." in before.text
    assert f'action="{chart}/imaging"' in before.text
    assert 'enctype="multipart/form-data"' in before.text
    assert (
        '<input id="imaging-files" name="file" type="file" multiple required '
        'accept=".dcm,application/dicom"'
    ) in before.text
    assert '<label for="imaging-files">' in before.text

    answer = _upload(doctor, token, web_world.patient_id, _files(MR_SERIES))
    assert answer.status_code == 303, answer.text
    location = answer.headers["location"]
    study_id = _STUDY_URL.match(location)
    assert study_id is not None
    # The DICOM PatientID (98890234) is none of the record's identifiers.
    assert location.endswith("?stored=7&unchanged=0&match=mismatch&flagged=0")
    assert _stored(web_world.runtime) == (1, 7)

    page = doctor.get(location)
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert 'id="patient-mismatch"' in page.text
    assert 'role="alert"' in page.text.split('id="patient-mismatch"', 1)[0][-80:]
    assert "Patient mismatch: check these images" in page.text
    assert "New images stored: 7. Already stored and unchanged: 0." in page.text
    table = page.text.split('id="instance-list"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr data-instance=") == 7
    assert '<th scope="col">Burned-in text</th>' in page.text
    assert "May show burned-in text" not in table
    assert ">MR<" in table

    # The chart now lists the study with a link to its page.
    listed = doctor.get(chart).text
    row = listed.split('id="imaging-studies"', 1)[1].split("</table>", 1)[0]
    assert f'href="/clinic/imaging/{study_id.group(1)}?patient={web_world.patient_id}"' in row
    assert "<td>MR</td>" in row

    # Every download is one of the uploaded files, byte for byte, under a neutral name.
    links = _links(page.text, f"/clinic/imaging/{study_id.group(1)}/instances/")
    assert len(links) == 7
    originals = {p.read_bytes() for p in MR_SERIES}
    downloaded = set()
    for link in links:
        got = doctor.get(link)
        assert got.status_code == 200, got.text
        assert got.headers["content-type"] == "application/dicom"
        instance_id = link.rsplit("/", 1)[1].split("?", 1)[0]
        assert got.headers["content-disposition"] == (
            f'attachment; filename="instance-{instance_id}.dcm"'
        )
        downloaded.add(got.content)
    assert downloaded == originals

    # The same files again are recognised as already stored.
    again = _upload(doctor, token, web_world.patient_id, _files(MR_SERIES))
    assert again.status_code == 303
    assert again.headers["location"].endswith("?stored=0&unchanged=7&match=mismatch&flagged=0")
    assert _stored(web_world.runtime) == (1, 7)

    # The page is translated like every other.
    chinese = doctor.get(location, headers={"Accept-Language": "zh-CN"})
    assert chinese.status_code == 200
    assert "Patient mismatch: check these images" not in chinese.text
    assert 'id="patient-mismatch"' in chinese.text


def test_a_burned_in_upload_is_flagged(web_world: WebWorld) -> None:
    doctor, token = _signed_in(web_world, web_world.doctor)
    answer = _upload(doctor, token, web_world.patient_id, _files([ULTRASOUND]))
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"].endswith("&flagged=1")
    page = doctor.get(answer.headers["location"])
    assert 'id="burned-in-warning"' in page.text
    [row] = re.findall(r'<tr data-instance="[^"]+" class="flagged">(.*?)</tr>', page.text, re.S)
    assert "May show burned-in text" in row
    assert "US" in row  # The reason names the modality.


def test_bad_uploads_get_clear_error_pages_and_store_nothing(web_world: WebWorld) -> None:
    doctor, token = _signed_in(web_world, web_world.doctor)
    patient = web_world.patient_id

    pdf = _upload(doctor, token, patient, [("scan.dcm", PDF)])
    assert pdf.status_code == 415, pdf.text
    assert pdf.headers["content-type"].startswith("text/html")
    assert "A file is not DICOM." in pdf.text

    damaged = _upload(doctor, token, patient, [("cut.dcm", MR_SERIES[0].read_bytes()[:400])])
    assert damaged.status_code == 400, damaged.text
    assert "damaged or incomplete DICOM" in damaged.text

    large = b"\0" * 128 + b"DICM" + b"\0" * (UPLOAD_LIMIT + 1)
    too_large = _upload(doctor, token, patient, [("big.dcm", large)])
    assert too_large.status_code == 413, too_large.text
    assert "larger than the server accepts" in too_large.text

    # One good file and one PDF: the whole upload is refused.
    mixed = _upload(doctor, token, patient, [*_files(MR_SERIES[:1]), ("x.dcm", PDF)])
    assert mixed.status_code == 415

    empty = _upload(doctor, token, patient, [("empty.dcm", b"")])
    assert empty.status_code == 400
    assert "Choose the DICOM files to upload." in empty.text
    assert _stored(web_world.runtime) == (0, 0)

    # Without the session's CSRF token nothing is even looked at.
    forged = _upload(doctor, None, patient, _files(MR_SERIES))
    assert forged.status_code == 403
    assert "did not come from this site" in forged.text
    assert _stored(web_world.runtime) == (0, 0)

    # A study already filed for another patient is refused for this one.
    other = web_world.api.post(
        "/fhir/R4/Patient",
        json=patient_resource(family="Li", given="Na", identifier="98890234"),
        headers=fhir_headers(web_world.doctor_token),
    )
    assert other.status_code == 201, other.text
    _uploaded_study(doctor, token, other.json()["id"], MR_SERIES)
    conflict = _upload(doctor, token, patient, _files(MR_SERIES))
    assert conflict.status_code == 409, conflict.text
    assert "already stored" in conflict.text
    assert _stored(web_world.runtime) == (1, 7)


def test_the_matching_patient_gets_no_mismatch_warning(web_world: WebWorld) -> None:
    doctor, token = _signed_in(web_world, web_world.doctor)
    other = web_world.api.post(
        "/fhir/R4/Patient",
        json=patient_resource(family="Li", given="Na", identifier="98890234"),
        headers=fhir_headers(web_world.doctor_token),
    )
    assert other.status_code == 201, other.text
    answer = _upload(doctor, token, other.json()["id"], _files(MR_SERIES))
    assert answer.headers["location"].endswith("&match=matched&flagged=0")
    page = doctor.get(answer.headers["location"])
    assert 'id="patient-mismatch"' not in page.text
    assert "The PatientID in the files matches this patient" in page.text


def test_another_organisation_without_access_sees_nothing(web_world: WebWorld) -> None:
    doctor, token = _signed_in(web_world, web_world.doctor)
    study_id = _uploaded_study(doctor, token, web_world.patient_id, MR_SERIES)
    page = doctor.get(f"/clinic/imaging/{study_id}")
    [link, *_rest] = _links(page.text, f"/clinic/imaging/{study_id}/instances/")

    stranger, stranger_token = _signed_in(web_world, web_world.outsider)
    refused = stranger.get(f"/clinic/imaging/{study_id}")
    assert refused.status_code == 404
    assert "There is nothing here, or you may not see it." in refused.text
    assert "instance-list" not in refused.text
    download = stranger.get(link)
    assert download.status_code == 404
    assert download.headers["content-type"].startswith("text/html")
    assert b"DICM" not in download.content
    upload = _upload(stranger, stranger_token, web_world.patient_id, _files([ULTRASOUND]))
    assert upload.status_code == 404
    assert _stored(web_world.runtime) == (1, 7)
    # A patient is not a clinician.
    patient, _ = _signed_in(web_world, web_world.patient)
    assert patient.get(f"/clinic/imaging/{study_id}").status_code == 403


def _consultation_with_outsider(
    world: WebWorld, doctor: TestClient, token: str, outsider: TestClient, outsider_token: str
) -> str:
    """A consultation opened by H1's doctor through the pages, joined by H2's clinician on the
    patient's consent (set up through the API, as in tests/integration/imaging)."""
    with world.runtime.database.unit_of_work() as session:
        h2 = session.scalar(select(Organization.id).where(Organization.code == "H2"))
    patient_token = sign_in(world.api, world.patient, world.clock)
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
        "patient": {"reference": f"Patient/{world.patient_id}"},
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {"coding": [{"code": "IRCP"}]},
                    "reference": {"reference": f"Organization/{h2}"},
                }
            ],
        },
    }
    made = world.api.post("/fhir/R4/Consent", json=consent, headers=fhir_headers(patient_token))
    assert made.status_code == 201, made.text
    created = doctor.post(
        "/clinic/consultations",
        data={"patient": world.patient_id, "topic": "MR review", "csrf_token": token},
        follow_redirects=False,
    )
    assert created.status_code == 303, created.text
    consult_id = created.headers["location"].rsplit("/", 1)[1]
    invited = doctor.post(
        f"/clinic/consultations/{consult_id}/invitations",
        data={"username": "dr.two", "org": "H2", "days": "7", "csrf_token": token},
        follow_redirects=False,
    )
    assert invited.status_code == 303, invited.text
    listing = outsider.get("/clinic/consultations")
    accept = re.search(
        rf'action="(/clinic/consultations/{consult_id}/invitations/[0-9a-f-]+/accept)"',
        listing.text,
    )
    assert accept is not None, listing.text
    accepted = outsider.post(
        accept.group(1), data={"csrf_token": outsider_token}, follow_redirects=False
    )
    assert accepted.status_code == 303, accepted.text
    return consult_id


def _share(doctor: TestClient, token: str, study_id: str, consult_id: str, **extra: str) -> None:
    shared = doctor.post(
        f"/clinic/imaging/{study_id}/shares",
        data={"consultation": consult_id, "csrf_token": token, **extra},
        follow_redirects=False,
    )
    assert shared.status_code == 303, shared.text
    assert shared.headers["location"] == f"/clinic/consultations/{consult_id}#imaging"


def _share_section(html: str, share_count: int) -> list[str]:
    section = html.split('<section aria-labelledby="h-imaging" id="imaging">', 1)[1]
    section = section.split("</section>", 1)[0]
    articles = re.findall(r'<article class="shared-study"(.*?)</article>', section, re.S)
    assert len(articles) == share_count, section
    # Most images first: shares made at the same (frozen) time have no fixed order.
    return sorted(articles, key=lambda a: -a.count("<tr data-instance="))


def test_shared_imaging_is_deidentified_and_withheld_outside_the_care_team(
    web_world: WebWorld,
) -> None:
    doctor, token = _signed_in(web_world, web_world.doctor)
    outsider, outsider_token = _signed_in(web_world, web_world.outsider)
    consult_id = _consultation_with_outsider(web_world, doctor, token, outsider, outsider_token)
    mr = _uploaded_study(doctor, token, web_world.patient_id, MR_SERIES)
    us = _uploaded_study(doctor, token, web_world.patient_id, [ULTRASOUND])

    # The study page offers the open consultation about the patient, and explains the release.
    page = doctor.get(f"/clinic/imaging/{us}")
    assert f'<option value="{consult_id}">MR review' in page.text
    assert '<label for="share-release">Release images flagged for burned-in text</label>' in (
        page.text
    )
    assert "Text burned into the pixels" in page.text
    refused = doctor.post(
        f"/clinic/imaging/{us}/shares", data={"consultation": "", "csrf_token": token}
    )
    assert refused.status_code == 400
    assert "Choose a consultation to share the study into." in refused.text
    forged = doctor.post(f"/clinic/imaging/{us}/shares", data={"consultation": consult_id})
    assert forged.status_code == 403
    _share(doctor, token, mr, consult_id)
    _share(doctor, token, us, consult_id)
    with web_world.runtime.database.unit_of_work() as session:
        assert session.scalar(select(func.count()).select_from(ImagingShareRecord)) == 2

    # The sharer, inside the care relationship, gets originals of everything.
    mine = doctor.get(f"/clinic/consultations/{consult_id}")
    assert mine.status_code == 200
    assert "Shared imaging" in mine.text
    assert "MR review" in mine.text  # The thread's own content is still there.
    for article in _share_section(mine.text, 2):
        assert 'data-copies="original"' in article
        assert "Organisation H1" in article
        assert 'class="withheld"' not in article
    own_links = _links(mine.text, f"/clinic/consultations/{consult_id}/imaging/")
    assert len(own_links) == 8
    originals = {p.read_bytes() for p in [*MR_SERIES, ULTRASOUND]}
    got = doctor.get(own_links[0])
    assert got.status_code == 200
    assert got.headers["x-deidentified"] == "false"
    assert got.content in originals

    # The consultant outside the care relationship: de-identified copies, ultrasound withheld.
    theirs = outsider.get(f"/clinic/consultations/{consult_id}")
    assert theirs.status_code == 200
    mr_article, us_article = _share_section(theirs.text, 2)
    assert 'data-copies="deidentified"' in mr_article
    assert 'data-copies="deidentified"' in us_article
    mr_links = _links(mr_article, f"/clinic/consultations/{consult_id}/imaging/")
    assert len(mr_links) == 7
    assert 'class="withheld"' in us_article
    assert "Withheld: may show identifying text burned into the image" in us_article
    assert _links(us_article, f"/clinic/consultations/{consult_id}/imaging/") == []
    copy = outsider.get(mr_links[0])
    assert copy.status_code == 200, copy.text
    assert copy.headers["content-type"] == "application/dicom"
    assert copy.headers["x-deidentified"] == "true"
    assert 'filename="deidentified-' in copy.headers["content-disposition"]
    dataset = _read(copy.content)
    assert dataset.PatientIdentityRemoved == "YES"
    assert dataset.get("PatientID", "") != "98890234"
    assert copy.content not in originals
    # The withheld image's address, typed in, is refused with an explanation.
    withheld = re.search(r'<tr data-instance="([^"]+)" class="withheld">', us_article)
    share_id = re.search(r'data-share="([^"]+)"', us_article)
    assert withheld is not None
    assert share_id is not None
    direct = outsider.get(
        f"/clinic/consultations/{consult_id}/imaging/{share_id.group(1)}"
        f"/instances/{withheld.group(1)}"
    )
    assert direct.status_code == 403
    assert direct.headers["content-type"].startswith("text/html")
    assert "burned into its pixels" in direct.text
    # The consultant still cannot open the study itself.
    assert outsider.get(f"/clinic/imaging/{mr}").status_code == 404
    # Nor share it anywhere.
    assert (
        outsider.post(
            f"/clinic/imaging/{mr}/shares",
            data={"consultation": consult_id, "csrf_token": outsider_token},
        ).status_code
        == 404
    )

    # Released after review: the ultrasound now goes out de-identified too.
    _share(doctor, token, us, consult_id, release_flagged="on")
    released = outsider.get(f"/clinic/consultations/{consult_id}").text
    _mr, us_article = _share_section(released, 2)
    assert "released the images flagged for burned-in text" in us_article
    [link] = _links(us_article, f"/clinic/consultations/{consult_id}/imaging/")
    copy = outsider.get(link)
    assert copy.status_code == 200, copy.text
    assert _read(copy.content).PatientIdentityRemoved == "YES"


def test_break_glass_opens_the_imaging_of_the_chart_read_only(web_world: WebWorld) -> None:
    doctor, token = _signed_in(web_world, web_world.doctor)
    study_id = _uploaded_study(doctor, token, web_world.patient_id, MR_SERIES[:2])
    stranger, stranger_token = _signed_in(web_world, web_world.outsider)
    study_page = f"/clinic/imaging/{study_id}?patient={web_world.patient_id}"
    assert stranger.get(study_page).status_code == 404
    chart = f"/clinic/patients/{web_world.patient_id}"
    opened = stranger.post(
        chart + "/break-glass",
        data={
            "reason": "Unconscious in the emergency department, need the MR",
            "csrf_token": stranger_token,
        },
    )
    assert opened.status_code == 200
    # The chart links the study with the patient, so the emergency grant applies to it.
    assert study_page in opened.text.replace("&amp;", "&")
    page = stranger.get(study_page)
    assert page.status_code == 200
    [link, *_rest] = _links(page.text, f"/clinic/imaging/{study_id}/instances/")
    download = stranger.get(link.replace("&amp;", "&"))
    assert download.status_code == 200
    assert download.content in {p.read_bytes() for p in MR_SERIES[:2]}
    # Without the patient (no grant applies) the study stays invisible, and break-glass never
    # writes.
    assert stranger.get(f"/clinic/imaging/{study_id}").status_code == 404
    assert (
        _upload(stranger, stranger_token, web_world.patient_id, _files([ULTRASOUND])).status_code
        == 404
    )
    assert _stored(web_world.runtime) == (1, 2)
