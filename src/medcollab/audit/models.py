"""The audit tables. Rows are appended, never updated, with one exception: the integrator assigns
each event its leaf index once (see :mod:`medcollab.audit.services`).

- ``audit_event``: one row per event. ``seq`` comes from the database's sequence when the event is
  appended inside the caller's transaction; ``leaf_index`` is its position in the Merkle tree,
  assigned later, gaplessly and in commit order, by the integrator.
- ``audit_tree_node``: the hash of every complete subtree, keyed by ``(level, idx)``; level 0 holds
  the leaf hashes. A node never changes once written, so proofs and roots at any size are
  ``O(log n)`` lookups.
- ``audit_event_patient``: which patients each event concerns, so a patient's access history and
  the auditors' ``AuditEvent?patient=`` search are index lookups. Derived from the event body (which
  the tree protects); it is not itself hashed.
- ``audit_tree_head``: the signed tree heads, each stored as the exact C2SP checkpoint note that was
  signed, with its size, root and time copied into columns for queries.
- ``audit_archive``: one row per archived prefix of the log (:mod:`medcollab.audit.archive`). The
  archived events' rows are deleted; their leaf hashes and every tree node stay, so the rest of the
  log still verifies. The row keeps the archive's signed statement and checkpoint, so a row an
  intruder adds to hide deleted events is detected: it cannot be signed.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from medcollab.db.base import Base
from medcollab.db.types import UTCDateTime

# BigInteger on PostgreSQL, INTEGER (the rowid alias) on SQLite so it autoincrements there too.
_SerialKey = BigInteger().with_variant(Integer(), "sqlite")


class AuditEventRecord(Base):
    __tablename__ = "audit_event"
    __repr_fields__ = ("seq", "leaf_index", "type", "outcome")

    seq: Mapped[int] = mapped_column(_SerialKey, primary_key=True, autoincrement=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    type: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(1))
    outcome: Mapped[str] = mapped_column(String(2))
    agent_user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid(), index=True)
    agent_org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid())
    subject_user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid(), index=True)
    #: The whole event in a deterministic JSON form (ids, codes and hashes only). Its RFC 8785
    #: canonical encoding, together with ``seq``, is what the Merkle leaf commits to.
    body: Mapped[dict[str, object]] = mapped_column(JSON())
    #: Position in the Merkle tree; NULL until the integrator has added the event to the tree.
    leaf_index: Mapped[int | None] = mapped_column(BigInteger(), unique=True, default=None)


class AuditTreeNode(Base):
    __tablename__ = "audit_tree_node"
    __table_args__ = (
        CheckConstraint("level >= 0 AND level < 64", name="level_range"),
        CheckConstraint("idx >= 0", name="idx_non_negative"),
        CheckConstraint("length(hash) = 32", name="hash_size"),
    )
    __repr_fields__ = ("level", "idx")

    #: The subtree covers leaves ``[idx << level, (idx + 1) << level)``.
    level: Mapped[int] = mapped_column(SmallInteger(), primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger(), primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class AuditTreeHead(Base):
    __tablename__ = "audit_tree_head"
    __table_args__ = (CheckConstraint("tree_size >= 0", name="tree_size_non_negative"),)
    __repr_fields__ = ("id", "tree_size", "issued_at")

    id: Mapped[int] = mapped_column(_SerialKey, primary_key=True, autoincrement=True)
    tree_size: Mapped[int] = mapped_column(BigInteger(), index=True)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: The signed checkpoint exactly as issued: what verification and witnesses check.
    note: Mapped[str] = mapped_column(Text())


class AuditEventPatient(Base):
    """One row per (event, patient) the event concerns; ids only."""

    __tablename__ = "audit_event_patient"
    __repr_fields__ = ("seq", "patient_id")

    # No foreign key: the index is derived, and the audit table stays free of cascades (and of
    # constraints that would make a tampering test or a forensic repair behave differently).
    seq: Mapped[int] = mapped_column(_SerialKey, primary_key=True, autoincrement=False)
    patient_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class AuditArchive(Base):
    """An archived range of leaves ``[first_leaf, end_leaf)``, whose events now live in a file."""

    __tablename__ = "audit_archive"
    __table_args__ = (
        CheckConstraint("first_leaf >= 0", name="first_leaf_non_negative"),
        CheckConstraint("end_leaf > first_leaf", name="leaf_range"),
        CheckConstraint("length(file_sha256) = 32", name="file_sha256_size"),
    )
    __repr_fields__ = ("id", "first_leaf", "end_leaf", "file_name")

    id: Mapped[int] = mapped_column(_SerialKey, primary_key=True, autoincrement=True)
    first_leaf: Mapped[int] = mapped_column(BigInteger(), unique=True)
    end_leaf: Mapped[int] = mapped_column(BigInteger(), unique=True)
    #: The file's name when it was written (a hint for finding it; it may be moved or renamed).
    file_name: Mapped[str] = mapped_column(String(255))
    #: SHA-256 of the whole file, so the file an operator produces can be matched to this row.
    file_sha256: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: The signed C2SP checkpoint of the tree at ``end_leaf`` leaves, also stored in the file.
    checkpoint: Mapped[str] = mapped_column(Text())
    #: The signed archive statement (range, root, payload hash), the first member of the file.
    statement: Mapped[str] = mapped_column(Text())
