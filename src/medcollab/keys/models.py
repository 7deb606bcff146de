"""Data-key tables.

``data_key`` holds every data key (DEK) wrapped by a key-encryption key; the plaintext key is never
stored. ``shredded_owner`` is the tombstone of a crypto-shredded owner: it refuses new keys for that
owner and lets a restore destroy the keys that an older backup brings back.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    CheckConstraint,
    Enum,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from medcollab.db.base import Base
from medcollab.db.types import UTCDateTime

#: FHIR ids are at most 64 characters; organisation ids are UUIDs (36).
OWNER_ID_LENGTH = 64


class OwnerKind(StrEnum):
    PATIENT = "patient"
    ORGANIZATION = "organization"
    #: The one key that computes blind indexes (owner id :data:`BLIND_INDEX_OWNER`).
    BLIND_INDEX = "blind_index"


#: The fixed owner id of the blind-index key.
BLIND_INDEX_OWNER = "medcollab"


def _owner_kind_enum() -> Enum:
    # Stored as VARCHAR with a CHECK constraint: portable, and adding a value is a plain migration.
    return Enum(
        OwnerKind,
        name="data_key_owner_kind",
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [m.value for m in members],
    )


class DataKeyRecord(Base):
    """One data key of one owner. An owner's keys are numbered by ``generation``; the newest live one
    is current, older ones are retired but still open the data they sealed."""

    __tablename__ = "data_key"
    __table_args__ = (
        # The generation makes "one current key per owner" hold under concurrency without a partial
        # index: two writers creating the same generation collide here and one retries.
        UniqueConstraint("owner_kind", "owner_id", "generation"),
        CheckConstraint("generation >= 1", name="generation_positive"),
        # A key is either live (wrapped under a KEK) or destroyed (no key material at all).
        CheckConstraint(
            "(destroyed_at IS NULL AND wrapped IS NOT NULL AND kek_id IS NOT NULL) OR "
            "(destroyed_at IS NOT NULL AND wrapped IS NULL AND kek_id IS NULL)",
            name="live_or_destroyed",
        ),
    )
    __repr_fields__ = ("id", "owner_kind", "generation", "kek_id", "retired_at", "destroyed_at")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    owner_kind: Mapped[OwnerKind] = mapped_column(_owner_kind_enum())
    #: The FHIR Patient id, the organisation id, or :data:`BLIND_INDEX_OWNER`.
    owner_id: Mapped[str] = mapped_column(String(OWNER_ID_LENGTH))
    generation: Mapped[int] = mapped_column(Integer())
    #: The data key wrapped by the KEK ``kek_id`` (see medcollab.crypto.providers); None once destroyed.
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary())
    kek_id: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: Set when a newer generation replaced this key; it still opens what it sealed.
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Set when the key was crypto-shredded; its material is gone for good.
    destroyed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ShreddedOwner(Base):
    """The tombstone of an owner whose keys were crypto-shredded."""

    __tablename__ = "shredded_owner"
    __repr_fields__ = ("owner_kind", "owner_id", "shredded_at")

    owner_kind: Mapped[OwnerKind] = mapped_column(_owner_kind_enum(), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(OWNER_ID_LENGTH), primary_key=True)
    shredded_at: Mapped[datetime] = mapped_column(UTCDateTime())
    keys_destroyed: Mapped[int] = mapped_column(Integer())
