"""Appending audit events."""

from __future__ import annotations

from sqlalchemy.orm import Session

from medcollab.audit.events import AuditEvent
from medcollab.audit.models import AuditEventRecord


def _body(event: AuditEvent) -> dict[str, object]:
    agent = event.agent
    return {
        "type": event.type.value,
        "action": event.action,
        "outcome": event.outcome.value,
        "recorded": event.recorded_at.isoformat(),
        "agent": {
            "user": str(agent.user_id) if agent.user_id else None,
            "org": str(agent.org_id) if agent.org_id else None,
            "role": agent.role,
            "session": agent.session_hash,
            "address": agent.client_address,
            "user_agent": agent.user_agent,
        },
        "subject_user": str(event.subject_user_id) if event.subject_user_id else None,
        "subject_org": str(event.subject_org_id) if event.subject_org_id else None,
        "reasons": list(event.reasons),
    }


class AuditLog:
    """Appends events in the caller's transaction, so an event and the change it records commit together."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def append(self, event: AuditEvent) -> AuditEventRecord:
        record = AuditEventRecord(
            recorded_at=event.recorded_at,
            type=event.type.value,
            action=event.action,
            outcome=event.outcome.value,
            agent_user_id=event.agent.user_id,
            agent_org_id=event.agent.org_id,
            subject_user_id=event.subject_user_id,
            body=_body(event),
        )
        self._session.add(record)
        self._session.flush()
        return record
