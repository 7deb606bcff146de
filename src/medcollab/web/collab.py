"""The collaboration pages: referrals, remote consultations and appointments.

Thin handlers over :mod:`medcollab.collaboration.services`, built per request from the records
repository exactly as ``collaboration.api`` builds them (``records.api.access_context``, the
organisation the account lists first), so a page can do no more than the JSON API and every read
is audited by the service. Nothing here touches a table with personal health information; the
only table read directly is the schedules of the clinician's own organisation (ids, organisation,
practitioner), which the services offer no listing for.

Patients (``/my/...``) see their referrals (and may revoke them), the consultations about them
(topic, status, organisations; never the messages) and their appointments (book a free slot,
cancel). Clinicians (``/clinic/...``) refer patients and answer incoming referrals, run
consultation threads (messages, attachments, invitations) and publish schedules with slots.

Forms follow ``web.routes``: the session's CSRF token in a hidden field (or HTMX's header), 303 to
the page showing the result, service errors as the translated error pages. Input the page can
check itself is checked here first, so a mistake gets a specific message beside the form.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from medcollab.api.deps import DbSession, RuntimeDep, Users
from medcollab.api.errors import status_for
from medcollab.collaboration.models import ScheduleRecord
from medcollab.collaboration.services import (
    DEFAULT_INVITATION_DAYS,
    MAX_ATTACHMENT_BYTES,
    MAX_INVITATION_DAYS,
    MAX_MESSAGE_LENGTH,
    MAX_NOTE_LENGTH,
    MAX_REASON_LENGTH,
    MAX_REFERRAL_DAYS,
    MAX_SCHEDULE_DAYS,
    MAX_SLOT_HOURS,
    MAX_TOPIC_LENGTH,
    AppointmentService,
    AttachmentTooLarge,
    ConsultationService,
    ReferralService,
    ReferralView,
    SlotUnavailable,
    UnsafeAttachment,
)
from medcollab.errors import InvalidInput, NotFound
from medcollab.identity.models import Organization
from medcollab.identity.services import require
from medcollab.kernel.context import Actor
from medcollab.kernel.permissions import Permission
from medcollab.records.api import access_context, record_repository
from medcollab.records.repository import RecordRepository
from medcollab.runtime import Runtime
from medcollab.web import patients
from medcollab.web.deps import PageViewer, Viewer, WebFiles, WebForm
from medcollab.web.errors import error_page
from medcollab.web.i18n import N_
from medcollab.web.imaging import shared_imaging
from medcollab.web.render import page, redirect
from medcollab.web.routes import COMMON

router = APIRouter(include_in_schema=False)

_ID: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ORG_CODE: Final = re.compile(r"^[A-Za-z0-9\-_.]{1,32}$")
_USERNAME: Final = re.compile(r"^[A-Za-z0-9\-_.@]{1,100}$")
MAX_SLOTS_AT_ONCE: Final = 50
#: The record parts a referral can be limited to (any FHIR R4 type is accepted by the service;
#: these are the ones a referral usually needs).
SCOPE_TYPES: Final = (
    "Observation",
    "Condition",
    "MedicationRequest",
    "MedicationStatement",
    "AllergyIntolerance",
    "Encounter",
    "DiagnosticReport",
    "DocumentReference",
    "Immunization",
    "Procedure",
    "CarePlan",
    "ImagingStudy",
)
STATUSES: Final = {
    "requested": N_("Requested"),
    "accepted": N_("Accepted"),
    "declined": N_("Declined"),
    "revoked": N_("Revoked"),
    "expired": N_("Expired"),
    "open": N_("Ongoing"),
    "closed": N_("Closed"),
    "archived": N_("Archived"),
    "pending": N_("Pending"),
    "booked": N_("Booked"),
    "cancelled": N_("Cancelled"),
    "free": N_("Free"),
    "busy": N_("Booked"),
}
PARTICIPANT_ROLES: Final = {"owner": N_("Owner"), "member": N_("Member")}
UPLOAD_REFUSED: Final = N_(
    "The file was refused. Only PDF, PNG, JPEG and DICOM files can be attached, the file's content "
    "must match its name, and PDFs must not contain scripts or embedded files."
)
UPLOAD_TOO_LARGE: Final = N_("The file is larger than attachments may be.")
SLOT_TAKEN: Final = N_("That time has just been booked by someone else. Please pick another.")


def _page(
    request: Request, template: str, view: Viewer, *, status: int = 200, **values: Any
) -> HTMLResponse:
    return page(
        request,
        template,
        view,
        status=status,
        **COMMON,
        statuses=STATUSES,
        participant_roles=PARTICIPANT_ROLES,
        **values,
    )


# Services, built like collaboration.api builds them -------------------------------------------


def _repository(actor: Actor, db: DbSession, runtime: Runtime) -> RecordRepository:
    return record_repository(access_context(actor), db, runtime)


def _referrals(actor: Actor, db: DbSession, runtime: Runtime) -> ReferralService:
    return ReferralService(repo=_repository(actor, db, runtime), runtime=runtime)


def _consultations(actor: Actor, db: DbSession, runtime: Runtime) -> ConsultationService:
    return ConsultationService(
        repo=_repository(actor, db, runtime),
        runtime=runtime,
        max_attachment_bytes=MAX_ATTACHMENT_BYTES,
    )


def _appointments(actor: Actor, db: DbSession, runtime: Runtime) -> AppointmentService:
    return AppointmentService(repo=_repository(actor, db, runtime), runtime=runtime)


def _patient(view: Viewer) -> Actor:
    require(view.actor, Permission.OWN_RECORD_READ)
    return view.actor


def _clinician(view: Viewer) -> Actor:
    require(view.actor, Permission.CLINICAL_RECORD_READ)
    return view.actor


def _org_names(db: DbSession) -> dict[str, str]:
    return {o.code: o.name for o in db.scalars(select(Organization).order_by(Organization.name))}


def _my_org(actor: Actor, db: DbSession) -> Organization | None:
    """The organisation the pages act for: the one ``access_context`` chooses."""
    org_id = access_context(actor).org_id
    return db.get(Organization, org_id) if org_id is not None else None


def _path_id(value: str, what: str = "no such item") -> str:
    if not _ID.match(value):
        raise NotFound(what)
    return value


def _whole_number(value: str, low: int, high: int) -> int | None:
    text = value.strip()
    if not text.isdigit() or len(text) > 6:
        return None
    number = int(text)
    return number if low <= number <= high else None


def _note(form: dict[str, str]) -> str | None:
    note = form.get("note", "")
    return note if note.strip() else None


# Patients: referrals ---------------------------------------------------------------------------


@router.get("/my/referrals")
def my_referrals(
    *, request: Request, view: PageViewer, db: DbSession, runtime: RuntimeDep, users: Users
) -> HTMLResponse:
    actor = _patient(view)
    service = _referrals(actor, db, runtime)
    # The list, then each referral's reason from its ServiceRequest: every read is audited.
    referrals = [service.get(r.id) for r in service.list_mine(limit=50)]
    return _page(
        request,
        "my_referrals.html",
        view,
        referrals=referrals,
        org_names=_org_names(db),
        several=len(patients.patients_of(users, actor)) > 1,
    )


@router.post("/my/referrals/{referral_id}/revoke")
def my_referral_revoke(
    *,
    request: Request,
    referral_id: str,
    view: PageViewer,
    form: WebForm,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    actor = _patient(view)
    note = _note(form)
    if note is not None and len(note) > MAX_NOTE_LENGTH:
        raise InvalidInput("the note is too long")
    _referrals(actor, db, runtime).revoke(_path_id(referral_id, "no such referral"), note)
    return redirect("/my/referrals", request)


# Patients: consultations and appointments ---------------------------------------------------------


@router.get("/my/consultations")
def my_consultations(
    *, request: Request, view: PageViewer, db: DbSession, runtime: RuntimeDep, users: Users
) -> HTMLResponse:
    actor = _patient(view)
    threads = _consultations(actor, db, runtime).list_for_patient()
    return _page(
        request,
        "my_consultations.html",
        view,
        threads=threads,
        org_names=_org_names(db),
        several=len(patients.patients_of(users, actor)) > 1,
    )


def _my_appointments_page(
    request: Request,
    view: Viewer,
    *,
    db: DbSession,
    runtime: Runtime,
    users: Users,
    org: str = "",
    status: int = 200,
    error: str | None = None,
) -> HTMLResponse:
    actor = _patient(view)
    service = _appointments(actor, db, runtime)
    appointments = service.list_mine()
    names = _org_names(db)
    slots = []
    chosen = org.strip().upper()
    if chosen:
        if chosen not in names:
            error = error or N_("Choose an organisation from the list.")
            status = 400 if status == 200 else status
            chosen = ""
        else:
            slots = service.free_slots(org=chosen)
    return _page(
        request,
        "my_appointments.html",
        view,
        status=status,
        error=error,
        appointments=appointments,
        slots=slots,
        chosen_org=chosen,
        org_names=names,
        booking_for=patients.patients_of(users, actor),
        now=runtime.clock.now(),
    )


@router.get("/my/appointments")
def my_appointments(
    *,
    request: Request,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
    users: Users,
    org: Annotated[str, Query(max_length=32)] = "",
) -> HTMLResponse:
    return _my_appointments_page(request, view, db=db, runtime=runtime, users=users, org=org)


@router.post("/my/appointments")
def my_appointment_book(
    *,
    request: Request,
    view: PageViewer,
    form: WebForm,
    db: DbSession,
    runtime: RuntimeDep,
    users: Users,
) -> Response:
    actor = _patient(view)
    slot_id = form.get("slot", "")
    org = form.get("org", "")
    if not _ID.match(slot_id):
        return _my_appointments_page(
            request,
            view,
            db=db,
            runtime=runtime,
            users=users,
            org=org,
            status=400,
            error=N_("Choose a time to book."),
        )
    patient_id = patients.chosen_patient(users, actor, form.get("patient") or None)
    try:
        _appointments(actor, db, runtime).book(slot_id, patient_id=patient_id)
    except SlotUnavailable:
        # The refusal is audited; the page shows the times still free.
        return _my_appointments_page(
            request,
            view,
            db=db,
            runtime=runtime,
            users=users,
            org=org,
            status=409,
            error=SLOT_TAKEN,
        )
    return redirect("/my/appointments", request)


@router.post("/my/appointments/{appointment_id}/cancel")
def my_appointment_cancel(
    *, request: Request, appointment_id: str, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> Response:
    actor = _patient(view)
    _appointments(actor, db, runtime).cancel(_path_id(appointment_id, "no such appointment"))
    return redirect("/my/appointments", request)


# Clinicians: referrals -------------------------------------------------------------------------


def _clinic_referrals_page(
    request: Request,
    view: Viewer,
    *,
    db: DbSession,
    runtime: Runtime,
    status: int = 200,
    error: str | None = None,
    form: dict[str, str] | None = None,
) -> HTMLResponse:
    actor = _clinician(view)
    referrals = _referrals(actor, db, runtime).list_mine()
    mine = _my_org(actor, db)
    code = mine.code if mine else ""
    names = _org_names(db)
    return _page(
        request,
        "clinic_referrals.html",
        view,
        status=status,
        error=error,
        form=form or {},
        incoming=[r for r in referrals if r.to_org == code],
        outgoing=[r for r in referrals if r.from_org == code],
        my_org=code,
        org_names=names,
        targets=[(c, n) for c, n in names.items() if c != code],
        scope_types=SCOPE_TYPES,
        max_days=MAX_REFERRAL_DAYS,
        max_reason=MAX_REASON_LENGTH,
        max_note=MAX_NOTE_LENGTH,
    )


@router.get("/clinic/referrals")
def clinic_referrals(
    *, request: Request, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> HTMLResponse:
    return _clinic_referrals_page(request, view, db=db, runtime=runtime)


def _referral_input(form: dict[str, str]) -> tuple[dict[str, Any], str | None]:
    """The create-referral form as the service's arguments, and the message for what is wrong
    (None when nothing is)."""
    patient_id = form.get("patient", "").strip()
    to_org = form.get("to_org", "").strip()
    practitioner = form.get("practitioner", "").strip()
    reason = form.get("reason", "")
    days = _whole_number(form.get("days", ""), 1, MAX_REFERRAL_DAYS)
    scope: list[str] | None = None
    if form.get("scope") == "chosen":
        scope = [t for t in SCOPE_TYPES if form.get(f"scope_{t}") == "on"]
    checks = (
        (bool(_ID.match(patient_id)), N_("A patient ID has only letters, digits, '-' and '.'.")),
        (bool(_ORG_CODE.match(to_org)), N_("Choose the organisation you refer to.")),
        (
            not practitioner or bool(_ID.match(practitioner)),
            N_("A practitioner ID has only letters, digits, '-' and '.'."),
        ),
        (
            bool(reason.strip()) and len(reason) <= MAX_REASON_LENGTH,
            N_("Give the reason for the referral (at most 2000 characters)."),
        ),
        (days is not None, N_("The referral lasts from 1 to 365 days.")),
        (
            scope is None or bool(scope),
            N_("Choose at least one kind of record to share, or share everything."),
        ),
    )
    problem = next((message for passed, message in checks if not passed), None)
    arguments = {
        "patient_id": patient_id,
        "to_org": to_org,
        "to_practitioner_id": practitioner or None,
        "reason": reason,
        "scope": scope,
        "days": days,
    }
    return arguments, problem


@router.post("/clinic/referrals")
def clinic_referral_create(
    *, request: Request, view: PageViewer, form: WebForm, db: DbSession, runtime: RuntimeDep
) -> Response:
    actor = _clinician(view)
    arguments, problem = _referral_input(form)
    if problem is not None:
        return _clinic_referrals_page(
            request, view, db=db, runtime=runtime, status=400, error=problem, form=form
        )
    created = _referrals(actor, db, runtime).create(**arguments)
    return redirect(f"/clinic/referrals/{created.id}", request)


@router.get("/clinic/referrals/{referral_id}")
def clinic_referral(
    *, request: Request, referral_id: str, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> HTMLResponse:
    actor = _clinician(view)
    referral = _referrals(actor, db, runtime).get(_path_id(referral_id, "no such referral"))
    mine = _my_org(actor, db)
    return _page(
        request,
        "clinic_referral.html",
        view,
        referral=referral,
        my_org=mine.code if mine else "",
        org_names=_org_names(db),
        max_note=MAX_NOTE_LENGTH,
    )


_REFERRAL_STEPS: Final = frozenset({"accept", "decline", "revoke"})


@router.post("/clinic/referrals/{referral_id}/{step}")
def clinic_referral_step(
    *,
    request: Request,
    referral_id: str,
    step: str,
    view: PageViewer,
    form: WebForm,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    """Accept, decline or revoke a referral; the service checks the caller's side and the state."""
    if step not in _REFERRAL_STEPS:
        raise NotFound("no such action")
    actor = _clinician(view)
    service = _referrals(actor, db, runtime)
    key = _path_id(referral_id, "no such referral")
    note = _note(form)
    if note is not None and len(note) > MAX_NOTE_LENGTH:
        raise InvalidInput("the note is too long")
    done: ReferralView
    if step == "accept":
        done = service.accept(key)
    elif step == "decline":
        done = service.decline(key, note)
    else:
        done = service.revoke(key, note)
    return redirect(f"/clinic/referrals/{done.id}", request)


# Clinicians: consultations -----------------------------------------------------------------------


def _clinic_consultations_page(
    request: Request,
    view: Viewer,
    *,
    db: DbSession,
    runtime: Runtime,
    archived: bool = False,
    status: int = 200,
    error: str | None = None,
    form: dict[str, str] | None = None,
) -> HTMLResponse:
    actor = _clinician(view)
    service = _consultations(actor, db, runtime)
    return _page(
        request,
        "clinic_consultations.html",
        view,
        status=status,
        error=error,
        form=form or {},
        threads=service.list_mine(include_archived=archived),
        invitations=service.my_invitations(),
        archived=archived,
        max_topic=MAX_TOPIC_LENGTH,
        now=runtime.clock.now(),
    )


@router.get("/clinic/consultations")
def clinic_consultations(
    *,
    request: Request,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
    archived: Annotated[bool, Query()] = False,
) -> HTMLResponse:
    return _clinic_consultations_page(request, view, db=db, runtime=runtime, archived=archived)


@router.post("/clinic/consultations")
def clinic_consultation_create(
    *, request: Request, view: PageViewer, form: WebForm, db: DbSession, runtime: RuntimeDep
) -> Response:
    actor = _clinician(view)
    patient_id = form.get("patient", "").strip()
    topic = form.get("topic", "")
    problem = None
    if not _ID.match(patient_id):
        problem = N_("A patient ID has only letters, digits, '-' and '.'.")
    elif not topic.strip() or len(topic) > MAX_TOPIC_LENGTH:
        problem = N_("Give the consultation a topic (at most 200 characters).")
    if problem is not None:
        return _clinic_consultations_page(
            request, view, db=db, runtime=runtime, status=400, error=problem, form=form
        )
    created = _consultations(actor, db, runtime).create(patient_id=patient_id, topic=topic)
    return redirect(f"/clinic/consultations/{created.id}", request)


def _thread_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound("no such consultation") from None


def _thread_page(
    request: Request,
    consult_id: str,
    view: Viewer,
    *,
    db: DbSession,
    runtime: Runtime,
    status: int = 200,
    error: str | None = None,
    form: dict[str, str] | None = None,
) -> HTMLResponse:
    actor = _clinician(view)
    service = _consultations(actor, db, runtime)
    key = _thread_id(consult_id)
    thread = service.get(key)
    mine = _my_org(actor, db)
    return _page(
        request,
        "clinic_consultation.html",
        view,
        status=status,
        error=error,
        form=form or {},
        thread=thread,
        messages=service.messages(key),
        attachments=service.attachments(key),
        imaging_shares=shared_imaging(actor, db, runtime, key),
        my_org=mine.code if mine else "",
        org_names=_org_names(db),
        max_message=MAX_MESSAGE_LENGTH,
        max_invitation_days=MAX_INVITATION_DAYS,
        default_invitation_days=DEFAULT_INVITATION_DAYS,
        max_megabytes=MAX_ATTACHMENT_BYTES // (1024 * 1024),
        now=runtime.clock.now(),
    )


@router.get("/clinic/consultations/{consult_id}")
def clinic_consultation(
    *, request: Request, consult_id: str, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> HTMLResponse:
    return _thread_page(request, consult_id, view, db=db, runtime=runtime)


@router.post("/clinic/consultations/{consult_id}/messages")
def clinic_consultation_post(
    *,
    request: Request,
    consult_id: str,
    view: PageViewer,
    form: WebForm,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    actor = _clinician(view)
    key = _thread_id(consult_id)
    text = form.get("text", "")
    if not text.strip() or len(text) > MAX_MESSAGE_LENGTH:
        return _thread_page(
            request,
            key,
            view,
            db=db,
            runtime=runtime,
            status=400,
            error=N_("Write a message (at most 20000 characters)."),
            form=form,
        )
    _consultations(actor, db, runtime).post_message(key, text)
    return redirect(f"/clinic/consultations/{key}#messages", request)


@router.post("/clinic/consultations/{consult_id}/attachments")
def clinic_consultation_upload(
    *,
    request: Request,
    consult_id: str,
    view: PageViewer,
    files: WebFiles,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    actor = _clinician(view)
    key = _thread_id(consult_id)
    upload = files.get("file")
    if upload is None or not upload.content:
        return _thread_page(
            request,
            key,
            view,
            db=db,
            runtime=runtime,
            status=400,
            error=N_("Choose a file to attach."),
        )
    try:
        _consultations(actor, db, runtime).add_attachment(
            key, filename=upload.filename, content=upload.content
        )
    except (UnsafeAttachment, AttachmentTooLarge, InvalidInput) as refused:
        # Nothing is stored before the content is judged, so the refusal ends the request cleanly.
        too_large = isinstance(refused, AttachmentTooLarge)
        return error_page(
            request,
            status_for(refused),
            explanation=UPLOAD_TOO_LARGE if too_large else UPLOAD_REFUSED,
        )
    return redirect(f"/clinic/consultations/{key}#attachments", request)


@router.get("/clinic/consultations/{consult_id}/attachments/{attachment_id}")
def clinic_consultation_download(
    *,
    consult_id: str,
    attachment_id: str,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    actor = _clinician(view)
    found, content = _consultations(actor, db, runtime).read_attachment(
        _thread_id(consult_id), _path_id(attachment_id, "no such attachment")
    )
    # A neutral file name, as the API gives: the original may name the patient.
    extension = {
        "application/pdf": ".pdf",
        "image/png": ".png",
        "image/jpeg": ".jpg",
        "application/dicom": ".dcm",
    }.get(found.media_type, "")
    return Response(
        content,
        media_type=found.media_type,
        headers={
            "Content-Disposition": f'attachment; filename="attachment-{found.id}{extension}"',
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.post("/clinic/consultations/{consult_id}/invitations")
def clinic_consultation_invite(
    *,
    request: Request,
    consult_id: str,
    view: PageViewer,
    form: WebForm,
    db: DbSession,
    runtime: RuntimeDep,
    users: Users,
) -> Response:
    actor = _clinician(view)
    key = _thread_id(consult_id)
    who = form.get("username", "").strip()
    org = form.get("org", "").strip()
    days = _whole_number(form.get("days", ""), 1, MAX_INVITATION_DAYS)
    problem = None
    invitee: uuid.UUID | None = None
    if not _USERNAME.match(who):
        problem = N_("Enter the username of the clinician you invite.")
    elif not _ORG_CODE.match(org):
        problem = N_("Choose the organisation the clinician takes part for.")
    elif days is None:
        problem = N_("An invitation is valid for 1 to 30 days.")
    else:
        try:
            invitee = users.user_by_username(who).id
        except (NotFound, InvalidInput):
            problem = N_("No clinician of that organisation has that username.")
    if problem is not None or invitee is None or days is None:
        return _thread_page(
            request, key, view, db=db, runtime=runtime, status=400, error=problem, form=form
        )
    _consultations(actor, db, runtime).invite(key, user_id=invitee, org=org, days=days)
    return redirect(f"/clinic/consultations/{key}#participants", request)


@router.post("/clinic/consultations/{consult_id}/invitations/{invitation_id}/accept")
def clinic_invitation_accept(
    *,
    request: Request,
    consult_id: str,
    invitation_id: str,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    actor = _clinician(view)
    key = _thread_id(consult_id)
    _consultations(actor, db, runtime).accept_invitation(
        key, _path_id(invitation_id, "no such invitation")
    )
    return redirect(f"/clinic/consultations/{key}", request)


@router.post("/clinic/consultations/{consult_id}/invitations/{invitation_id}/decline")
def clinic_invitation_decline(
    *,
    request: Request,
    consult_id: str,
    invitation_id: str,
    view: PageViewer,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    actor = _clinician(view)
    _consultations(actor, db, runtime).decline_invitation(
        _thread_id(consult_id), _path_id(invitation_id, "no such invitation")
    )
    return redirect("/clinic/consultations", request)


@router.post("/clinic/consultations/{consult_id}/close")
def clinic_consultation_close(
    *, request: Request, consult_id: str, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> Response:
    actor = _clinician(view)
    key = _thread_id(consult_id)
    _consultations(actor, db, runtime).close(key)
    return redirect(f"/clinic/consultations/{key}", request)


@router.post("/clinic/consultations/{consult_id}/archive")
def clinic_consultation_archive(
    *, request: Request, consult_id: str, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> Response:
    actor = _clinician(view)
    _consultations(actor, db, runtime).archive(_thread_id(consult_id))
    return redirect("/clinic/consultations", request)


# Clinicians: appointments ----------------------------------------------------------------------


def _clinic_appointments_page(
    request: Request,
    view: Viewer,
    *,
    db: DbSession,
    runtime: Runtime,
    status: int = 200,
    error: str | None = None,
    form: dict[str, str] | None = None,
) -> HTMLResponse:
    actor = _clinician(view)
    service = _appointments(actor, db, runtime)
    mine = _my_org(actor, db)
    schedules: Iterable[ScheduleRecord] = ()
    slots = []
    if mine is not None:
        # Ids, organisation and practitioner only: no personal health information.
        schedules = db.scalars(
            select(ScheduleRecord)
            .where(ScheduleRecord.org_id == mine.id)
            .order_by(ScheduleRecord.created_at.desc(), ScheduleRecord.id)
            .limit(50)
        ).all()
        slots = service.free_slots(org=mine.code)
    return _page(
        request,
        "clinic_appointments.html",
        view,
        status=status,
        error=error,
        form=form or {},
        schedules=list(schedules),
        slots=slots,
        appointments=service.list_mine(),
        my_org=mine.code if mine else "",
        max_schedule_days=MAX_SCHEDULE_DAYS,
        max_slot_minutes=MAX_SLOT_HOURS * 60,
        max_slots=MAX_SLOTS_AT_ONCE,
        now=runtime.clock.now(),
    )


@router.get("/clinic/appointments")
def clinic_appointments(
    *, request: Request, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> HTMLResponse:
    return _clinic_appointments_page(request, view, db=db, runtime=runtime)


@router.post("/clinic/appointments/schedules")
def clinic_schedule_publish(
    *, request: Request, view: PageViewer, form: WebForm, db: DbSession, runtime: RuntimeDep
) -> Response:
    actor = _clinician(view)
    days = _whole_number(form.get("days", ""), 1, MAX_SCHEDULE_DAYS)
    if days is None:
        return _clinic_appointments_page(
            request,
            view,
            db=db,
            runtime=runtime,
            status=400,
            error=N_("A schedule plans 1 to 366 days ahead."),
            form=form,
        )
    _appointments(actor, db, runtime).publish_schedule(days=days)
    return redirect("/clinic/appointments", request)


def _slot_periods(form: dict[str, str]) -> list[tuple[datetime, datetime]] | None:
    """Consecutive slots from a start (UTC), a length and a count; None if the form is wrong."""
    minutes = _whole_number(form.get("minutes", ""), 5, MAX_SLOT_HOURS * 60)
    count = _whole_number(form.get("count", ""), 1, MAX_SLOTS_AT_ONCE)
    try:
        start = datetime.fromisoformat(form.get("start", "").strip())
    except ValueError:
        return None
    if minutes is None or count is None or start.tzinfo is not None:
        return None
    start = start.replace(tzinfo=UTC)
    length = timedelta(minutes=minutes)
    return [(start + i * length, start + (i + 1) * length) for i in range(count)]


@router.post("/clinic/appointments/schedules/{schedule_id}/slots")
def clinic_slots_add(
    *,
    request: Request,
    schedule_id: str,
    view: PageViewer,
    form: WebForm,
    db: DbSession,
    runtime: RuntimeDep,
) -> Response:
    actor = _clinician(view)
    key = _path_id(schedule_id, "no such schedule")
    periods = _slot_periods(form)
    if periods is None:
        return _clinic_appointments_page(
            request,
            view,
            db=db,
            runtime=runtime,
            status=400,
            error=N_(
                "Give the first slot's start (date and time, UTC), a length of 5 to 720 minutes "
                "and 1 to 50 slots."
            ),
            form=form,
        )
    if periods[0][0] < runtime.clock.now():
        return _clinic_appointments_page(
            request,
            view,
            db=db,
            runtime=runtime,
            status=400,
            error=N_("Slots cannot start in the past."),
            form=form,
        )
    _appointments(actor, db, runtime).add_slots(key, periods)
    return redirect("/clinic/appointments", request)


@router.post("/clinic/appointments/{appointment_id}/cancel")
def clinic_appointment_cancel(
    *, request: Request, appointment_id: str, view: PageViewer, db: DbSession, runtime: RuntimeDep
) -> Response:
    actor = _clinician(view)
    _appointments(actor, db, runtime).cancel(_path_id(appointment_id, "no such appointment"))
    return redirect("/clinic/appointments", request)
