"""Loading the facts an access decision needs, and recording grants and relationships."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from medcollab.access.context import AccessContext
from medcollab.access.models import (
    BreakGlassGrant,
    CareRelationshipRecord,
    PatientNotification,
    ReviewTask,
)
from medcollab.access.policy import BreakGlass, Relationship, RelationshipKind, Subject
from medcollab.crypto.keys import KeyRing, Purpose
from medcollab.identity.models import FhirLinkKind, Organization, User, UserFhirLink
from medcollab.kernel.clock import Clock
from medcollab.kernel.permissions import Permission, permissions_for


class AccessService:
    def __init__(self, *, session: Session, clock: Clock, keyring: KeyRing) -> None:
        self._db = session
        self._clock = clock
        self._keys = keyring

    # Subjects ------------------------------------------------------------------------------------

    def subject(self, ctx: AccessContext) -> Subject:
        """The policy's view of the caller, in the organisation they act for."""
        if ctx.is_system:
            return Subject(
                user_id=f"system:{ctx.system_name}",
                org_id=str(ctx.org_id or ""),
                roles=frozenset(),
                system=True,
            )
        assert ctx.user_id is not None  # noqa: S101 - non-system contexts always have a user.
        user = self._db.get(User, ctx.user_id)
        links = self._db.scalars(select(UserFhirLink).where(UserFhirLink.user_id == ctx.user_id))
        own: set[str] = set()
        wards: set[str] = set()
        for link in links:
            if link.kind is FhirLinkKind.PATIENT:
                own.add(link.resource_id)
            elif link.kind is FhirLinkKind.GUARDIAN:
                wards.add(link.resource_id)
        granted = permissions_for(ctx.roles)
        return Subject(
            user_id=str(ctx.user_id),
            org_id=str(ctx.org_id),
            roles=ctx.roles,
            can_read_clinical=Permission.CLINICAL_RECORD_READ in granted,
            can_write_clinical=Permission.CLINICAL_RECORD_WRITE in granted,
            can_break_glass=Permission.CLINICAL_BREAKGLASS_USE in granted,
            own_patient_ids=frozenset(own),
            ward_patient_ids=frozenset(wards),
            training_current=bool(user and user.training_current and not user.disabled),
            sanctioned=bool(user and user.sanction_frozen),
        )

    def practitioner_users(self, practitioner_id: str) -> list[uuid.UUID]:
        """Accounts linked to a FHIR Practitioner."""
        return list(
            self._db.scalars(
                select(UserFhirLink.user_id).where(
                    UserFhirLink.kind == FhirLinkKind.PRACTITIONER,
                    UserFhirLink.resource_id == practitioner_id,
                )
            )
        )

    def org_ids_by_code(self) -> dict[str, str]:
        return {
            code: str(oid)
            for code, oid in self._db.execute(select(Organization.code, Organization.id))
        }

    # Relationships -------------------------------------------------------------------------------

    def relationships(self, patient_id: str, org_id: uuid.UUID | None) -> tuple[Relationship, ...]:
        if org_id is None:
            return ()
        now = self._clock.now()
        rows = self._db.scalars(
            select(CareRelationshipRecord).where(
                CareRelationshipRecord.patient_id == patient_id,
                CareRelationshipRecord.org_id == org_id,
                CareRelationshipRecord.expires_at > now,
            )
        )
        return tuple(_relationship(row) for row in rows)

    def patients_related_to(self, org_id: uuid.UUID, user_id: uuid.UUID) -> set[str]:
        """Patients with any active relationship for this clinician (a search pre-filter)."""
        now = self._clock.now()
        rows = self._db.scalars(
            select(CareRelationshipRecord.patient_id).where(
                CareRelationshipRecord.org_id == org_id,
                CareRelationshipRecord.expires_at > now,
                CareRelationshipRecord.starts_at <= now,
                (CareRelationshipRecord.user_id.is_(None))
                | (CareRelationshipRecord.user_id == user_id),
            )
        )
        return set(rows)

    def replace_relationships(
        self,
        source: str,
        patient_id: str,
        kind: RelationshipKind,
        entries: list[tuple[uuid.UUID, uuid.UUID | None, datetime, datetime]],
        scope: frozenset[str] | None = None,
    ) -> None:
        """Make ``source``'s relationships exactly ``entries`` (org, user, start, end)."""
        self._db.execute(
            delete(CareRelationshipRecord).where(CareRelationshipRecord.source == source)
        )
        now = self._clock.now()
        for org_id, user_id, start, end in entries:
            if end <= start:
                continue
            self._db.add(
                CareRelationshipRecord(
                    kind=kind.value,
                    patient_id=patient_id,
                    org_id=org_id,
                    user_id=user_id,
                    scope=",".join(sorted(scope)) if scope is not None else None,
                    starts_at=start,
                    expires_at=end,
                    source=source,
                    created_at=now,
                )
            )

    # Break-glass ---------------------------------------------------------------------------------

    def active_grant(self, user_id: uuid.UUID, patient_id: str) -> BreakGlass | None:
        now = self._clock.now()
        grant = self._db.scalars(
            select(BreakGlassGrant)
            .where(
                BreakGlassGrant.user_id == user_id,
                BreakGlassGrant.patient_id == patient_id,
                BreakGlassGrant.expires_at > now,
            )
            .order_by(BreakGlassGrant.expires_at.desc())
        ).first()
        if grant is None:
            return None
        return BreakGlass(
            patient_id=patient_id, expires_at=grant.expires_at, grant_id=str(grant.id)
        )

    def grant_break_glass(
        self, ctx: AccessContext, patient_id: str, reason: str, minutes: int
    ) -> BreakGlass:
        """Record an emergency grant, a review task for the privacy officer and a notification
        for the patient. The caller audits the grant with the decision it enables."""
        assert ctx.user_id is not None  # noqa: S101 - only clinicians reach this.
        assert ctx.org_id is not None  # noqa: S101
        now = self._clock.now()
        grant = BreakGlassGrant(
            id=uuid.uuid4(),
            user_id=ctx.user_id,
            org_id=ctx.org_id,
            patient_id=patient_id,
            granted_at=now,
            expires_at=now + timedelta(minutes=minutes),
            reason_enc=b"",
        )
        grant.reason_enc = self._keys.box(Purpose.BREAK_GLASS_REASON).seal(
            reason.encode("utf-8"), associated_data=b"break-glass:" + grant.id.bytes
        )
        self._db.add(grant)
        self._db.flush()
        self._db.add(
            ReviewTask(grant_id=grant.id, org_id=ctx.org_id, status="open", created_at=now)
        )
        self._db.add(
            PatientNotification(
                patient_id=patient_id,
                kind="break-glass-access",
                reference=str(grant.id),
                created_at=now,
            )
        )
        return BreakGlass(
            patient_id=patient_id, expires_at=grant.expires_at, grant_id=str(grant.id)
        )


def _relationship(row: CareRelationshipRecord) -> Relationship:
    return Relationship(
        kind=RelationshipKind(row.kind),
        patient_id=row.patient_id,
        org_id=str(row.org_id),
        user_id=str(row.user_id) if row.user_id else None,
        starts_at=row.starts_at,
        expires_at=row.expires_at,
        scope=frozenset(row.scope.split(",")) if row.scope else None,
        source=row.source,
    )
