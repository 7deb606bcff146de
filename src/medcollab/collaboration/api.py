"""The collaboration API under ``/collab``: referrals, remote consultations, appointments.

Every route builds the request's :class:`AccessContext` and records repository the same way the
FHIR API does (``X-Organization``, ``X-Purpose-Of-Use``; staff sessions need MFA), and hands them to
a service in :mod:`medcollab.collaboration.services`, which decides, seals and audits. JSON bodies
must say so (415 otherwise); unknown fields are refused. Attachments are ``multipart/form-data``
with one ``file`` field; their type is detected from the content.

Referrals
    ``POST /collab/referrals``, ``GET /collab/referrals`` (the caller's, as clinician or patient),
    ``GET /collab/referrals/{id}``, ``POST /collab/referrals/{id}/accept|decline|revoke``.
Consultations
    ``POST|GET /collab/consultations``, ``GET /collab/consultations/invitations`` (the caller's
    pending invitations), ``GET /collab/consultations/{id}``,
    ``POST /collab/consultations/{id}/close|archive``,
    ``POST /collab/consultations/{id}/invitations``,
    ``POST /collab/consultations/{id}/invitations/{invitation}/accept|decline``,
    ``GET|POST /collab/consultations/{id}/messages``,
    ``GET|POST /collab/consultations/{id}/attachments``,
    ``GET /collab/consultations/{id}/attachments/{attachment}`` (the file).
Appointments
    ``POST /collab/schedules``, ``POST /collab/schedules/{id}/slots``, ``GET /collab/slots``,
    ``POST|GET /collab/appointments``, ``POST /collab/appointments/{id}/cancel``.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Final

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from medcollab.api.deps import RuntimeDep, require_json
from medcollab.api.uploads import Upload, parse_multipart
from medcollab.collaboration.services import (
    DEFAULT_INVITATION_DAYS,
    MAX_ATTACHMENT_BYTES,
    MAX_INVITATION_DAYS,
    MAX_MESSAGE_LENGTH,
    MAX_NOTE_LENGTH,
    MAX_REASON_LENGTH,
    MAX_REFERRAL_DAYS,
    MAX_SCHEDULE_DAYS,
    MAX_SLOTS_PER_REQUEST,
    MAX_TOPIC_LENGTH,
    AppointmentService,
    AppointmentView,
    AttachmentView,
    ConsultationService,
    ConsultationView,
    InvitationView,
    MessageView,
    ReferralService,
    ReferralView,
    ScheduleView,
    SlotView,
)
from medcollab.errors import InvalidInput, UnsupportedMediaType
from medcollab.records.api import RecordRepo

router = APIRouter(prefix="/collab", tags=["collaboration"])
_JSON: Final = [Depends(require_json)]
_EXTENSIONS: Final = {
    "application/pdf": ".pdf",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "application/dicom": ".dcm",
}

FhirId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9\-.]{1,64}$")]
OrgCode = Annotated[str, StringConstraints(min_length=1, max_length=32)]


class _Strict(BaseModel):
    # Text is kept exactly as sent: no stripping, and unknown fields are refused.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


# Services ----------------------------------------------------------------------------------------


def referral_service(repo: RecordRepo, runtime: RuntimeDep) -> ReferralService:
    return ReferralService(repo=repo, runtime=runtime)


def consultation_service(repo: RecordRepo, runtime: RuntimeDep) -> ConsultationService:
    # The transport's body limit applies first; the service's own limit only when it is higher.
    return ConsultationService(
        repo=repo, runtime=runtime, max_attachment_bytes=MAX_ATTACHMENT_BYTES
    )


def appointment_service(repo: RecordRepo, runtime: RuntimeDep) -> AppointmentService:
    return AppointmentService(repo=repo, runtime=runtime)


Referrals = Annotated[ReferralService, Depends(referral_service)]
Consultations = Annotated[ConsultationService, Depends(consultation_service)]
Appointments = Annotated[AppointmentService, Depends(appointment_service)]


# Referrals ---------------------------------------------------------------------------------------


class ReferralIn(_Strict):
    patient_id: FhirId
    #: The receiving organisation's code.
    to_org: OrgCode
    #: A FHIR Practitioner at the receiving organisation; only their accounts get access.
    to_practitioner_id: FhirId | None = None
    reason: Annotated[str, StringConstraints(min_length=1, max_length=MAX_REASON_LENGTH)]
    #: FHIR resource types to share; omit (null) for the whole record.
    scope: Annotated[list[str], Field(min_length=1, max_length=150)] | None = None
    days: Annotated[int, Field(ge=1, le=MAX_REFERRAL_DAYS)]
    #: When access may begin; default now.
    starts_at: AwareDatetime | None = None


class NoteIn(_Strict):
    note: Annotated[str, StringConstraints(min_length=1, max_length=MAX_NOTE_LENGTH)] | None = None


@router.post("/referrals", status_code=201, dependencies=_JSON)
def create_referral(body: ReferralIn, service: Referrals) -> ReferralView:
    return service.create(
        patient_id=body.patient_id,
        to_org=body.to_org,
        to_practitioner_id=body.to_practitioner_id,
        reason=body.reason,
        scope=body.scope,
        days=body.days,
        starts_at=body.starts_at,
    )


@router.get("/referrals")
def list_referrals(service: Referrals) -> list[ReferralView]:
    return service.list_mine()


@router.get("/referrals/{referral_id}")
def read_referral(referral_id: str, service: Referrals) -> ReferralView:
    return service.get(referral_id)


@router.post("/referrals/{referral_id}/accept", dependencies=_JSON)
def accept_referral(referral_id: str, service: Referrals) -> ReferralView:
    return service.accept(referral_id)


@router.post("/referrals/{referral_id}/decline", dependencies=_JSON)
def decline_referral(
    referral_id: str, service: Referrals, body: NoteIn | None = None
) -> ReferralView:
    return service.decline(referral_id, body.note if body else None)


@router.post("/referrals/{referral_id}/revoke", dependencies=_JSON)
def revoke_referral(
    referral_id: str, service: Referrals, body: NoteIn | None = None
) -> ReferralView:
    return service.revoke(referral_id, body.note if body else None)


# Consultations -----------------------------------------------------------------------------------


class ConsultationIn(_Strict):
    patient_id: FhirId
    topic: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TOPIC_LENGTH)]


class InvitationIn(_Strict):
    user_id: uuid.UUID
    #: The organisation the invitee takes part for.
    org: OrgCode
    days: Annotated[int, Field(ge=1, le=MAX_INVITATION_DAYS)] = DEFAULT_INVITATION_DAYS


class MessageIn(_Strict):
    text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_MESSAGE_LENGTH)]


@router.post("/consultations", status_code=201, dependencies=_JSON)
def create_consultation(body: ConsultationIn, service: Consultations) -> ConsultationView:
    return service.create(patient_id=body.patient_id, topic=body.topic)


@router.get("/consultations")
def list_consultations(
    service: Consultations, include_archived: bool = False
) -> list[ConsultationView]:
    return service.list_mine(include_archived=include_archived)


@router.get("/consultations/invitations")
def my_invitations(service: Consultations) -> list[InvitationView]:
    return service.my_invitations()


@router.get("/consultations/{consult_id}")
def read_consultation(consult_id: str, service: Consultations) -> ConsultationView:
    return service.get(consult_id)


@router.post("/consultations/{consult_id}/close", dependencies=_JSON)
def close_consultation(consult_id: str, service: Consultations) -> ConsultationView:
    return service.close(consult_id)


@router.post("/consultations/{consult_id}/archive", dependencies=_JSON)
def archive_consultation(consult_id: str, service: Consultations) -> ConsultationView:
    return service.archive(consult_id)


@router.post("/consultations/{consult_id}/invitations", status_code=201, dependencies=_JSON)
def invite(consult_id: str, body: InvitationIn, service: Consultations) -> InvitationView:
    return service.invite(consult_id, user_id=body.user_id, org=body.org, days=body.days)


@router.post("/consultations/{consult_id}/invitations/{invitation_id}/accept", dependencies=_JSON)
def accept_invitation(
    consult_id: str, invitation_id: str, service: Consultations
) -> ConsultationView:
    return service.accept_invitation(consult_id, invitation_id)


@router.post("/consultations/{consult_id}/invitations/{invitation_id}/decline", dependencies=_JSON)
def decline_invitation(
    consult_id: str, invitation_id: str, service: Consultations
) -> InvitationView:
    return service.decline_invitation(consult_id, invitation_id)


@router.get("/consultations/{consult_id}/messages")
def read_messages(consult_id: str, service: Consultations) -> list[MessageView]:
    return service.messages(consult_id)


@router.post("/consultations/{consult_id}/messages", status_code=201, dependencies=_JSON)
def post_message(consult_id: str, body: MessageIn, service: Consultations) -> MessageView:
    return service.post_message(consult_id, body.text)


async def multipart_file(request: Request) -> Upload:
    """The one ``file`` field of a ``multipart/form-data`` body (see :mod:`medcollab.api.uploads`)."""
    header = request.headers.get("content-type", "")
    if (
        header.split(";", 1)[0].strip().lower() != "multipart/form-data"
        or "boundary=" not in header
    ):
        raise UnsupportedMediaType(
            "send the file as multipart/form-data",
            hint="one form field named 'file', with a file name",
        )
    files = parse_multipart(header, await request.body(), field="file", max_files=2)
    if len(files) != 1:
        raise InvalidInput("the form must have exactly one field named 'file'")
    return files[0]


@router.get("/consultations/{consult_id}/attachments")
def list_attachments(consult_id: str, service: Consultations) -> list[AttachmentView]:
    return service.attachments(consult_id)


@router.post("/consultations/{consult_id}/attachments", status_code=201)
def add_attachment(
    consult_id: str,
    upload: Annotated[Upload, Depends(multipart_file)],
    service: Consultations,
) -> AttachmentView:
    return service.add_attachment(consult_id, filename=upload.filename, content=upload.content)


@router.get("/consultations/{consult_id}/attachments/{attachment_id}")
def download_attachment(consult_id: str, attachment_id: str, service: Consultations) -> Response:
    view, content = service.read_attachment(consult_id, attachment_id)
    # A neutral download name: the original one may name the patient and would end up in
    # browser histories and download folders. The JSON listing carries it for display.
    name = f"attachment-{view.id}{_EXTENSIONS.get(view.media_type, '')}"
    return Response(
        content,
        media_type=view.media_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


# Appointments ------------------------------------------------------------------------------------


class ScheduleIn(_Strict):
    #: How far ahead the schedule plans.
    days: Annotated[int, Field(ge=1, le=MAX_SCHEDULE_DAYS)] = 90
    #: The caller's Practitioner, when their account is linked to several.
    practitioner_id: FhirId | None = None


class SlotIn(_Strict):
    start: AwareDatetime
    end: AwareDatetime


class SlotsIn(_Strict):
    slots: Annotated[list[SlotIn], Field(min_length=1, max_length=MAX_SLOTS_PER_REQUEST)]


class BookingIn(_Strict):
    slot_id: FhirId
    #: The ward a guardian books for; patients may omit it.
    patient_id: FhirId | None = None


@router.post("/schedules", status_code=201, dependencies=_JSON)
def publish_schedule(service: Appointments, body: ScheduleIn | None = None) -> ScheduleView:
    body = body or ScheduleIn()
    return service.publish_schedule(days=body.days, practitioner_id=body.practitioner_id)


@router.post("/schedules/{schedule_id}/slots", status_code=201, dependencies=_JSON)
def add_slots(schedule_id: str, body: SlotsIn, service: Appointments) -> list[SlotView]:
    return service.add_slots(schedule_id, [(s.start, s.end) for s in body.slots])


@router.get("/slots")
def free_slots(
    service: Appointments,
    org: Annotated[OrgCode | None, Query()] = None,
    schedule: Annotated[FhirId | None, Query()] = None,
    start: Annotated[AwareDatetime | None, Query()] = None,
    end: Annotated[AwareDatetime | None, Query()] = None,
) -> list[SlotView]:
    return service.free_slots(org=org, schedule_id=schedule, start=start, end=end)


@router.post("/appointments", status_code=201, dependencies=_JSON)
def book(body: BookingIn, service: Appointments) -> AppointmentView:
    return service.book(body.slot_id, patient_id=body.patient_id)


@router.get("/appointments")
def list_appointments(service: Appointments) -> list[AppointmentView]:
    return service.list_mine()


@router.post("/appointments/{appointment_id}/cancel", dependencies=_JSON)
def cancel(appointment_id: str, service: Appointments) -> AppointmentView:
    return service.cancel(appointment_id)
