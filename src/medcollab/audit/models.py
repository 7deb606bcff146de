"""The audit event table. Rows are appended, never updated."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, BigInteger, Integer, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from medcollab.db.base import Base
from medcollab.db.types import UTCDateTime


class AuditEventRecord(Base):
    __tablename__ = "audit_event"
    __repr_fields__ = ("seq", "type", "outcome")

    # BigInteger on PostgreSQL, INTEGER (the rowid alias) on SQLite so it autoincrements there too.
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    type: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(1))
    outcome: Mapped[str] = mapped_column(String(2))
    agent_user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid(), index=True)
    agent_org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    subject_user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid(), index=True)
    #: The whole event in a deterministic JSON form (ids, codes and hashes only).
    body: Mapped[dict[str, object]] = mapped_column(JSON())
