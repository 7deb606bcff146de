"""Collaboration tables: workflow state beside the FHIR resources, and sealed consultation content.

The clinical content of a referral, a schedule, a slot and an appointment lives in the FHIR store
(ServiceRequest, Task, Schedule, Slot, Appointment), encrypted and versioned by the records
repository. The tables here hold only what the workflows must query or lock in plain SQL: ids,
organisations, times, states and resource-type codes. No free text, no names.

* ``collab_referral``: one row per referral (its ServiceRequest and Task ids, the two sides, the
  data scope and period, the state). State changes are conditional updates on ``status``, so two
  people deciding at once cannot both win.
* ``collab_consult`` with ``..._participant``, ``..._invitation``, ``..._message`` and
  ``..._attachment``: a case discussion about one patient. Its topic, messages, file names and files
  are sealed with the patient's data key (associated data binds each ciphertext to its thread and
  row), so crypto-shredding the patient erases them with the rest of the record.
* ``collab_schedule``, ``collab_slot`` and ``collab_appointment``: the booking index. A slot is
  claimed by ``UPDATE collab_slot SET status = 'busy' ... WHERE status = 'free'``; the database lets
  exactly one of two concurrent claims change the row, and the check constraint keeps a busy slot
  tied to the appointment that holds it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    CheckConstraint,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from medcollab.db.base import Base
from medcollab.db.types import UTCDateTime


def _enum(enum_cls: type[StrEnum], name: str) -> Enum:
    # VARCHAR with a CHECK constraint, like every enum in the schema: portable across databases.
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
    )


# Referrals ---------------------------------------------------------------------------------------


class ReferralStatus(StrEnum):
    REQUESTED = "requested"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    REVOKED = "revoked"


class ReferralRecord(Base):
    __tablename__ = "collab_referral"
    __table_args__ = (CheckConstraint("ends_at > starts_at", name="period_not_empty"),)
    __repr_fields__ = ("id", "status", "starts_at", "ends_at")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    service_request_id: Mapped[str] = mapped_column(String(64), unique=True)
    task_id: Mapped[str] = mapped_column(String(64), unique=True)
    from_org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"), index=True)
    from_user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"))
    to_org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"), index=True)
    #: The named FHIR Practitioner at the receiving organisation, if the referral names one.
    to_practitioner_id: Mapped[str | None] = mapped_column(String(64))
    #: Comma-separated FHIR resource types the referral shares, or None for the whole record.
    scope: Mapped[str | None] = mapped_column(Text())
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[ReferralStatus] = mapped_column(_enum(ReferralStatus, "referral_status"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    decided_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("user_account.id"))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("user_account.id"))
    #: Who revoked: ``referring``, ``receiving`` or ``patient``.
    revoked_side: Mapped[str | None] = mapped_column(String(16))


# Consultations -----------------------------------------------------------------------------------


class ConsultationStatus(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    ARCHIVED = "archived"


class ParticipantRole(StrEnum):
    OWNER = "owner"
    MEMBER = "member"


class InvitationStatus(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    REVOKED = "revoked"


class ConsultationRecord(Base):
    __tablename__ = "collab_consult"
    __repr_fields__ = ("id", "status")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"), index=True)
    created_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"))
    #: The topic, sealed with the patient's data key: a case title is clinical content.
    topic_enc: Mapped[bytes] = mapped_column(LargeBinary())
    status: Mapped[ConsultationStatus] = mapped_column(
        _enum(ConsultationStatus, "consultation_status")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    archived_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ParticipantRecord(Base):
    __tablename__ = "collab_consult_participant"
    __table_args__ = (UniqueConstraint("consult_id", "user_id"),)
    __repr_fields__ = ("id", "consult_id", "user_id", "role")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    consult_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collab_consult.id", ondelete="CASCADE")
    )
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"), index=True)
    #: The organisation the participant acts for in this thread.
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"))
    role: Mapped[ParticipantRole] = mapped_column(_enum(ParticipantRole, "participant_role"))
    joined_at: Mapped[datetime] = mapped_column(UTCDateTime())


class InvitationRecord(Base):
    __tablename__ = "collab_consult_invitation"
    __table_args__ = (
        Index(None, "consult_id", "invitee_user_id"),
        CheckConstraint("expires_at > created_at", name="expires_after_creation"),
    )
    __repr_fields__ = ("id", "consult_id", "status", "expires_at")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    consult_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collab_consult.id", ondelete="CASCADE")
    )
    invitee_user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"), index=True)
    invitee_org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"))
    invited_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"))
    #: Why the invitee may see the patient's case: a care relationship, a Consent id, or the
    #: jurisdiction rule. Codes and ids only.
    basis: Mapped[str] = mapped_column(String(200))
    status: Mapped[InvitationStatus] = mapped_column(_enum(InvitationStatus, "invitation_status"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class MessageRecord(Base):
    __tablename__ = "collab_consult_message"
    __table_args__ = (Index(None, "consult_id", "created_at"),)
    __repr_fields__ = ("id", "consult_id", "created_at")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    consult_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collab_consult.id", ondelete="CASCADE")
    )
    author_user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"))
    author_org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: The text exactly as written, sealed with the patient's key; bound to thread and message.
    body_enc: Mapped[bytes] = mapped_column(LargeBinary())


class AttachmentRecord(Base):
    __tablename__ = "collab_consult_attachment"
    __table_args__ = (
        Index(None, "consult_id", "created_at"),
        CheckConstraint("size > 0", name="size_positive"),
    )
    __repr_fields__ = ("id", "consult_id", "media_type", "size")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    consult_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collab_consult.id", ondelete="CASCADE")
    )
    uploaded_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"))
    uploader_org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: Detected from the content, never taken from the client.
    media_type: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer())
    #: File names often carry a patient's name: sealed like the content.
    filename_enc: Mapped[bytes] = mapped_column(LargeBinary())
    content_enc: Mapped[bytes] = mapped_column(LargeBinary())


# Appointments ------------------------------------------------------------------------------------


class SlotStatus(StrEnum):
    FREE = "free"
    BUSY = "busy"


class AppointmentStatus(StrEnum):
    BOOKED = "booked"
    CANCELLED = "cancelled"


class ScheduleRecord(Base):
    __tablename__ = "collab_schedule"
    __repr_fields__ = ("id", "org_id")

    #: The FHIR Schedule id.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"), index=True)
    #: The FHIR Practitioner whose availability the schedule publishes.
    practitioner_id: Mapped[str] = mapped_column(String(64))
    owner_user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SlotRecord(Base):
    __tablename__ = "collab_slot"
    __table_args__ = (
        Index(None, "org_id", "starts_at"),
        Index(None, "schedule_id", "starts_at"),
        CheckConstraint("ends_at > starts_at", name="period_not_empty"),
        # A busy slot always names the appointment holding it, and a free one names none, so a
        # claim that forgot one half of the change fails in the database.
        CheckConstraint(
            "(status = 'free' AND appointment_id IS NULL) OR "
            "(status = 'busy' AND appointment_id IS NOT NULL)",
            name="busy_iff_booked",
        ),
    )
    __repr_fields__ = ("id", "status", "starts_at")

    #: The FHIR Slot id.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    schedule_id: Mapped[str] = mapped_column(ForeignKey("collab_schedule.id"))
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"))
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[SlotStatus] = mapped_column(_enum(SlotStatus, "slot_status"))
    appointment_id: Mapped[str | None] = mapped_column(String(64))


class AppointmentRecord(Base):
    __tablename__ = "collab_appointment"
    __repr_fields__ = ("id", "slot_id", "status")

    #: The FHIR Appointment id.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot_id: Mapped[str] = mapped_column(ForeignKey("collab_slot.id"), index=True)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"), index=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    booked_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"))
    status: Mapped[AppointmentStatus] = mapped_column(
        _enum(AppointmentStatus, "appointment_status")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelled_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("user_account.id"))
