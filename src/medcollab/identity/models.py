"""Identity tables.

Nothing secret is stored in a usable form: passwords are Argon2id hashes, TOTP secrets are AES-GCM
encrypted and bound to their user, session and MFA-challenge tokens and recovery codes are keyed
HMACs, and client addresses in the throttle table are keyed HMACs too.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Enum,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from medcollab.db.base import Base
from medcollab.db.types import UTCDateTime
from medcollab.kernel.permissions import Role


class OrgKind(StrEnum):
    HOSPITAL = "hospital"
    CLINIC = "clinic"
    LAB = "lab"
    RESEARCH = "research"
    PARTNER = "partner"


class SessionKind(StrEnum):
    API = "api"
    WEB = "web"


def _enum(enum_cls: type[StrEnum], name: str) -> Enum:
    # Stored as VARCHAR with a CHECK constraint: portable, and adding a value is a plain migration.
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [m.value for m in members],
    )


class Organization(Base):
    __tablename__ = "organization"
    __repr_fields__ = ("id", "code", "kind", "region")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    #: A short stable handle (e.g. ``SH-RJH``) used by the CLI and in configuration.
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[OrgKind] = mapped_column(_enum(OrgKind, "org_kind"))
    #: ISO 3166-1 alpha-2 country or a bloc code such as EU.
    region: Mapped[str] = mapped_column(String(8))
    #: Overrides the deployment's jurisdiction profile for this organisation, when set.
    jurisdiction: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class User(Base):
    __tablename__ = "user_account"
    __repr_fields__ = ("id", "disabled")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    #: NFKC-normalised, case-folded login name.
    username: Mapped[str] = mapped_column(String(64), unique=True)
    #: AES-GCM ciphertext of the display name, bound to this user id: a name is personal data.
    display_name_enc: Mapped[bytes] = mapped_column(LargeBinary())
    password_hash: Mapped[str] = mapped_column(String(255))
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: AES-GCM ciphertext of the TOTP secret, bound to this user id. None: no authenticator.
    totp_secret_enc: Mapped[bytes | None] = mapped_column(LargeBinary())
    #: A self-service enrolment in progress: sealed like ``totp_secret_enc``, it becomes the
    #: authenticator only when a code from it is confirmed, so an abandoned enrolment never
    #: locks its owner out.
    totp_pending_enc: Mapped[bytes | None] = mapped_column(LargeBinary())
    #: When the authenticator was proven with a first valid code. None: provisioned, not confirmed.
    mfa_confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: The last accepted TOTP time step; a code for this step or an earlier one is a replay.
    totp_last_step: Mapped[int] = mapped_column(Integer(), default=0)
    disabled: Mapped[bool] = mapped_column(Boolean(), default=False)
    #: Privacy training is current; lapsed training denies PHI (filled by the compliance work).
    training_current: Mapped[bool] = mapped_column(Boolean(), default=True)
    #: A "freeze" sanction denies PHI until lifted.
    sanction_frozen: Mapped[bool] = mapped_column(Boolean(), default=False)
    #: Account lockout after repeated failures; also kept in the throttle table by username.
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="user", cascade="all, delete-orphan", lazy="selectin"
    )

    @property
    def roles(self) -> frozenset[Role]:
        return frozenset(m.role for m in self.memberships)


class Membership(Base):
    """A role a user holds in an organisation. A user may hold several, in several organisations."""

    __tablename__ = "membership"
    __table_args__ = (UniqueConstraint("user_id", "org_id", "role"),)
    __repr_fields__ = ("user_id", "org_id", "role")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"))
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organization.id"), index=True)
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship(back_populates="memberships")
    organization: Mapped[Organization] = relationship(lazy="joined")


class FhirLinkKind(StrEnum):
    PATIENT = "patient"
    GUARDIAN = "guardian"
    PRACTITIONER = "practitioner"


class UserFhirLink(Base):
    """Links an account to FHIR resources: a patient to its Patient, a guardian to each ward's
    Patient, a clinician to its Practitioner."""

    __tablename__ = "user_fhir_link"
    __table_args__ = (UniqueConstraint("user_id", "kind", "resource_id"),)
    __repr_fields__ = ("user_id", "kind", "resource_id")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user_account.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[FhirLinkKind] = mapped_column(_enum(FhirLinkKind, "fhir_link_kind"))
    resource_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RecoveryCode(Base):
    __tablename__ = "recovery_code"
    __repr_fields__ = ("id", "user_id", "used_at")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user_account.id", ondelete="CASCADE"), index=True
    )
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuthSession(Base):
    """A signed-in session. Only the keyed hash of its token is stored."""

    __tablename__ = "auth_session"
    __repr_fields__ = ("id", "user_id", "kind", "revoked_at")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user_account.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[SessionKind] = mapped_column(_enum(SessionKind, "session_kind"))
    #: A session of a staff account without a confirmed authenticator may only enrol one.
    enrollment_only: Mapped[bool] = mapped_column(Boolean(), default=False)
    mfa_verified: Mapped[bool] = mapped_column(Boolean(), default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    idle_timeout_seconds: Mapped[int] = mapped_column(Integer())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_reason: Mapped[str | None] = mapped_column(String(32))
    #: Keyed hash of the CSRF token of a web session; None for API sessions.
    csrf_hash: Mapped[str | None] = mapped_column(String(64))
    client_hash: Mapped[str | None] = mapped_column(String(64))


class MfaChallenge(Base):
    """The second step of a login: issued after a correct password, consumed by a correct code."""

    __tablename__ = "mfa_challenge"
    __repr_fields__ = ("id", "user_id", "used_at")

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user_account.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[SessionKind] = mapped_column(_enum(SessionKind, "challenge_kind"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Throttle(Base):
    """Consecutive authentication failures per key.

    Keys are ``user:<hmac(username)>`` (whether or not the account exists, so a lockout says nothing
    about existence) and ``addr:<hmac(client address)>``.
    """

    __tablename__ = "auth_throttle"
    __table_args__ = (CheckConstraint("failures >= 0", name="failures_non_negative"),)
    __repr_fields__ = ("key", "failures", "blocked_until")

    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer(), default=0)
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    blocked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
