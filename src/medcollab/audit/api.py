"""HTTP access to the audit log.

* ``GET /audit/checkpoint`` (public): the latest signed tree head, a C2SP checkpoint note. Anyone can
  keep copies and later check that the log only grew.
* ``GET /me/access-history`` (patients; guardians for a ward with ``?patient=``): who accessed the
  patient's data, newest first, paged, each entry with its sequence number and an inclusion proof
  against the latest signed head. Staff appear only as display name, role and organisation.
* ``GET /fhir/R4/AuditEvent`` and ``/fhir/R4/AuditEvent/{id}`` (security officers and auditors):
  the events as FHIR AuditEvent, searchable by patient, agent, date, outcome and type.
"""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from medcollab.api.deps import CurrentActor, DbSession, RuntimeDep, permitted
from medcollab.audit.fhir import to_audit_event
from medcollab.audit.models import AuditEventPatient, AuditEventRecord
from medcollab.audit.services import AuditLog
from medcollab.errors import InvalidInput, NotFound, PermissionDenied
from medcollab.identity.models import FhirLinkKind, Membership, Organization, User, UserFhirLink
from medcollab.identity.services import UserService, require
from medcollab.kernel.context import Actor
from medcollab.kernel.permissions import Permission
from medcollab.records.search_params import date_range

router = APIRouter(tags=["audit"])
public_router = APIRouter(tags=["audit"])
fhir_router = APIRouter(prefix="/fhir/R4/AuditEvent", tags=["audit"])

MAX_PAGE: Final = 100
#: Events a patient sees in their access history: accesses to their record and emergency grants.
HISTORY_TYPES: Final = (
    "fhir:resource:read",
    "fhir:resource:vread",
    "fhir:resource:history",
    "fhir:resource:search",
    "fhir:resource:create",
    "fhir:resource:update",
    "fhir:resource:delete",
    "fhir:patient:everything",
    "fhir:patient:export",
    "access:break-glass:granted",
    # Collaboration steps that concern the patient (medcollab.collaboration).
    "collab:referral:created",
    "collab:referral:accepted",
    "collab:referral:declined",
    "collab:referral:revoked",
    "collab:referral:listed",
    "collab:consultation:created",
    "collab:consultation:invited",
    "collab:consultation:invitation-refused",
    "collab:consultation:joined",
    "collab:consultation:declined",
    "collab:consultation:read",
    "collab:consultation:message-posted",
    "collab:consultation:attachment-added",
    "collab:consultation:attachment-read",
    "collab:consultation:closed",
    "collab:consultation:archived",
    "collab:consultation:access-denied",
    "collab:appointment:booked",
    "collab:appointment:booking-refused",
    "collab:appointment:cancelled",
    "collab:appointment:listed",
    # Imaging (medcollab.imaging).
    "imaging:study:uploaded",
    "imaging:instance:downloaded",
    "imaging:study:shared",
    "imaging:instance:deidentified-download",
)
_ACTIONS: Final = {
    "read": "read",
    "vread": "read",
    "history": "read",
    "search": "search",
    "everything": "read",
    "export": "export",
    "create": "create",
    "update": "update",
    "delete": "delete",
    "granted": "emergency access granted",
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# Checkpoint ------------------------------------------------------------------------------------------


@public_router.get("/audit/checkpoint", response_class=PlainTextResponse)
def checkpoint(db: DbSession) -> PlainTextResponse:
    """The latest signed tree head as a C2SP checkpoint (text/plain)."""
    head = AuditLog(db).latest_tree_head()
    if head is None:
        raise NotFound("no tree head has been issued yet")
    return PlainTextResponse(head.note, media_type="text/plain; charset=utf-8")


# Access history -------------------------------------------------------------------------------------


class Proof(BaseModel):
    format: str = "medcollab-audit-inclusion-proof/v1"
    origin: str
    seq: int
    leaf_index: int
    tree_size: int
    leaf_hash: str
    inclusion_path: list[str]
    root_hash: str
    checkpoint: str


class HistoryEntry(BaseModel):
    seq: int
    recorded: datetime
    who: str
    role: str
    organization: str | None
    action: str
    resource_types: list[str]
    purpose: str | None
    break_glass: bool
    denied: bool
    #: Absent until the event has been integrated into a signed tree head (within seconds).
    proof: Proof | None


class HistoryPage(BaseModel):
    patient_id: str
    total: int
    offset: int
    count: int
    checkpoint: str | None
    entries: list[HistoryEntry]


def _patient_for(db: Session, actor: Actor, patient: str | None) -> str:
    """The patient whose history the actor may see: their own, or a ward's (guardians)."""
    require(actor, Permission.OWN_ACCESS_HISTORY_READ)
    links = db.execute(
        select(UserFhirLink.kind, UserFhirLink.resource_id).where(
            UserFhirLink.user_id == actor.user_id
        )
    ).all()
    own = [rid for kind, rid in links if kind is FhirLinkKind.PATIENT]
    wards = {rid for kind, rid in links if kind is FhirLinkKind.GUARDIAN}
    if patient is None:
        if own:
            return own[0]
        if len(wards) == 1:
            return next(iter(wards))
        raise InvalidInput("name the patient with ?patient= (you are guardian of several)")
    if patient in own or patient in wards:
        return patient
    raise NotFound("no access history for that patient")


def _describe(
    db: Session, record: AuditEventRecord, users: UserService
) -> tuple[str, str, str | None]:
    body = record.body
    agent = body.get("agent") or {}
    assert isinstance(agent, dict)  # noqa: S101 - event_body() always writes a mapping.
    role = str(agent.get("role") or "")
    if record.agent_user_id is None:
        return (role or "system", role or "system", None)
    user = db.get(User, record.agent_user_id)
    name = users.display_name(user) if user else "former user"
    org = db.get(Organization, record.agent_org_id) if record.agent_org_id else None
    return (name, role, org.name if org else None)


def _entry(
    *,
    db: Session,
    record: AuditEventRecord,
    users: UserService,
    log: AuditLog,
    head_size: int,
    head_note: str | None,
) -> HistoryEntry:
    body = record.body
    entity = body.get("entity") or {}
    assert isinstance(entity, dict)  # noqa: S101
    who, role, org = _describe(db, record, users)
    verb = record.type.rsplit(":", 1)[-1]
    proof = None
    if record.leaf_index is not None and record.leaf_index < head_size and head_note is not None:
        event_proof = log.event_proof(record.seq)
        # The event body is withheld: it names the clinician's address and session and, for
        # searches, other patients. The leaf hash commits to it; the path proves its inclusion.
        proof = Proof(
            origin=event_proof.origin,
            seq=record.seq,
            leaf_index=event_proof.leaf_index,
            tree_size=event_proof.tree_size,
            leaf_hash=_b64(event_proof.leaf_hash),
            inclusion_path=[_b64(h) for h in event_proof.inclusion_path],
            root_hash=_b64(event_proof.root_hash),
            checkpoint=event_proof.checkpoint,
        )
    resource_type = entity.get("type")
    return HistoryEntry(
        seq=record.seq,
        recorded=record.recorded_at,
        who=who,
        role=role,
        organization=org,
        action=_ACTIONS.get(verb, verb),
        resource_types=[str(resource_type)] if resource_type else [],
        purpose=body.get("purpose") if isinstance(body.get("purpose"), str) else None,
        break_glass=bool(body.get("break_glass")),
        denied=record.outcome != "0",
        proof=proof,
    )


@router.get("/me/access-history", response_model=HistoryPage)
def access_history(
    *,
    actor: CurrentActor,
    db: DbSession,
    runtime: RuntimeDep,
    patient: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9\-.]+$")] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    count: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
) -> HistoryPage:
    patient_id = _patient_for(db, actor, patient)
    query = (
        select(AuditEventRecord)
        .join(AuditEventPatient, AuditEventPatient.seq == AuditEventRecord.seq)
        .where(
            AuditEventPatient.patient_id == patient_id,
            AuditEventRecord.type.in_(HISTORY_TYPES),
            # The patient's own accesses are theirs to remember; the history shows the others.
            (AuditEventRecord.agent_user_id.is_(None))
            | (AuditEventRecord.agent_user_id != actor.user_id),
        )
    )
    total = db.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db.scalars(query.order_by(AuditEventRecord.seq.desc()).offset(offset).limit(count)).all()
    log = AuditLog(db, signer=runtime.log_signer, clock=runtime.clock)
    head = log.latest_tree_head()
    users = UserService(session=db, runtime=runtime)
    entries = [
        _entry(
            db=db,
            record=r,
            users=users,
            log=log,
            head_size=head.size if head else 0,
            head_note=head.note if head else None,
        )
        for r in rows
    ]
    return HistoryPage(
        patient_id=patient_id,
        total=total,
        offset=offset,
        count=count,
        checkpoint=head.note if head else None,
        entries=entries,
    )


# FHIR AuditEvent for officers ---------------------------------------------------------------------

AuditReader = Annotated[Actor, Depends(permitted(Permission.AUDIT_LOG_READ))]


def _scope(actor: Actor) -> Any:
    """Officers see events of their own organisations: acts by their members, or by the named
    system contexts on their behalf, never another tenant's."""
    orgs = require(actor, Permission.AUDIT_LOG_READ)
    members = select(Membership.user_id).where(Membership.org_id.in_(orgs))
    return or_(
        AuditEventRecord.agent_org_id.in_(orgs),
        AuditEventRecord.agent_user_id.in_(members),
        AuditEventRecord.subject_user_id.in_(members),
        AuditEventRecord.subject_org_id.in_(orgs)
        if hasattr(AuditEventRecord, "subject_org_id")
        else AuditEventRecord.agent_org_id.in_(orgs),
    )


def _fhir(content: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(content, status_code=status, media_type="application/fhir+json")


def _date_filter(values: list[str]) -> list[Any]:
    conditions = []
    for raw in values:
        prefix, text = ("eq", raw)
        if raw[:2] in ("eq", "gt", "lt", "ge", "le"):
            prefix, text = raw[:2], raw[2:]
        bounds = date_range(text)
        if bounds is None:
            raise InvalidInput("date must be YYYY, YYYY-MM, YYYY-MM-DD or a dateTime")
        low, high = bounds
        column = AuditEventRecord.recorded_at
        conditions.append(
            {
                "eq": and_(column >= low, column <= high),
                "gt": column > high,
                "lt": column < low,
                "ge": column >= low,
                "le": column <= high,
            }[prefix]
        )
    return conditions


@fhir_router.get("")
def search_audit_events(
    *,
    actor: AuditReader,
    db: DbSession,
    patient: Annotated[str | None, Query(max_length=64)] = None,
    agent: Annotated[str | None, Query(max_length=64)] = None,
    date: Annotated[list[str] | None, Query()] = None,
    outcome: Annotated[str | None, Query(max_length=4)] = None,
    type: Annotated[str | None, Query(max_length=64)] = None,  # noqa: A002 - FHIR's name.
    _count: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    _offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> JSONResponse:
    """Search the audit log: events by the members of the caller's organisations."""
    query: Select[AuditEventRecord] = select(AuditEventRecord).where(_scope(actor))
    if patient:
        query = query.join(AuditEventPatient, AuditEventPatient.seq == AuditEventRecord.seq).where(
            AuditEventPatient.patient_id == patient.removeprefix("Patient/")
        )
    if agent:
        try:
            query = query.where(AuditEventRecord.agent_user_id == uuid.UUID(agent.split(":")[-1]))
        except ValueError:
            raise InvalidInput("agent must be a user id") from None
    if outcome:
        query = query.where(AuditEventRecord.outcome == outcome)
    if type:
        query = query.where(AuditEventRecord.type == type.split("|")[-1])
    for condition in _date_filter(date or []):
        query = query.where(condition)
    total = db.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db.scalars(query.order_by(AuditEventRecord.seq.desc()).offset(_offset).limit(_count))
    return _fhir(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "entry": [
                {
                    "fullUrl": f"/fhir/R4/AuditEvent/{r.seq}",
                    "resource": to_audit_event(r),
                    "search": {"mode": "match"},
                }
                for r in rows
            ],
        }
    )


@fhir_router.get("/{seq}")
def read_audit_event(seq: int, actor: AuditReader, db: DbSession) -> JSONResponse:
    record = db.scalar(select(AuditEventRecord).where(AuditEventRecord.seq == seq, _scope(actor)))
    if record is None:
        raise NotFound(f"AuditEvent/{seq} not found")
    return _fhir(to_audit_event(record))


@fhir_router.api_route("", methods=["POST", "PUT", "DELETE", "PATCH"])
@fhir_router.api_route("/{seq}", methods=["POST", "PUT", "DELETE", "PATCH"])
def refuse_audit_writes(actor: CurrentActor) -> Response:
    """The audit log is append-only and written only by the platform itself."""
    del actor
    raise PermissionDenied("the audit log cannot be written through the API")
