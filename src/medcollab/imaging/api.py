"""The imaging API: DICOM upload, study metadata, downloads and consultation shares.

Routes build the request's access context and records repository exactly like the FHIR API
(``X-Organization``, ``X-Purpose-Of-Use``, MFA for staff) and hand them to
:class:`~medcollab.imaging.services.ImagingService`, which decides through the repository, seals
and audits.

``POST /imaging/studies?patient={id}``
    Store DICOM instances of one study: either the body is one file (``Content-Type:
    application/dicom``) or ``multipart/form-data`` with one or more ``file`` fields. The type is
    judged from the content. 201 with the study's metadata when instances were stored, 200 when
    every file was already stored.
``GET /imaging/studies?patient={id}``
    The patient's ImagingStudy resources the caller may see.
``GET /imaging/studies/{study}``
    The ImagingStudy and its instances' metadata (UIDs, modality, frames, burned-in flags).
``GET /imaging/studies/{study}/instances/{instance}``
    The original DICOM file (``application/dicom``).
``POST /imaging/studies/{study}/shares``
    Share the study into a consultation about the same patient (``{"consultation": id,
    "release_flagged": false}``).
``GET /collab/consultations/{consultation}/imaging``
    The studies shared into the thread, with what the caller will receive.
``GET /collab/consultations/{consultation}/imaging/{share}/instances/{instance}``
    A shared instance: the original for a participant inside the care relationship, else a copy
    de-identified per DICOM PS3.15 (``X-Deidentified: true``).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Final

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict

from medcollab.api.deps import RuntimeDep, require_json
from medcollab.api.uploads import parse_multipart
from medcollab.errors import InvalidInput, UnsupportedMediaType
from medcollab.imaging.services import (
    MAX_FILES_PER_UPLOAD,
    DicomFile,
    ImagingService,
    ShareView,
    StudyView,
    UploadView,
)
from medcollab.records.api import RecordRepo

router = APIRouter(tags=["imaging"])
_PATIENT_ID: Final = r"^[A-Za-z0-9\-.]{1,64}$"


def imaging_service(repo: RecordRepo, runtime: RuntimeDep) -> ImagingService:
    return ImagingService(
        repo=repo, runtime=runtime, max_instance_bytes=runtime.settings.max_upload_bytes
    )


Imaging = Annotated[ImagingService, Depends(imaging_service)]


async def dicom_files(request: Request) -> list[tuple[str, bytes]]:
    """The uploaded files: one ``application/dicom`` body, or the ``file`` fields of a form."""
    header = request.headers.get("content-type", "")
    kind = header.split(";", 1)[0].strip().lower()
    body = await request.body()
    if kind == "application/dicom":
        return [("", body)]
    if kind == "multipart/form-data":
        uploads = parse_multipart(header, body, field="file", max_files=MAX_FILES_PER_UPLOAD)
        if not uploads:
            raise InvalidInput("the form has no field named 'file'")
        return [(u.filename, u.content) for u in uploads]
    raise UnsupportedMediaType(
        "send DICOM as application/dicom (one file) or multipart/form-data ('file' fields)"
    )


def _dicom_response(file: DicomFile) -> Response:
    # A neutral download name: UIDs and patient names stay out of browser histories.
    prefix = "deidentified-" if file.deidentified else "instance-"
    return Response(
        file.content,
        media_type="application/dicom",
        headers={
            "Content-Disposition": f'attachment; filename="{prefix}{file.instance_id}.dcm"',
            "X-Deidentified": str(file.deidentified).lower(),
            "X-Burned-In-Annotation-Risk": str(file.burned_in_risk).lower(),
        },
    )


@router.post("/imaging/studies", status_code=201)
def upload(
    patient: Annotated[str, Query(pattern=_PATIENT_ID)],
    files: Annotated[list[tuple[str, bytes]], Depends(dicom_files)],
    service: Imaging,
    response: Response,
) -> UploadView:
    result = service.upload(patient, files)
    if not result.stored:
        response.status_code = 200
    return result


@router.get("/imaging/studies")
def list_studies(
    patient: Annotated[str, Query(pattern=_PATIENT_ID)], service: Imaging
) -> list[dict[str, object]]:
    return service.studies(patient)


@router.get("/imaging/studies/{study_id}")
def read_study(study_id: str, service: Imaging) -> StudyView:
    return service.study(study_id)


@router.get("/imaging/studies/{study_id}/instances/{instance_id}")
def download_instance(study_id: str, instance_id: str, service: Imaging) -> Response:
    return _dicom_response(service.download(study_id, instance_id))


class ShareIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    consultation: uuid.UUID
    #: Release images flagged for burned-in text to participants outside the care team.
    release_flagged: bool = False


@router.post(
    "/imaging/studies/{study_id}/shares", status_code=201, dependencies=[Depends(require_json)]
)
def share_study(study_id: str, body: ShareIn, service: Imaging) -> ShareView:
    return service.share(study_id, str(body.consultation), release_flagged=body.release_flagged)


@router.get("/collab/consultations/{consult_id}/imaging")
def list_shares(consult_id: str, service: Imaging) -> list[ShareView]:
    return service.shares(consult_id)


@router.get("/collab/consultations/{consult_id}/imaging/{share_id}/instances/{instance_id}")
def download_shared(consult_id: str, share_id: str, instance_id: str, service: Imaging) -> Response:
    return _dicom_response(service.shared_file(consult_id, share_id, instance_id))
