"""collaboration: referrals, consultations, appointments

Revision ID: c0ab00000005
Revises: a1d170000004
Create Date: 2026-11-29 15:00:00.000000

New tables only (see medcollab.collaboration.models): referral workflow state, consultation threads
with sealed content, and the schedule/slot/appointment booking index. No existing row changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import medcollab.db.types

revision: str = "c0ab00000005"
down_revision: str | None = "a1d170000004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "collab_consult",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("created_by", sa.Uuid(), nullable=False),
        sa.Column("topic_enc", sa.LargeBinary(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "open",
                "closed",
                "archived",
                name="consultation_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("created_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("closed_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("archived_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["created_by"],
            ["user_account.id"],
            name=op.f("fk_collab_consult_created_by_user_account"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organization.id"], name=op.f("fk_collab_consult_org_id_organization")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collab_consult")),
    )
    with op.batch_alter_table("collab_consult", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_collab_consult_org_id"), ["org_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_collab_consult_patient_id"), ["patient_id"], unique=False
        )

    op.create_table(
        "collab_referral",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("service_request_id", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("from_org_id", sa.Uuid(), nullable=False),
        sa.Column("from_user_id", sa.Uuid(), nullable=False),
        sa.Column("to_org_id", sa.Uuid(), nullable=False),
        sa.Column("to_practitioner_id", sa.String(length=64), nullable=True),
        sa.Column("scope", sa.Text(), nullable=True),
        sa.Column("starts_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("ends_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "requested",
                "accepted",
                "declined",
                "revoked",
                name="referral_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("created_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("decided_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.Uuid(), nullable=True),
        sa.Column("revoked_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.Uuid(), nullable=True),
        sa.Column("revoked_side", sa.String(length=16), nullable=True),
        sa.CheckConstraint("ends_at > starts_at", name=op.f("ck_collab_referral_period_not_empty")),
        sa.ForeignKeyConstraint(
            ["decided_by"],
            ["user_account.id"],
            name=op.f("fk_collab_referral_decided_by_user_account"),
        ),
        sa.ForeignKeyConstraint(
            ["from_org_id"],
            ["organization.id"],
            name=op.f("fk_collab_referral_from_org_id_organization"),
        ),
        sa.ForeignKeyConstraint(
            ["from_user_id"],
            ["user_account.id"],
            name=op.f("fk_collab_referral_from_user_id_user_account"),
        ),
        sa.ForeignKeyConstraint(
            ["revoked_by"],
            ["user_account.id"],
            name=op.f("fk_collab_referral_revoked_by_user_account"),
        ),
        sa.ForeignKeyConstraint(
            ["to_org_id"],
            ["organization.id"],
            name=op.f("fk_collab_referral_to_org_id_organization"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collab_referral")),
        sa.UniqueConstraint(
            "service_request_id", name=op.f("uq_collab_referral_service_request_id")
        ),
        sa.UniqueConstraint("task_id", name=op.f("uq_collab_referral_task_id")),
    )
    with op.batch_alter_table("collab_referral", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_collab_referral_from_org_id"), ["from_org_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_collab_referral_patient_id"), ["patient_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_collab_referral_to_org_id"), ["to_org_id"], unique=False
        )

    op.create_table(
        "collab_schedule",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("practitioner_id", sa.String(length=64), nullable=False),
        sa.Column("owner_user_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organization.id"], name=op.f("fk_collab_schedule_org_id_organization")
        ),
        sa.ForeignKeyConstraint(
            ["owner_user_id"],
            ["user_account.id"],
            name=op.f("fk_collab_schedule_owner_user_id_user_account"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collab_schedule")),
    )
    with op.batch_alter_table("collab_schedule", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_collab_schedule_org_id"), ["org_id"], unique=False)

    op.create_table(
        "collab_consult_attachment",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("consult_id", sa.Uuid(), nullable=False),
        sa.Column("uploaded_by", sa.Uuid(), nullable=False),
        sa.Column("uploader_org_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("media_type", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("filename_enc", sa.LargeBinary(), nullable=False),
        sa.Column("content_enc", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("size > 0", name=op.f("ck_collab_consult_attachment_size_positive")),
        sa.ForeignKeyConstraint(
            ["consult_id"],
            ["collab_consult.id"],
            name=op.f("fk_collab_consult_attachment_consult_id_collab_consult"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["uploaded_by"],
            ["user_account.id"],
            name=op.f("fk_collab_consult_attachment_uploaded_by_user_account"),
        ),
        sa.ForeignKeyConstraint(
            ["uploader_org_id"],
            ["organization.id"],
            name=op.f("fk_collab_consult_attachment_uploader_org_id_organization"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collab_consult_attachment")),
    )
    with op.batch_alter_table("collab_consult_attachment", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_collab_consult_attachment_consult_id_created_at"),
            ["consult_id", "created_at"],
            unique=False,
        )

    op.create_table(
        "collab_consult_invitation",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("consult_id", sa.Uuid(), nullable=False),
        sa.Column("invitee_user_id", sa.Uuid(), nullable=False),
        sa.Column("invitee_org_id", sa.Uuid(), nullable=False),
        sa.Column("invited_by", sa.Uuid(), nullable=False),
        sa.Column("basis", sa.String(length=200), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "accepted",
                "declined",
                "revoked",
                name="invitation_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("created_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("decided_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "expires_at > created_at",
            name=op.f("ck_collab_consult_invitation_expires_after_creation"),
        ),
        sa.ForeignKeyConstraint(
            ["consult_id"],
            ["collab_consult.id"],
            name=op.f("fk_collab_consult_invitation_consult_id_collab_consult"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["invited_by"],
            ["user_account.id"],
            name=op.f("fk_collab_consult_invitation_invited_by_user_account"),
        ),
        sa.ForeignKeyConstraint(
            ["invitee_org_id"],
            ["organization.id"],
            name=op.f("fk_collab_consult_invitation_invitee_org_id_organization"),
        ),
        sa.ForeignKeyConstraint(
            ["invitee_user_id"],
            ["user_account.id"],
            name=op.f("fk_collab_consult_invitation_invitee_user_id_user_account"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collab_consult_invitation")),
    )
    with op.batch_alter_table("collab_consult_invitation", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_collab_consult_invitation_consult_id_invitee_user_id"),
            ["consult_id", "invitee_user_id"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_collab_consult_invitation_invitee_user_id"),
            ["invitee_user_id"],
            unique=False,
        )

    op.create_table(
        "collab_consult_message",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("consult_id", sa.Uuid(), nullable=False),
        sa.Column("author_user_id", sa.Uuid(), nullable=False),
        sa.Column("author_org_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("body_enc", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["author_org_id"],
            ["organization.id"],
            name=op.f("fk_collab_consult_message_author_org_id_organization"),
        ),
        sa.ForeignKeyConstraint(
            ["author_user_id"],
            ["user_account.id"],
            name=op.f("fk_collab_consult_message_author_user_id_user_account"),
        ),
        sa.ForeignKeyConstraint(
            ["consult_id"],
            ["collab_consult.id"],
            name=op.f("fk_collab_consult_message_consult_id_collab_consult"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collab_consult_message")),
    )
    with op.batch_alter_table("collab_consult_message", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_collab_consult_message_consult_id_created_at"),
            ["consult_id", "created_at"],
            unique=False,
        )

    op.create_table(
        "collab_consult_participant",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("consult_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column(
            "role",
            sa.Enum(
                "owner",
                "member",
                name="participant_role",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("joined_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["consult_id"],
            ["collab_consult.id"],
            name=op.f("fk_collab_consult_participant_consult_id_collab_consult"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organization.id"],
            name=op.f("fk_collab_consult_participant_org_id_organization"),
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user_account.id"],
            name=op.f("fk_collab_consult_participant_user_id_user_account"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collab_consult_participant")),
        sa.UniqueConstraint(
            "consult_id", "user_id", name=op.f("uq_collab_consult_participant_consult_id_user_id")
        ),
    )
    with op.batch_alter_table("collab_consult_participant", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_collab_consult_participant_user_id"), ["user_id"], unique=False
        )

    op.create_table(
        "collab_slot",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("schedule_id", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("starts_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("ends_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "free",
                "busy",
                name="slot_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("appointment_id", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "(status = 'free' AND appointment_id IS NULL) OR (status = 'busy' AND appointment_id IS NOT NULL)",
            name=op.f("ck_collab_slot_busy_iff_booked"),
        ),
        sa.CheckConstraint("ends_at > starts_at", name=op.f("ck_collab_slot_period_not_empty")),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organization.id"], name=op.f("fk_collab_slot_org_id_organization")
        ),
        sa.ForeignKeyConstraint(
            ["schedule_id"],
            ["collab_schedule.id"],
            name=op.f("fk_collab_slot_schedule_id_collab_schedule"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collab_slot")),
    )
    with op.batch_alter_table("collab_slot", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_collab_slot_org_id_starts_at"), ["org_id", "starts_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_collab_slot_schedule_id_starts_at"),
            ["schedule_id", "starts_at"],
            unique=False,
        )

    op.create_table(
        "collab_appointment",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("slot_id", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("booked_by", sa.Uuid(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "booked",
                "cancelled",
                name="appointment_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("created_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", medcollab.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("cancelled_by", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(
            ["booked_by"],
            ["user_account.id"],
            name=op.f("fk_collab_appointment_booked_by_user_account"),
        ),
        sa.ForeignKeyConstraint(
            ["cancelled_by"],
            ["user_account.id"],
            name=op.f("fk_collab_appointment_cancelled_by_user_account"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organization.id"], name=op.f("fk_collab_appointment_org_id_organization")
        ),
        sa.ForeignKeyConstraint(
            ["slot_id"], ["collab_slot.id"], name=op.f("fk_collab_appointment_slot_id_collab_slot")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collab_appointment")),
    )
    with op.batch_alter_table("collab_appointment", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_collab_appointment_org_id"), ["org_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_collab_appointment_patient_id"), ["patient_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_collab_appointment_slot_id"), ["slot_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("collab_appointment", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_collab_appointment_slot_id"))
        batch_op.drop_index(batch_op.f("ix_collab_appointment_patient_id"))
        batch_op.drop_index(batch_op.f("ix_collab_appointment_org_id"))

    op.drop_table("collab_appointment")
    with op.batch_alter_table("collab_slot", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_collab_slot_schedule_id_starts_at"))
        batch_op.drop_index(batch_op.f("ix_collab_slot_org_id_starts_at"))

    op.drop_table("collab_slot")
    with op.batch_alter_table("collab_consult_participant", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_collab_consult_participant_user_id"))

    op.drop_table("collab_consult_participant")
    with op.batch_alter_table("collab_consult_message", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_collab_consult_message_consult_id_created_at"))

    op.drop_table("collab_consult_message")
    with op.batch_alter_table("collab_consult_invitation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_collab_consult_invitation_invitee_user_id"))
        batch_op.drop_index(batch_op.f("ix_collab_consult_invitation_consult_id_invitee_user_id"))

    op.drop_table("collab_consult_invitation")
    with op.batch_alter_table("collab_consult_attachment", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_collab_consult_attachment_consult_id_created_at"))

    op.drop_table("collab_consult_attachment")
    with op.batch_alter_table("collab_schedule", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_collab_schedule_org_id"))

    op.drop_table("collab_schedule")
    with op.batch_alter_table("collab_referral", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_collab_referral_to_org_id"))
        batch_op.drop_index(batch_op.f("ix_collab_referral_patient_id"))
        batch_op.drop_index(batch_op.f("ix_collab_referral_from_org_id"))

    op.drop_table("collab_referral")
    with op.batch_alter_table("collab_consult", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_collab_consult_patient_id"))
        batch_op.drop_index(batch_op.f("ix_collab_consult_org_id"))

    op.drop_table("collab_consult")
