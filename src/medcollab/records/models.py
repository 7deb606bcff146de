"""The encrypted FHIR store.

* ``fhir_resource``: one row per resource (type, id) with its current version, compartment
  (patient), custodian organisation and deletion state. No content.
* ``fhir_resource_version``: every version ever written, encrypted with the patient's (or the
  organisation's) data key; the associated data binds type, id, version and patient.
* ``fhir_search_index``: search values of current versions. Identifying values (names,
  identifiers, telecom, address, birth date) are keyed HMAC blind indexes; codes, statuses and
  clinical dates are plain so range searches work.
* ``fhir_source_ref``: which stored resource an imported ``fullUrl`` became, so re-imports are
  idempotent; the reference is stored as a keyed hash.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    Boolean,
    ForeignKeyConstraint,
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


class FhirResource(Base):
    __tablename__ = "fhir_resource"
    __table_args__ = (Index(None, "patient_id", "resource_type"),)
    __repr_fields__ = ("resource_type", "resource_id", "version")

    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer())
    patient_id: Mapped[str | None] = mapped_column(String(64))
    custodian_org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    deleted: Mapped[bool] = mapped_column(Boolean(), default=False)
    last_updated: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class FhirResourceVersion(Base):
    __tablename__ = "fhir_resource_version"
    __table_args__ = (
        UniqueConstraint("resource_type", "resource_id", "version"),
        ForeignKeyConstraint(
            ["resource_type", "resource_id"],
            ["fhir_resource.resource_type", "fhir_resource.resource_id"],
            ondelete="CASCADE",
        ),
    )
    __repr_fields__ = ("resource_type", "resource_id", "version")

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer())
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    last_updated: Mapped[datetime] = mapped_column(UTCDateTime())
    deleted: Mapped[bool] = mapped_column(Boolean(), default=False)
    #: ``fhir_resource_version`` rows of deletions carry no content.
    ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary())
    key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid(), index=True)


class FhirSearchIndex(Base):
    __tablename__ = "fhir_search_index"
    __table_args__ = (
        Index(None, "resource_type", "param", "value"),
        Index(None, "resource_type", "resource_id"),
        ForeignKeyConstraint(
            ["resource_type", "resource_id"],
            ["fhir_resource.resource_type", "fhir_resource.resource_id"],
            ondelete="CASCADE",
        ),
    )
    __repr_fields__ = ("resource_type", "param")

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    param: Mapped[str] = mapped_column(String(64))
    #: The plain value, or the blind index when ``identifying``.
    value: Mapped[str] = mapped_column(String(255))
    identifying: Mapped[bool] = mapped_column(Boolean(), default=False)
    low: Mapped[datetime | None] = mapped_column(UTCDateTime())
    high: Mapped[datetime | None] = mapped_column(UTCDateTime())


class FhirSourceRef(Base):
    __tablename__ = "fhir_source_ref"
    __table_args__ = (UniqueConstraint("org_id", "ref_hash"),)
    __repr_fields__ = ("resource_type", "resource_id")

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=True)
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid())
    ref_hash: Mapped[str] = mapped_column(String(64))
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
