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
class AuditEvent:
    type: EventType
    outcome: Outcome
    recorded_at: datetime
    agent: Agent = field(default_factory=Agent)
    #: The user, organisation or patient the event is about (ids only).
    subject_user_id: uuid.UUID | None = None
    subject_org_id: uuid.UUID | None = None
    reasons: tuple[str, ...] = ()

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
