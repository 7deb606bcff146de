"""Explaining access decisions: "could user U do A on patient P's T, and why (not)?".

The explanation runs the same policy with the same facts as a real request (relationships,
consents, grants, the user's flags and roles in the chosen organisation), reads no clinical data,
and is itself audited.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy.orm import Session

from medcollab.access.context import AccessContext
from medcollab.access.policy import Action, Decision, Purpose, default_purpose
from medcollab.audit.events import Agent, AuditEvent, Entity, EventType, Outcome
from medcollab.audit.services import AuditLog
from medcollab.errors import InvalidInput, NotFound
from medcollab.identity.models import User
from medcollab.jurisdiction.profiles import effective_profile
from medcollab.records.repository import RecordRepository
from medcollab.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Explanation:
    user_id: uuid.UUID
    org_code: str
    purpose: Purpose
    decision: Decision


def explain(
    session: Session,
    runtime: Runtime,
    *,
    user_id: uuid.UUID,
    patient_id: str | None,
    action: Action,
    resource_type: str,
    org_code: str | None,
    purpose: Purpose | None,
    agent: Agent,
    allowed_orgs: frozenset[uuid.UUID] | None = None,
) -> Explanation:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound("no such user")
    grants = sorted(user.memberships, key=lambda m: m.organization.code)
    if allowed_orgs is not None:
        grants = [m for m in grants if m.org_id in allowed_orgs]
    if org_code:
        grants = [m for m in grants if m.organization.code == org_code.strip().upper()]
    if not grants:
        raise NotFound("the user holds no role in that organisation (or is not visible to you)")
    org = grants[0].organization
    roles = frozenset(m.role for m in grants if m.org_id == org.id)
    chosen = purpose or default_purpose(roles)
    ctx = AccessContext(user_id=user.id, org_id=org.id, roles=roles, purpose=chosen)
    repo = RecordRepository(
        session=session,
        ctx=ctx,
        keys=runtime.key_service(session),
        keyring=runtime.keyring,
        clock=runtime.clock,
        settings=runtime.settings,
        profile=effective_profile(runtime.settings.jurisdiction, org.jurisdiction),
    )
    if not resource_type.isalpha():
        raise InvalidInput("resource type must be a FHIR type name such as Observation")
    decision = repo.explain(action, resource_type, patient_id)
    AuditLog(session).append(
        AuditEvent(
            type=EventType.ACCESS_EXPLAINED,
            outcome=Outcome.SUCCESS,
            recorded_at=runtime.clock.now(),
            agent=agent,
            subject_user_id=user.id,
            subject_org_id=org.id,
            reasons=(("permit" if decision.permitted else "deny"), *decision.reasons),
            entity=Entity(patient_id=patient_id, resource_type=resource_type),
            purpose=chosen.value,
        )
    )
    return Explanation(user.id, org.code, chosen, decision)
