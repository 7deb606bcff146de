"""audit archives: archived prefixes of the audit log

Revision ID: a1d170000004
Revises: 2acf9b9be405
Create Date: 2026-11-29 14:00:00.000000

A new table only: nothing is archived by the upgrade, and existing events stay where they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import medcollab.db.types

revision: str = "a1d170000004"
down_revision: str | None = "2acf9b9be405"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_archive",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("first_leaf", sa.BigInteger(), nullable=False),
        sa.Column("end_leaf", sa.BigInteger(), nullable=False),
        sa.Column("file_name", sa.String(length=255), nullable=False),
        sa.Column("file_sha256", sa.LargeBinary(length=32), nullable=False),
        sa.Column("created_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("checkpoint", sa.Text(), nullable=False),
        sa.Column("statement", sa.Text(), nullable=False),
        sa.CheckConstraint("end_leaf > first_leaf", name=op.f("ck_audit_archive_leaf_range")),
        sa.CheckConstraint(
            "first_leaf >= 0", name=op.f("ck_audit_archive_first_leaf_non_negative")
        ),
        sa.CheckConstraint(
            "length(file_sha256) = 32", name=op.f("ck_audit_archive_file_sha256_size")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_archive")),
        sa.UniqueConstraint("end_leaf", name=op.f("uq_audit_archive_end_leaf")),
        sa.UniqueConstraint("first_leaf", name=op.f("uq_audit_archive_first_leaf")),
    )


def downgrade() -> None:
    op.drop_table("audit_archive")
