"""Audit event vocabulary: event types are ``"source:subject:action"`` tags, outcomes a fixed enum.

Events are shaped after FHIR AuditEvent / IHE BALP and carry pseudonymous identifiers only: user and
organisation ids, a keyed hash of the session and of the client address, never names, passwords,
tokens, codes or clinical content. An :class:`AuditEvent` of an unknown type cannot be built.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Final


class EventType(StrEnum):
    LOGIN_SUCCESS = "auth:login:success"
    LOGIN_FAILURE = "auth:login:failure"
    LOGIN_THROTTLED = "auth:login:throttled"
    ACCOUNT_LOCKED = "auth:account:locked"
    MFA_SUCCESS = "auth:mfa:success"
    MFA_FAILURE = "auth:mfa:failure"
    MFA_REPLAY = "auth:mfa:replay"
    MFA_RECOVERY_CODE_USED = "auth:mfa:recovery-code-used"
    MFA_ENROLL_STARTED = "auth:mfa:enroll-started"
    MFA_ENROLLED = "auth:mfa:enrolled"
    MFA_RESET = "auth:mfa:reset"
    LOGOUT = "auth:session:logout"
    SESSION_EXPIRED = "auth:session:expired"
    SESSIONS_REVOKED = "auth:session:revoked"
    PASSWORD_CHANGED = "auth:password:changed"  # noqa: S105 - an event name, not a secret.
    USER_CREATED = "admin:user:created"
    USER_DISABLED = "admin:user:disabled"
    ROLE_GRANTED = "admin:role:granted"
    ORG_CREATED = "admin:org:created"
    ACCESS_DENIED = "access:request:denied"
    ACCESS_EXPLAINED = "access:decision:explained"
    # Clinical record access (FHIR interactions), one event per decision, permit or deny.
    FHIR_READ = "fhir:resource:read"
    FHIR_VREAD = "fhir:resource:vread"
    FHIR_HISTORY = "fhir:resource:history"
    FHIR_SEARCH = "fhir:resource:search"
    FHIR_CREATE = "fhir:resource:create"
    FHIR_UPDATE = "fhir:resource:update"
    FHIR_DELETE = "fhir:resource:delete"
    FHIR_TRANSACTION = "fhir:bundle:transaction"
    FHIR_EVERYTHING = "fhir:patient:everything"
    FHIR_EXPORT = "fhir:patient:export"
    RECORD_INTEGRITY_FAILURE = "fhir:resource:integrity-failure"
    BREAK_GLASS_GRANTED = "access:break-glass:granted"
    BREAK_GLASS_REVIEWED = "access:break-glass:reviewed"
    CONSENT_CHANGED = "consent:patient:changed"
    KEYS_ROTATED = "security:keys:rotated"
    KEYS_SHREDDED = "security:keys:shredded"
    # Collaboration (medcollab.collaboration): each step names the patient it concerns.
    REFERRAL_CREATED = "collab:referral:created"
    REFERRAL_ACCEPTED = "collab:referral:accepted"
    REFERRAL_DECLINED = "collab:referral:declined"
    REFERRAL_REVOKED = "collab:referral:revoked"
    REFERRAL_LISTED = "collab:referral:listed"
    CONSULTATION_CREATED = "collab:consultation:created"
    CONSULTATION_INVITED = "collab:consultation:invited"
    CONSULTATION_INVITATION_REFUSED = "collab:consultation:invitation-refused"
    CONSULTATION_JOINED = "collab:consultation:joined"
    CONSULTATION_DECLINED = "collab:consultation:declined"
    CONSULTATION_READ = "collab:consultation:read"
    CONSULTATION_MESSAGE_POSTED = "collab:consultation:message-posted"
    CONSULTATION_ATTACHMENT_ADDED = "collab:consultation:attachment-added"
    CONSULTATION_ATTACHMENT_READ = "collab:consultation:attachment-read"
    CONSULTATION_CLOSED = "collab:consultation:closed"
    CONSULTATION_ARCHIVED = "collab:consultation:archived"
    CONSULTATION_ACCESS_DENIED = "collab:consultation:access-denied"
    SCHEDULE_PUBLISHED = "collab:schedule:published"
    APPOINTMENT_BOOKED = "collab:appointment:booked"
    APPOINTMENT_BOOKING_REFUSED = "collab:appointment:booking-refused"
    APPOINTMENT_CANCELLED = "collab:appointment:cancelled"
    APPOINTMENT_LISTED = "collab:appointment:listed"
    # Imaging (medcollab.imaging): each names the patient and the ImagingStudy.
    IMAGING_UPLOADED = "imaging:study:uploaded"
    IMAGING_DOWNLOADED = "imaging:instance:downloaded"
    IMAGING_SHARED = "imaging:study:shared"
    IMAGING_DEIDENTIFIED_DOWNLOADED = "imaging:instance:deidentified-download"


class Outcome(StrEnum):
    """FHIR AuditEvent.outcome codes (http://hl7.org/fhir/audit-event-outcome)."""

    SUCCESS = "0"
    MINOR_FAILURE = "4"
    SERIOUS_FAILURE = "8"
    MAJOR_FAILURE = "12"


#: FHIR AuditEvent.action for each event: C(reate), R(ead), U(pdate), D(elete), E(xecute).
EVENT_ACTIONS: Final[MappingProxyType[EventType, str]] = MappingProxyType(
    {
        **dict.fromkeys(EventType, "E"),
        EventType.USER_CREATED: "C",
        EventType.ORG_CREATED: "C",
        EventType.USER_DISABLED: "U",
        EventType.ROLE_GRANTED: "U",
        EventType.MFA_RESET: "U",
        EventType.PASSWORD_CHANGED: "U",
        EventType.FHIR_READ: "R",
        EventType.FHIR_VREAD: "R",
        EventType.FHIR_HISTORY: "R",
        EventType.FHIR_SEARCH: "E",
        EventType.FHIR_CREATE: "C",
        EventType.FHIR_UPDATE: "U",
        EventType.FHIR_DELETE: "D",
        EventType.FHIR_EVERYTHING: "R",
        EventType.FHIR_EXPORT: "R",
        EventType.CONSENT_CHANGED: "U",
        EventType.IMAGING_UPLOADED: "C",
        EventType.IMAGING_DOWNLOADED: "R",
        EventType.IMAGING_DEIDENTIFIED_DOWNLOADED: "R",
    }
)


@dataclass(frozen=True, slots=True)
class Agent:
    """Who acted. Every field is a pseudonymous identifier or a coded value."""

    user_id: uuid.UUID | None = None
    org_id: uuid.UUID | None = None
    role: str | None = None
    session_hash: str | None = None
    client_address: str | None = None
    user_agent: str | None = None


@dataclass(frozen=True, slots=True)
class Entity:
    """What was accessed: ids and codes only, never content.

    For searches, ``query`` holds the parameters with identifying values already replaced by their
    blind index, and ``patients`` the patients whose data the answer contained.
    """

    patient_id: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    version: int | None = None
    query: tuple[tuple[str, str], ...] = ()
    patients: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditEvent:
    type: EventType
    outcome: Outcome
    recorded_at: datetime
    agent: Agent = field(default_factory=Agent)
    #: The user, organisation or patient the event is about (ids only).
    subject_user_id: uuid.UUID | None = None
    subject_org_id: uuid.UUID | None = None
    reasons: tuple[str, ...] = ()
    entity: Entity | None = None
    #: HL7 v3 PurposeOfUse code under which the access happened.
    purpose: str | None = None
    break_glass: bool = False

    def __post_init__(self) -> None:
        # Refuse look-alike strings: only members of the enums are events.
        if not isinstance(self.type, EventType):
            raise TypeError(f"unknown audit event type: {self.type!r}")
        if not isinstance(self.outcome, Outcome):
            raise TypeError(f"unknown audit outcome: {self.outcome!r}")
        if self.recorded_at.tzinfo is None:
            raise ValueError("audit events are recorded in UTC")

    @property
    def action(self) -> str:
        return EVENT_ACTIONS[self.type]
