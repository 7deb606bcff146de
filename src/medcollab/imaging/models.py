"""Imaging tables: encrypted DICOM instances beside their FHIR ImagingStudy.

The clinical description of a study (its UIDs, modalities, series, descriptions, date) is a FHIR
ImagingStudy in the records store, encrypted and versioned by the repository like any resource. The
tables here hold what the workflows must find and lock in plain SQL, and the sealed files:

* ``imaging_study``: one row per stored study: the ImagingStudy id, the patient, and a blind index
  of the StudyInstanceUID (so a second upload of the same study joins it, and the same study cannot
  be filed under two patients) — never the UID itself.
* ``imaging_instance``: one DICOM Part 10 file, sealed with the patient's data key under associated
  data that binds it to its row, study and patient; its metadata (UIDs, modality, numbers) sealed
  the same way; a blind index of the SOP Instance UID and a SHA-256 digest of the file to make a
  repeated upload idempotent; the burned-in-annotation assessment, in the clear, because it decides
  what may leave the care team.
* ``imaging_share``: a study shared into a remote consultation. Participants outside the care
  relationship receive de-identified copies, made on the fly with a per-share key (sealed with the
  patient's key) that keeps the UID mapping and the date shift consistent across the study.
  Instances whose pixels may show identifying text are withheld unless the sharer released them.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from medcollab.db.base import Base
from medcollab.db.types import UTCDateTime


class ImagingStudyRecord(Base):
    __tablename__ = "imaging_study"
    __table_args__ = (UniqueConstraint("study_uid_index"),)
    __repr_fields__ = ("id", "patient_id")

    #: Also the id of the study's FHIR ImagingStudy.
    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    #: Blind index (keyed HMAC) of the StudyInstanceUID: equality lookups only.
    study_uid_index: Mapped[str] = mapped_column(String(64))
    #: The organisation whose clinician first uploaded the study.
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ImagingInstanceRecord(Base):
    __tablename__ = "imaging_instance"
    __table_args__ = (
        UniqueConstraint("study_id", "sop_uid_index"),
        CheckConstraint("size > 0", name="size_positive"),
    )
    __repr_fields__ = ("id", "study_id", "size", "burned_in_risk")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    study_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("imaging_study.id", ondelete="CASCADE"), index=True
    )
    #: Blind index of the SOP Instance UID within the study.
    sop_uid_index: Mapped[str] = mapped_column(String(64))
    #: SHA-256 of the file as uploaded, keyed like a blind index (a plain digest of a known file
    #: would let anyone holding the file confirm it is stored here).
    content_index: Mapped[str] = mapped_column(String(64))
    uploaded_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"))
    uploader_org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    size: Mapped[int] = mapped_column(Integer())
    #: Whether the pixels may show identifying text or features (see deid.dicom.assess_burned_in).
    burned_in_risk: Mapped[bool] = mapped_column(Boolean())
    #: JSON of the extracted metadata and the burned-in reasons, sealed with the patient's key.
    metadata_enc: Mapped[bytes] = mapped_column(LargeBinary())
    content_enc: Mapped[bytes] = mapped_column(LargeBinary())


class ImagingShareRecord(Base):
    __tablename__ = "imaging_share"
    __table_args__ = (
        UniqueConstraint("study_id", "consult_id"),
        Index(None, "consult_id", "created_at"),
    )
    __repr_fields__ = ("id", "study_id", "consult_id")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    study_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("imaging_study.id", ondelete="CASCADE"))
    consult_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collab_consult.id", ondelete="CASCADE")
    )
    shared_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id"))
    sharer_org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: The sharer confirmed that images flagged for burned-in text may go out de-identified.
    release_flagged: Mapped[bool] = mapped_column(Boolean())
    #: The de-identification key (UID remapping and date shift), sealed with the patient's key.
    key_enc: Mapped[bytes] = mapped_column(LargeBinary())
