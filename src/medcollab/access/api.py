"""``GET /admin/access/explain``: why a user may or may not reach a patient's data."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from medcollab.access.explain import explain
from medcollab.access.policy import Action, Purpose
from medcollab.api.deps import DbSession, RuntimeDep, permitted
from medcollab.identity.services import agent_for, require
from medcollab.kernel.context import Actor
from medcollab.kernel.permissions import Permission, Role

router = APIRouter(prefix="/admin/access", tags=["admin"])
Explainer = Annotated[Actor, Depends(permitted(Permission.ACCESS_DECISION_EXPLAIN))]


class ExplainOut(BaseModel):
    user_id: uuid.UUID
    organization: str
    purpose: Purpose
    action: Action
    resource_type: str
    patient_id: str | None
    permitted: bool
    reasons: list[str]
    break_glass: bool
    consent_overridden: bool


@router.get("/explain", response_model=ExplainOut)
def explain_access(  # noqa: PLR0917 - FastAPI binds each query parameter to an argument.
    actor: Explainer,
    db: DbSession,
    runtime: RuntimeDep,
    user: Annotated[uuid.UUID, Query()],
    action: Annotated[Action, Query()],
    type: Annotated[str, Query(min_length=1, max_length=64, pattern=r"^[A-Z][A-Za-z]+$")],  # noqa: A002
    patient: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9\-.]+$")] = None,
    org: Annotated[str | None, Query(max_length=32)] = None,
    purpose: Annotated[Purpose | None, Query()] = None,
) -> ExplainOut:
    scope = (
        None
        if Role.PLATFORM_ADMIN in actor.roles
        else require(actor, Permission.ACCESS_DECISION_EXPLAIN)
    )
    result = explain(
        db,
        runtime,
        user_id=user,
        patient_id=patient,
        action=action,
        resource_type=type,
        org_code=org,
        purpose=purpose,
        agent=agent_for(actor),
        allowed_orgs=scope,
    )
    d = result.decision
    return ExplainOut(
        user_id=result.user_id,
        organization=result.org_code,
        purpose=result.purpose,
        action=action,
        resource_type=type,
        patient_id=patient,
        permitted=d.permitted,
        reasons=list(d.reasons),
        break_glass=d.break_glass,
        consent_overridden=d.consent_overridden,
    )
