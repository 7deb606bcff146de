"""The imaging pages: DICOM studies in the patient's chart, and studies shared into consultations.

Thin handlers over :class:`~medcollab.imaging.services.ImagingService`, built per request from the
records repository exactly as ``imaging.api`` builds it, so a page can do no more than the JSON API:
the policy decides every read and write, and every look is audited by the service. Nothing here
touches an imaging table.

Clinicians upload the DICOM files of one study from the chart (``POST
/clinic/patients/{patient}/imaging``, a ``multipart/form-data`` form with the session's CSRF token)
and land on the study's page (``/clinic/imaging/{study}``), which says what was stored, whether the
files' PatientID matches the record and which images may show burned-in text. From there they
download originals and share the study into one of their open consultations about the patient.
The consultation page lists what was shared (``shared_imaging``); a participant outside the care
relationship downloads de-identified copies, and images flagged for burned-in text are withheld
from them unless the sharer released them.

Downloads carry a neutral file name (``instance-<id>.dcm``, ``deidentified-<id>.dcm``): UIDs and
patient names stay out of browser histories and download folders.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse

from medcollab.api.deps import DbSession, RuntimeDep
from medcollab.collaboration.services import ConsultationService
from medcollab.deid.dicom import InvalidDicom
from medcollab.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from medcollab.identity.services import require
from medcollab.imaging.services import DicomFile, ImagingService, ShareView, WithheldInstance
from medcollab.kernel.context import Actor
from medcollab.kernel.permissions import Permission
from medcollab.records.api import access_context, record_repository
from medcollab.runtime import Runtime
from medcollab.web import summaries
from medcollab.web.deps import PageViewer, Viewer, WebFileLists, WebForm
from medcollab.web.errors import error_page, explained
from medcollab.web.i18n import N_
from medcollab.web.render import page, redirect
from medcollab.web.routes import COMMON, chart_purpose

router = APIRouter(include_in_schema=False)

_PATIENT_ID: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_PATIENT: Final = _PATIENT_ID.pattern

NOT_DICOM: Final = N_(
    "A file is not DICOM. Imaging takes DICOM files (.dcm) only, judged by their content; PDFs "
    "and photographs can be attached to a consultation instead. Nothing was stored."
)
DAMAGED: Final = N_(
    "A file is damaged or incomplete DICOM, or not a single image (a DICOMDIR, for example). "
    "Nothing was stored."
)
UPLOAD_INVALID: Final = N_(
    "The upload could not be stored: choose the DICOM files of one study, each file once. "
    "Nothing was stored."
)
TOO_LARGE: Final = N_("A DICOM file is larger than the server accepts. Nothing was stored.")
UPLOAD_CONFLICT: Final = N_(
    "These images conflict with images already stored: the study is filed for another patient, "
    "or an image with the same identifier has different content. Check that the images belong "
    "to this patient. Nothing was stored."
)
NO_FILES: Final = N_("Choose the DICOM files to upload.")
SHARE_INVALID: Final = N_("The study and the consultation are about different patients.")
SHARE_CLOSED: Final = N_("The consultation is closed and takes no new content.")
CHOOSE_CONSULTATION: Final = N_("Choose a consultation to share the study into.")
WITHHELD: Final = N_(
    "This image may show identifying text burned into its pixels. It is released outside the "
    "care team only if the clinician who shared it releases it."
)


def _page(
    request: Request, template: str, view: Viewer, *, status: int = 200, **values: Any
) -> HTMLResponse:
    return page(request, template, view, status=status, **COMMON, **values)


def _clinician(view: Viewer) -> Actor:
    require(view.actor, Permission.CLINICAL_RECORD_READ)
    return view.actor


def imaging_service(
    actor: Actor, db: DbSession, runtime: Runtime, *, patient_id: str | None = None
) -> ImagingService:
    """The imaging service of a page request, built like ``imaging.api`` builds it.

    With ``patient_id`` (the chart's links carry it), the purpose is the chart's: emergency
    treatment while the clinician holds a live break-glass grant for that patient. A wrong
    ``patient_id`` gains nothing: the grant must cover the patient the study belongs to.
    """
    purpose = chart_purpose(actor, db, runtime, patient_id)[0] if patient_id else None
    return ImagingService(
        repo=record_repository(access_context(actor, purpose_header=purpose), db, runtime),
        runtime=runtime,
        max_instance_bytes=runtime.settings.max_upload_bytes,
    )


def shared_imaging(
    actor: Actor, db: DbSession, runtime: Runtime, consult_id: str
) -> list[ShareView]:
    """The studies shared into a consultation, as the consultation page lists them."""
    return imaging_service(actor, db, runtime).shares(consult_id)


def _uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound(f"no such {what}") from None


def _dicom_response(file: DicomFile) -> Response:
    # A neutral download name, as the API gives: UIDs and patient names stay out of histories.
    prefix = "deidentified-" if file.deidentified else "instance-"
    return Response(
        file.content,
        media_type="application/dicom",
        headers={
            "Content-Disposition": f'attachment; filename="{prefix}{file.instance_id}.dcm"',
            "X-Content-Type-Options": "nosniff",
            "X-Deidentified": str(file.deidentified).lower(),
        },
    )


# Upload from the chart ---------------------------------------------------------------------------


@router.post("/clinic/patients/{patient_id}/imaging")
def upload(
    *,
    request: Request,
    patient_id: str,
    view: PageViewer,
    files: WebFileLists,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    actor = _clinician(view)
    if not _PATIENT_ID.match(patient_id):
        raise NotFound("no such patient")
    chosen = [(f.filename, f.content) for f in files.get("file", []) if f.content]
    if not chosen:
        # Nothing was read or written yet: the page says what is missing.
        return error_page(request, 400, explanation=NO_FILES)
    # The service checks every file and the policy decides the write before anything is stored;
    # a refusal propagates so the unit of work rolls back (keeping only its audit event).
    with explained(
        request,
        {
            # Subclasses before InvalidInput, their base.
            UnsupportedMediaType: NOT_DICOM,
            PayloadTooLarge: TOO_LARGE,
            InvalidDicom: DAMAGED,
            InvalidInput: UPLOAD_INVALID,
            Conflict: UPLOAD_CONFLICT,
        },
    ):
        result = imaging_service(actor, db, runtime).upload(patient_id, chosen)
    stored = set(result.stored)
    flagged = sum(1 for i in result.study.instances if i.id in stored and i.burned_in_risk)
    # Counts and the match verdict only: nothing about the patient goes into the address.
    location = (
        f"/clinic/imaging/{result.study.id}?stored={len(result.stored)}"
        f"&unchanged={len(result.unchanged)}&match={result.patient_match}&flagged={flagged}"
    )
    return redirect(location, request)


# The study page ----------------------------------------------------------------------------------


def _study_page(
    request: Request,
    view: Viewer,
    study_id: str,
    *,
    db: DbSession,
    runtime: Runtime,
    upload: dict[str, Any] | None = None,
    status: int = 200,
    error: str | None = None,
    patient: str | None = None,
) -> HTMLResponse:
    actor = _clinician(view)
    study = imaging_service(actor, db, runtime, patient_id=patient).study(
        _uuid(study_id, "imaging study")
    )
    consultations = [
        c
        for c in ConsultationService(
            repo=record_repository(access_context(actor), db, runtime), runtime=runtime
        ).list_mine()
        if c.patient_id == study.patient_id and c.status == "open"
    ]
    instances = sorted(
        study.instances,
        key=lambda i: (
            i.series_number if i.series_number is not None else 1 << 30,
            i.instance_number if i.instance_number is not None else 1 << 30,
        ),
    )
    return _page(
        request,
        "clinic_imaging_study.html",
        view,
        status=status,
        error=error,
        study=study,
        summary=summaries.study_row(study.imaging_study),
        instances=instances,
        flagged=sum(1 for i in instances if i.burned_in_risk),
        consultations=consultations,
        upload=upload,
    )


@router.get("/clinic/imaging/{study_id}")
def study_page(
    *,
    request: Request,
    study_id: str,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
    stored: Annotated[int | None, Query(ge=0, le=100_000)] = None,
    unchanged: Annotated[int, Query(ge=0, le=100_000)] = 0,
    match: Annotated[str, Query(pattern="^(matched|mismatch|unknown)$")] = "unknown",
    flagged: Annotated[int, Query(ge=0, le=100_000)] = 0,
    patient: Annotated[str | None, Query(pattern=_PATIENT)] = None,
) -> HTMLResponse:
    upload = None
    if stored is not None:
        upload = {"stored": stored, "unchanged": unchanged, "match": match, "flagged": flagged}
    return _study_page(
        request, view, study_id, db=db, runtime=runtime, upload=upload, patient=patient
    )


@router.get("/clinic/imaging/{study_id}/instances/{instance_id}")
def download(
    *,
    study_id: str,
    instance_id: str,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
    patient: Annotated[str | None, Query(pattern=_PATIENT)] = None,
) -> Response:
    actor = _clinician(view)
    file = imaging_service(actor, db, runtime, patient_id=patient).download(
        _uuid(study_id, "imaging study"), _uuid(instance_id, "instance")
    )
    return _dicom_response(file)


@router.post("/clinic/imaging/{study_id}/shares")
def share(
    *,
    request: Request,
    study_id: str,
    view: PageViewer,
    form: WebForm,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    actor = _clinician(view)
    key = _uuid(study_id, "imaging study")
    try:
        consult_id = str(uuid.UUID(form.get("consultation", "").strip()))
    except ValueError:
        return _study_page(
            request, view, key, db=db, runtime=runtime, status=400, error=CHOOSE_CONSULTATION
        )
    with explained(request, {InvalidInput: SHARE_INVALID, Conflict: SHARE_CLOSED}):
        imaging_service(actor, db, runtime).share(
            key, consult_id, release_flagged=form.get("release_flagged") == "on"
        )
    return redirect(f"/clinic/consultations/{consult_id}#imaging", request)


# Shared into a consultation ---------------------------------------------------------------------


@router.get("/clinic/consultations/{consult_id}/imaging/{share_id}/instances/{instance_id}")
def shared_download(
    *,
    request: Request,
    consult_id: str,
    share_id: str,
    instance_id: str,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    actor = _clinician(view)
    with explained(request, {WithheldInstance: WITHHELD}):
        file = imaging_service(actor, db, runtime).shared_file(
            _uuid(consult_id, "consultation"),
            _uuid(share_id, "shared study"),
            _uuid(instance_id, "instance"),
        )
    return _dicom_response(file)
