"""Care relationships, break-glass grants, their review tasks and patient notifications."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from medcollab.db.base import Base
from medcollab.db.types import UTCDateTime


class CareRelationshipRecord(Base):
    """Why a clinician (or every clinician of an organisation) may see a patient, until when.

    Rows are derived from clinical data (CareTeam membership, Encounter participation), from
    registration of the patient, and from accepted referrals. ``source`` names the origin so a row
    can be replaced when its source changes.
    """

    __tablename__ = "care_relationship"
    __table_args__ = (Index(None, "patient_id", "org_id"),)
    __repr_fields__ = ("id", "kind", "patient_id", "org_id", "expires_at")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(32))
    patient_id: Mapped[str] = mapped_column(String(64))
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"))
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("user_account.id"))
    #: Comma-separated resource types, or None for the whole record.
    scope: Mapped[str | None] = mapped_column(Text())
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(String(200), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class BreakGlassGrant(Base):
    """Emergency read access to one patient for a limited time, always reviewed afterwards."""

    __tablename__ = "break_glass_grant"
    __table_args__ = (Index(None, "user_id", "patient_id"),)
    __repr_fields__ = ("id", "user_id", "patient_id", "expires_at")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"))
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"))
    patient_id: Mapped[str] = mapped_column(String(64))
    #: The clinician's justification, sealed: it may describe the patient's condition.
    reason_enc: Mapped[bytes] = mapped_column()
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ReviewTask(Base):
    """A privacy officer's task to review a break-glass grant (approve or flag)."""

    __tablename__ = "review_task"
    __repr_fields__ = ("id", "grant_id", "status")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    grant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("break_glass_grant.id"), unique=True)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="open")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reviewer_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("user_account.id"))


class PatientNotification(Base):
    """A message for a patient (e.g. "your record was opened in an emergency"). Ids and codes
    only; the text is rendered from ``kind`` at display time."""

    __tablename__ = "patient_notification"
    __repr_fields__ = ("id", "patient_id", "kind")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    reference: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
