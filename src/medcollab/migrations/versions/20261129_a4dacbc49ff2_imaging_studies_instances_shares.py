"""imaging studies instances shares

Revision ID: a4dacbc49ff2
Revises: c0ab00000005
Create Date: 2026-11-29 14:13:12.950259

New tables only (see medcollab.imaging.models): stored studies (blind-indexed study UIDs), DICOM
instances sealed with the patient's data key, and studies shared into consultations with a sealed
de-identification key. No existing row changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import medcollab.db.types

revision: str = "a4dacbc49ff2"
down_revision: str | None = "c0ab00000005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "imaging_study",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("study_uid_index", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organization.id"], name=op.f("fk_imaging_study_org_id_organization")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imaging_study")),
        sa.UniqueConstraint("study_uid_index", name=op.f("uq_imaging_study_study_uid_index")),
    )
    with op.batch_alter_table("imaging_study", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_imaging_study_org_id"), ["org_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_imaging_study_patient_id"), ["patient_id"], unique=False
        )

    op.create_table(
        "imaging_instance",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("study_id", sa.Uuid(), nullable=False),
        sa.Column("sop_uid_index", sa.String(length=64), nullable=False),
        sa.Column("content_index", sa.String(length=64), nullable=False),
        sa.Column("uploaded_by", sa.Uuid(), nullable=False),
        sa.Column("uploader_org_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("burned_in_risk", sa.Boolean(), nullable=False),
        sa.Column("metadata_enc", sa.LargeBinary(), nullable=False),
        sa.Column("content_enc", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("size > 0", name=op.f("ck_imaging_instance_size_positive")),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["imaging_study.id"],
            name=op.f("fk_imaging_instance_study_id_imaging_study"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["uploaded_by"],
            ["user_account.id"],
            name=op.f("fk_imaging_instance_uploaded_by_user_account"),
        ),
        sa.ForeignKeyConstraint(
            ["uploader_org_id"],
            ["organization.id"],
            name=op.f("fk_imaging_instance_uploader_org_id_organization"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imaging_instance")),
        sa.UniqueConstraint(
            "study_id", "sop_uid_index", name=op.f("uq_imaging_instance_study_id_sop_uid_index")
        ),
    )
    with op.batch_alter_table("imaging_instance", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_imaging_instance_study_id"), ["study_id"], unique=False
        )

    op.create_table(
        "imaging_share",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("study_id", sa.Uuid(), nullable=False),
        sa.Column("consult_id", sa.Uuid(), nullable=False),
        sa.Column("shared_by", sa.Uuid(), nullable=False),
        sa.Column("sharer_org_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("release_flagged", sa.Boolean(), nullable=False),
        sa.Column("key_enc", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["consult_id"],
            ["collab_consult.id"],
            name=op.f("fk_imaging_share_consult_id_collab_consult"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["shared_by"], ["user_account.id"], name=op.f("fk_imaging_share_shared_by_user_account")
        ),
        sa.ForeignKeyConstraint(
            ["sharer_org_id"],
            ["organization.id"],
            name=op.f("fk_imaging_share_sharer_org_id_organization"),
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["imaging_study.id"],
            name=op.f("fk_imaging_share_study_id_imaging_study"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imaging_share")),
        sa.UniqueConstraint(
            "study_id", "consult_id", name=op.f("uq_imaging_share_study_id_consult_id")
        ),
    )
    with op.batch_alter_table("imaging_share", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_imaging_share_consult_id_created_at"),
            ["consult_id", "created_at"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("imaging_share", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_imaging_share_consult_id_created_at"))

    op.drop_table("imaging_share")
    with op.batch_alter_table("imaging_instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_imaging_instance_study_id"))

    op.drop_table("imaging_instance")
    with op.batch_alter_table("imaging_study", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_imaging_study_patient_id"))
        batch_op.drop_index(batch_op.f("ix_imaging_study_org_id"))

    op.drop_table("imaging_study")
