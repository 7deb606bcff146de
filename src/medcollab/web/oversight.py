"""What the organisation pages need: the break-glass review queue, audit status, MFA coverage.

The review decision (approve or flag a break-glass grant) is a small workflow that no domain
service offers yet; it lives here, audited as ``access:break-glass:reviewed``, and belongs in
``access/services.py`` once that package grows a review API.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from medcollab.access.models import BreakGlassGrant, ReviewTask
from medcollab.audit.events import AuditEvent, Entity, EventType, Outcome
from medcollab.audit.models import AuditEventRecord
from medcollab.audit.services import AuditLog, TreeHead
from medcollab.audit.verify import VerificationReport, verify_log
from medcollab.crypto.keys import Purpose
from medcollab.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from medcollab.identity.models import Membership, Organization, User
from medcollab.identity.services import UserService, UserView, agent_for, require
from medcollab.kernel.context import Actor
from medcollab.kernel.permissions import Permission, Role, requires_mfa
from medcollab.runtime import Runtime

REVIEW_DECISIONS: Final = {"approve": "approved", "flag": "flagged"}


class SelfReview(PermissionDenied):
    """Separation of duties: nobody reviews their own emergency access."""

    code = "self_review"


# Break-glass reviews -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReviewItem:
    id: uuid.UUID
    status: str
    created_at: datetime
    reviewed_at: datetime | None
    reviewer: str
    clinician: str
    clinician_roles: str
    organization: str
    patient_id: str
    granted_at: datetime
    expires_at: datetime
    reason: str
    own: bool


def review_queue(db: Session, runtime: Runtime, actor: Actor) -> list[ReviewItem]:
    """Open reviews first, then the latest decided ones, in the reviewer's organisations."""
    orgs = require(actor, Permission.PRIVACY_BREAKGLASS_REVIEW)
    users = UserService(session=db, runtime=runtime)
    box = runtime.keyring.box(Purpose.BREAK_GLASS_REASON)
    rows = db.execute(
        select(ReviewTask, BreakGlassGrant)
        .join(BreakGlassGrant, BreakGlassGrant.id == ReviewTask.grant_id)
        .where(ReviewTask.org_id.in_(orgs))
        .order_by((ReviewTask.status == "open").desc(), ReviewTask.created_at.desc())
        .limit(200)
    ).all()
    items = []
    for task, grant in rows:
        clinician = db.get(User, grant.user_id)
        reviewer = db.get(User, task.reviewer_id) if task.reviewer_id else None
        org = db.get(Organization, grant.org_id)
        roles = db.scalars(
            select(Membership.role).where(
                Membership.user_id == grant.user_id, Membership.org_id == grant.org_id
            )
        ).all()
        items.append(
            ReviewItem(
                id=task.id,
                status=task.status,
                created_at=task.created_at,
                reviewed_at=task.reviewed_at,
                reviewer=users.display_name(reviewer) if reviewer else "",
                clinician=users.display_name(clinician) if clinician else "",
                clinician_roles=",".join(sorted(r.value for r in roles)),
                organization=org.name if org else "",
                patient_id=grant.patient_id,
                granted_at=grant.granted_at,
                expires_at=grant.expires_at,
                reason=box.open(
                    grant.reason_enc, associated_data=b"break-glass:" + grant.id.bytes
                ).decode("utf-8"),
                own=grant.user_id == actor.user_id,
            )
        )
    return items


def decide_review(
    db: Session, runtime: Runtime, actor: Actor, task_id: uuid.UUID, decision: str
) -> str:
    """Approve or flag one open review; returns the new status."""
    orgs = require(actor, Permission.PRIVACY_BREAKGLASS_REVIEW)
    status = REVIEW_DECISIONS.get(decision)
    if status is None:
        raise InvalidInput("the decision must be approve or flag")
    task = db.get(ReviewTask, task_id, with_for_update=True)
    if task is None or task.org_id not in orgs:
        raise NotFound("no such review")
    if task.status != "open":
        raise Conflict("this review has already been decided")
    grant = db.get(BreakGlassGrant, task.grant_id)
    assert grant is not None  # noqa: S101 - foreign key.
    if grant.user_id == actor.user_id:
        raise SelfReview("you cannot review your own emergency access")
    now = runtime.clock.now()
    task.status, task.reviewed_at, task.reviewer_id = status, now, actor.user_id
    AuditLog(db).append(
        AuditEvent(
            type=EventType.BREAK_GLASS_REVIEWED,
            outcome=Outcome.SUCCESS,
            recorded_at=now,
            agent=agent_for(actor),
            subject_user_id=grant.user_id,
            subject_org_id=grant.org_id,
            reasons=(f"decision={status}", f"grant={grant.id}", f"review={task.id}"),
            entity=Entity(patient_id=grant.patient_id),
        )
    )
    return status


# Users and MFA coverage --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Coverage:
    staff: int
    staff_with_mfa: int
    locked: int

    @property
    def percent(self) -> int:
        return round(100 * self.staff_with_mfa / self.staff) if self.staff else 100


def user_scope(actor: Actor, permission: Permission) -> frozenset[uuid.UUID] | None:
    """Platform administrators act across organisations; everyone else within their own."""
    if Role.PLATFORM_ADMIN in actor.roles:
        return None
    return require(actor, permission)


def coverage(views: list[UserView]) -> Coverage:
    staff = [v for v in views if requires_mfa({g.role for g in v.grants}) and not v.disabled]
    return Coverage(
        staff=len(staff),
        staff_with_mfa=sum(1 for v in staff if v.mfa_enabled),
        locked=sum(1 for v in views if v.locked_until is not None),
    )


# Audit status ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditStatus:
    tree_size: int
    pending: int
    head: TreeHead | None
    last_verification: Verification | None


@dataclass(frozen=True, slots=True)
class Verification:
    at: datetime
    ok: bool
    events: int
    tree_heads: int
    seconds: float
    first_problem: str


class _LastVerification:
    """The latest verification run from the pages, per server process.

    The audit package records no verification runs yet (``medcollab audit verify`` prints its
    report); until it does, this is what "last verification" can honestly show.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: Verification | None = None

    def get(self) -> Verification | None:
        with self._lock:
            return self._value

    def set(self, value: Verification) -> None:
        with self._lock:
            self._value = value


LAST_VERIFICATION = _LastVerification()


def audit_status(db: Session) -> AuditStatus:
    log = AuditLog(db)
    pending = db.scalar(
        select(func.count())
        .select_from(AuditEventRecord)
        .where(AuditEventRecord.leaf_index.is_(None))
    )
    return AuditStatus(
        tree_size=log.tree_size(),
        pending=int(pending or 0),
        head=log.latest_tree_head(),
        last_verification=LAST_VERIFICATION.get(),
    )


def verify_now(db: Session, runtime: Runtime, actor: Actor) -> Verification:
    """Run the full verification (``medcollab audit verify``) against the log's public key."""
    require(actor, Permission.AUDIT_LOG_VERIFY)
    report: VerificationReport = verify_log(db, public_key=runtime.log_signer.public_key_bytes())
    first = report.first
    result = Verification(
        at=runtime.clock.now(),
        ok=report.ok,
        events=report.events,
        tree_heads=report.tree_heads,
        seconds=report.seconds,
        first_problem=first.describe() if first else "",
    )
    LAST_VERIFICATION.set(result)
    return result
