"""What the patient pages need beyond rendering: whose record, consents, notifications, proofs.

Clinical data (the record, Consent resources) is reached only through the request's
``RecordRepository``, exactly as the FHIR API reaches it: the repository decides, decrypts and
audits. The patient's own reads are audited too; the access history leaves them out because they
are the patient's own.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from medcollab.access.consents import directives
from medcollab.access.models import BreakGlassGrant, PatientNotification
from medcollab.access.policy import ConsentDirectives
from medcollab.audit.api import HISTORY_TYPES
from medcollab.audit.models import AuditEventPatient, AuditEventRecord, AuditTreeHead
from medcollab.audit.services import AuditLog, event_leaf_hash
from medcollab.crypto.keys import KeyRing, Purpose
from medcollab.errors import InvalidInput, NotFound
from medcollab.identity.models import FhirLinkKind, Organization, User
from medcollab.identity.services import UserService
from medcollab.kernel.clock import Clock
from medcollab.kernel.context import Actor
from medcollab.records.repository import RecordRepository
from medcollab.web.i18n import N_

CONSENT_SCOPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_CODE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
#: Identifies the one Consent the web app keeps for a patient's sharing choices.
WEB_DIRECTIVE_SYSTEM: Final = "urn:medcollab:web:privacy-directive"
#: HL7 v3 sensitivity codes a patient can withhold, with what they cover.
SENSITIVE_CATEGORIES: Final = {
    "PSY": N_("Mental health"),
    "HIV": N_("HIV/AIDS"),
    "ETH": N_("Substance use"),
    "GDIS": N_("Genetic information"),
    "STD": N_("Sexually transmitted diseases"),
    "SDV": N_("Sexual and domestic violence"),
    "SEX": N_("Sexuality and reproductive health"),
}


def patients_of(users: UserService, actor: Actor) -> list[str]:
    """The records this account may act for: its own first, then its wards'."""
    links = users.links_of(actor.user_id)
    own = [rid for kind, rid in links if kind is FhirLinkKind.PATIENT]
    wards = [rid for kind, rid in links if kind is FhirLinkKind.GUARDIAN]
    return own + wards


def chosen_patient(users: UserService, actor: Actor, requested: str | None) -> str:
    """The patient a page is about: the requested one if the account may act for it."""
    candidates = patients_of(users, actor)
    if not candidates:
        raise NotFound("this account is not linked to a patient record")
    if requested is None:
        return candidates[0]
    if requested in candidates:
        return requested
    raise NotFound("no such patient record for this account")


# Consents ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SharingState:
    directives: ConsentDirectives
    #: Active patient-privacy Consents as stored (body), the web's own first if it exists.
    consents: list[dict[str, Any]]


def _is_privacy(consent: dict[str, Any]) -> bool:
    scope = consent.get("scope") or {}
    return any(
        isinstance(c, dict) and c.get("code") == "patient-privacy"
        for c in scope.get("coding") or []
    )


def _is_web_directive(consent: dict[str, Any]) -> bool:
    return any(
        isinstance(i, dict) and i.get("system") == WEB_DIRECTIVE_SYSTEM
        for i in consent.get("identifier") or []
    )


def org_ids_by_code(db: Session) -> dict[str, str]:
    return {code: str(oid) for code, oid in db.execute(select(Organization.code, Organization.id))}


def sharing_state(
    repo: RecordRepository, db: Session, patient_id: str, now: datetime
) -> SharingState:
    page = repo.search("Consent", {"patient": [patient_id]}, count=100)
    bodies = [s.body for s in page.entries if s.body is not None]
    active = [b for b in bodies if b.get("status") == "active" and _is_privacy(b)]
    active.sort(key=lambda b: not _is_web_directive(b))
    return SharingState(directives(active, now, org_ids_by_code(db)), active)


def _directive_body(
    patient_id: str, denied_orgs: list[str], denied_labels: list[str], now: datetime
) -> dict[str, Any]:
    nested: list[dict[str, Any]] = []
    if denied_orgs:
        nested.append(
            {
                "type": "deny",
                "actor": [
                    {
                        "role": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                    "code": "IRCP",
                                }
                            ]
                        },
                        "reference": {"reference": f"Organization/{org}"},
                    }
                    for org in denied_orgs
                ],
            }
        )
    if denied_labels:
        nested.append(
            {
                "type": "deny",
                "securityLabel": [
                    {"system": ACT_CODE_SYSTEM, "code": code} for code in denied_labels
                ],
            }
        )
    provision: dict[str, Any] = {"type": "permit"}
    if nested:
        provision["provision"] = nested
    return {
        "resourceType": "Consent",
        "identifier": [{"system": WEB_DIRECTIVE_SYSTEM, "value": "sharing"}],
        "status": "active",
        "scope": {"coding": [{"system": CONSENT_SCOPE_SYSTEM, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": now.isoformat().replace("+00:00", "Z"),
        "policyRule": {"coding": [{"system": ACT_CODE_SYSTEM, "code": "OPTIN"}]},
        "provision": provision,
    }


def change_sharing(
    repo: RecordRepository,
    db: Session,
    patient_id: str,
    now: datetime,
    *,
    org_id: str | None = None,
    label: str | None = None,
    share: bool,
) -> None:
    """Allow or withhold sharing with one organisation or of one sensitive category.

    The patient's choices live in one Consent that the web app keeps. The first change carries
    over every denial of the patient's other active privacy Consents and then retires them
    (status ``inactive``): denials are a union, so "share again" could not take effect while an
    older Consent still denied the same thing.
    """
    if org_id is not None:
        if org_id not in org_ids_by_code(db).values():
            raise InvalidInput("unknown organisation")
    elif label not in SENSITIVE_CATEGORIES:
        raise InvalidInput("unknown category")
    state = sharing_state(repo, db, patient_id, now)
    orgs = set(state.directives.denied_orgs)
    labels = set(state.directives.denied_labels)
    target, item = (orgs, org_id) if org_id is not None else (labels, label)
    assert item is not None  # noqa: S101 - checked above.
    if share:
        target.discard(item)
    else:
        target.add(item)
    body = _directive_body(patient_id, sorted(orgs), sorted(labels), now)
    web = next((c for c in state.consents if _is_web_directive(c)), None)
    if web is None:
        repo.create(body)
    else:
        repo.update("Consent", str(web["id"]), {**body, "id": web["id"]})
    for consent in state.consents:
        if consent is not web and not _is_web_directive(consent):
            retired = {k: v for k, v in consent.items() if k != "meta"}
            repo.update("Consent", str(consent["id"]), {**retired, "status": "inactive"})


# Notifications -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notification:
    id: uuid.UUID
    kind: str
    created_at: datetime
    read: bool
    who: str = ""
    organization: str = ""
    until: datetime | None = None
    reason: str = ""


def notifications(
    db: Session, users: UserService, keyring: KeyRing, patient_id: str
) -> list[Notification]:
    rows = db.scalars(
        select(PatientNotification)
        .where(PatientNotification.patient_id == patient_id)
        .order_by(PatientNotification.created_at.desc())
        .limit(100)
    ).all()
    out = []
    for row in rows:
        note = Notification(row.id, row.kind, row.created_at, row.read_at is not None)
        if row.kind == "break-glass-access" and row.reference:
            note = _with_grant(db, users, keyring, note, row.reference)
        out.append(note)
    return out


def _with_grant(
    db: Session, users: UserService, keyring: KeyRing, note: Notification, reference: str
) -> Notification:
    try:
        grant = db.get(BreakGlassGrant, uuid.UUID(reference))
    except ValueError:
        grant = None
    if grant is None:
        return note
    user = db.get(User, grant.user_id)
    org = db.get(Organization, grant.org_id)
    # The patient is the subject of the justification, so they may read it; it is sealed at rest
    # because it may describe their condition.
    reason = (
        keyring.box(Purpose.BREAK_GLASS_REASON)
        .open(grant.reason_enc, associated_data=b"break-glass:" + grant.id.bytes)
        .decode("utf-8")
    )
    return Notification(
        note.id,
        note.kind,
        note.created_at,
        note.read,
        who=users.display_name(user) if user else "",
        organization=org.name if org else "",
        until=grant.expires_at,
        reason=reason,
    )


def unread_count(db: Session, patient_ids: list[str]) -> int:
    if not patient_ids:
        return 0
    return len(
        db.scalars(
            select(PatientNotification.id).where(
                PatientNotification.patient_id.in_(patient_ids),
                PatientNotification.read_at.is_(None),
            )
        ).all()
    )


def mark_read(db: Session, clock: Clock, patient_id: str) -> None:
    now = clock.now()
    for row in db.scalars(
        select(PatientNotification).where(
            PatientNotification.patient_id == patient_id, PatientNotification.read_at.is_(None)
        )
    ):
        row.read_at = now


# Access-history proofs ---------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def history_proof(
    db: Session, actor: Actor, patient_id: str, seq: int, tree_size: int
) -> dict[str, Any]:
    """An inclusion proof of one entry of the patient's access history at a published size.

    The browser fetches the published checkpoint first and asks for a proof at its size, so the
    root it checks against comes from the checkpoint, not from this answer. Like the API's
    history, the event itself is withheld: it names the clinician's address and session and, for
    searches, other patients. The leaf hash stands for it.
    """
    record = db.scalar(
        select(AuditEventRecord)
        .join(AuditEventPatient, AuditEventPatient.seq == AuditEventRecord.seq)
        .where(
            AuditEventRecord.seq == seq,
            AuditEventPatient.patient_id == patient_id,
            AuditEventRecord.type.in_(HISTORY_TYPES),
            (AuditEventRecord.agent_user_id.is_(None))
            | (AuditEventRecord.agent_user_id != actor.user_id),
        )
    )
    if record is None:
        raise NotFound("no such entry in your access history")
    published = db.scalar(select(AuditTreeHead.id).where(AuditTreeHead.tree_size == tree_size))
    if published is None:
        raise NotFound("no published tree head has that size")
    if record.leaf_index is None or record.leaf_index >= tree_size:
        raise NotFound("that tree head does not include this entry yet")
    path = AuditLog(db).inclusion_proof(record.leaf_index, tree_size)
    return {
        "seq": seq,
        "leaf_index": record.leaf_index,
        "tree_size": tree_size,
        "leaf_hash": _b64(event_leaf_hash(seq, record.body)),
        "inclusion_path": [_b64(h) for h in path],
    }
