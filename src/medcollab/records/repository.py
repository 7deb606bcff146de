"""The records chokepoint: the only way to protected health information.

A :class:`RecordRepository` is built per request from an :class:`AccessContext`. Every operation

1. asks :func:`medcollab.access.policy.decide` (deny by default, reasons for every answer),
2. decrypts or encrypts with the patient's data key, the associated data binding each ciphertext to
   its resource type, id, version and patient,
3. appends an audit event for the decision, permit or deny, in the same transaction, before
   anything is returned.

Anything the caller may not see is "not found": a denied read raises :class:`RecordNotFound`
exactly as a missing record does, and searches leave invisible records out silently (their
``total`` counts only what the caller may see). Writes are decided before anything is written, so
a refusal never leaves a partial write behind.
"""

from __future__ import annotations

import copy
import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Final, NoReturn

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    delete,
    exists,
    func,
    insert,
    not_,
    or_,
    select,
)
from sqlalchemy.orm import Session

from medcollab.access.consents import directives
from medcollab.access.context import AccessContext
from medcollab.access.policy import (
    Action,
    BreakGlass,
    ConsentDirectives,
    Decision,
    Purpose,
    RelationshipKind,
    Request,
    Resource,
    decide,
)
from medcollab.access.services import AccessService
from medcollab.audit.events import Agent, AuditEvent, Entity, EventType, Outcome
from medcollab.audit.services import AuditLog
from medcollab.config import Settings
from medcollab.crypto.envelope import IntegrityError, aad_for, blind_index, seal, unseal
from medcollab.crypto.keys import KeyRing
from medcollab.errors import Conflict, InvalidInput, MedcollabError, NotFound
from medcollab.jurisdiction.profiles import JurisdictionProfile
from medcollab.kernel.clock import Clock
from medcollab.kernel.permissions import Role
from medcollab.keys.services import KeyDestroyed, KeyService
from medcollab.records import search_params
from medcollab.records.models import FhirResource, FhirResourceVersion, FhirSearchIndex
from medcollab.records.validation import validate_resource

log = logging.getLogger("medcollab.records")

ACTION_EVENTS: Final = {
    Action.READ: EventType.FHIR_READ,
    Action.VREAD: EventType.FHIR_VREAD,
    Action.HISTORY: EventType.FHIR_HISTORY,
    Action.SEARCH: EventType.FHIR_SEARCH,
    Action.CREATE: EventType.FHIR_CREATE,
    Action.UPDATE: EventType.FHIR_UPDATE,
    Action.DELETE: EventType.FHIR_DELETE,
    Action.EVERYTHING: EventType.FHIR_EVERYTHING,
    Action.EXPORT: EventType.FHIR_EXPORT,
}
REDACTED: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "REDACTED",
    "display": "redacted",
}
MIN_BREAK_GLASS_REASON = 10
#: A search that would have to examine more candidates than this is refused as too broad.
MAX_SEARCH_CANDIDATES = 10_000


class RecordNotFound(NotFound):
    """Absent, or present but not visible to the caller: the two are indistinguishable."""

    keeps_writes = True  # The audit event of the refused access must survive the refusal.


class RecordGone(MedcollabError):
    """The resource was deleted (HTTP 410), said only to callers who may see it."""

    code = "gone"
    keeps_writes = True


class RecordErased(MedcollabError):
    """The patient's data keys were destroyed (crypto-shredding): the data cannot be read."""

    code = "erased"
    keeps_writes = True


class RecordIntegrityFailure(MedcollabError):
    """A stored ciphertext failed authentication: tampering or a copied row. Fails closed."""

    code = "integrity_error"
    keeps_writes = True


class VersionConflict(Conflict):
    """``If-Match`` named a version that is not the current one (HTTP 412)."""

    code = "version_conflict"


@dataclass(frozen=True, slots=True)
class StoredResource:
    resource_type: str
    resource_id: str
    version: int
    last_updated: datetime
    deleted: bool
    patient_id: str | None
    #: The resource JSON with ``id`` and ``meta`` set, masks applied; None for deletions.
    body: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class SearchPage:
    total: int
    entries: list[StoredResource]
    offset: int
    count: int


@dataclass
class _PatientFacts:
    consent: ConsentDirectives
    relationships: tuple[Any, ...]
    grant: BreakGlass | None


class RecordRepository:
    """Per-request access to the FHIR store; see the module docstring for the contract."""

    #: Bundle types that are instructions (to run), not documents (to store).
    UNSTORABLE_BUNDLE_TYPES: ClassVar[frozenset[str]] = frozenset({"transaction", "batch"})

    def __init__(
        self,
        *,
        session: Session,
        ctx: AccessContext,
        keys: KeyService,
        keyring: KeyRing,
        clock: Clock,
        settings: Settings,
        profile: JurisdictionProfile,
    ) -> None:
        self.session = session
        self.ctx = ctx
        self.keys = keys
        self.clock = clock
        self.settings = settings
        self.profile = profile
        self._access = AccessService(session=session, clock=clock, keyring=keyring)
        self._audit = AuditLog(session)
        self._subject = self._access.subject(ctx)
        self._facts: dict[str, _PatientFacts] = {}
        self._org_codes: dict[str, str] | None = None
        self._blind_key: bytes | None = None

    # Helpers ---------------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self.clock.now()

    def _agent(self) -> Agent:
        ctx = self.ctx
        role = f"system:{ctx.system_name}" if ctx.is_system else ",".join(sorted(ctx.roles))
        return Agent(
            user_id=ctx.user_id,
            org_id=ctx.org_id,
            role=role,
            session_hash=ctx.session_ref,
            client_address=ctx.client_address,
            user_agent=(ctx.user_agent or "")[:200] or None,
        )

    def _record(
        self,
        action: Action | EventType,
        outcome: Outcome,
        entity: Entity,
        reasons: Iterable[str],
        *,
        break_glass: bool = False,
    ) -> None:
        event_type = ACTION_EVENTS[action] if isinstance(action, Action) else action
        if self.settings.unsafe_disable_audit and self.settings.mode == "dev":
            return  # Benchmarks only; see Settings.unsafe_disable_audit.
        self._audit.append(
            AuditEvent(
                type=event_type,
                outcome=outcome,
                recorded_at=self._now(),
                agent=self._agent(),
                reasons=tuple(reasons),
                entity=entity,
                purpose=self.ctx.purpose.value,
                break_glass=break_glass,
            )
        )

    def record_event(
        self,
        event_type: EventType,
        entity: Entity,
        reasons: Iterable[str] = (),
        *,
        outcome: Outcome = Outcome.SUCCESS,
    ) -> None:
        """Append an audit event as this repository's caller, in the request's transaction.

        For services that reach PHI beside the FHIR store (sealed consultation content, DICOM
        files, workflow steps): their events carry the same agent, purpose and time as the
        repository's own.
        """
        self._record(event_type, outcome, entity, reasons)

    def _org_ids_by_code(self) -> dict[str, str]:
        if self._org_codes is None:
            self._org_codes = self._access.org_ids_by_code()
        return self._org_codes

    def blind_key(self) -> bytes:
        if self._blind_key is None:
            self._blind_key = self.keys.blind_index_key()
        return self._blind_key

    # Decryption ------------------------------------------------------------------------------

    def _decrypt(self, row: FhirResourceVersion) -> dict[str, Any]:
        if row.ciphertext is None or row.key_id is None:
            raise RecordIntegrityFailure("stored version has no content")
        entity = Entity(row.patient_id, row.resource_type, row.resource_id, row.version)
        try:
            key = self.keys.key_for(
                row.ciphertext,
                "patient" if row.patient_id is not None else "organization",
                row.patient_id or self._owner_org(row),
            )
        except KeyDestroyed:
            self._record(Action.READ, Outcome.MINOR_FAILURE, entity, ("key-destroyed",))
            raise RecordErased("the record has been erased") from None
        except (NotFound, IntegrityError):
            # The ciphertext names a key of another owner, or none, or its wrapped key was
            # altered: the row was moved or forged. Fail closed, loudly.
            self._integrity_failure(entity, "data-key-mismatch")
        aad = aad_for(row.resource_type, row.resource_id, row.version, row.patient_id)
        try:
            plaintext = unseal(key, row.ciphertext, aad)
        except IntegrityError:
            self._integrity_failure(entity, "ciphertext-authentication-failed")
        data: dict[str, Any] = json.loads(plaintext)
        return data

    def _integrity_failure(self, entity: Entity, reason: str) -> NoReturn:
        log.error("record integrity failure", extra={"reason": reason})
        self._record(EventType.RECORD_INTEGRITY_FAILURE, Outcome.MAJOR_FAILURE, entity, (reason,))
        raise RecordIntegrityFailure(
            "a stored record failed its integrity check; it has been withheld and the "
            "security officer alerted"
        )

    def _owner_org(self, row: FhirResourceVersion) -> str:
        head = self._head(row.resource_type, row.resource_id)
        custodian = head.custodian_org_id if head else None
        return str(custodian or "platform")

    # Facts -----------------------------------------------------------------------------------

    def _patient_facts(self, patient_id: str) -> _PatientFacts:
        facts = self._facts.get(patient_id)
        if facts is not None:
            return facts
        consents = [
            self._decrypt_current(row)
            for row in self._current_rows(
                select(FhirResource).where(
                    FhirResource.resource_type == "Consent",
                    FhirResource.patient_id == patient_id,
                    FhirResource.deleted.is_(False),
                )
            )
        ]
        consent = directives(consents, self._now(), self._org_ids_by_code())
        relationships = self._access.relationships(patient_id, self.ctx.org_id)
        grant = None
        if self.ctx.user_id is not None:
            grant = self._access.active_grant(self.ctx.user_id, patient_id)
        facts = _PatientFacts(consent, relationships, grant)
        self._facts[patient_id] = facts
        return facts

    def _decide(
        self,
        action: Action,
        resource_type: str,
        patient_id: str | None,
        custodian: uuid.UUID | None,
        labels: frozenset[str],
    ) -> Decision:
        request = Request(action=action, purpose=self.ctx.purpose, now=self._now())
        if patient_id is not None and not self.ctx.is_system:
            facts = self._patient_facts(patient_id)
            if (
                self.ctx.purpose is Purpose.ETREAT
                and facts.grant is None
                and self.ctx.break_glass_reason is not None
                and self._subject.can_break_glass
                and self._patient_exists(patient_id)
            ):
                facts.grant = self._grant(patient_id)
            request = Request(
                action=action,
                purpose=self.ctx.purpose,
                now=request.now,
                relationships=facts.relationships,
                consent=facts.consent,
                break_glass=facts.grant,
                break_glass_overrides_consent=self.profile.break_glass_overrides_consent.value,
            )
        return decide(
            self._subject,
            Resource(resource_type, patient_id, str(custodian) if custodian else None, labels),
            request,
        )

    def _grant(self, patient_id: str) -> BreakGlass:
        reason = self.ctx.break_glass_reason or ""
        grant = self._access.grant_break_glass(
            self.ctx, patient_id, reason, self.settings.break_glass_minutes
        )
        self._record(
            EventType.BREAK_GLASS_GRANTED,
            Outcome.SUCCESS,
            Entity(patient_id=patient_id),
            (f"grant={grant.grant_id}", f"until={grant.expires_at.isoformat()}"),
            break_glass=True,
        )
        return grant

    def _patient_exists(self, patient_id: str) -> bool:
        return (
            self.session.scalar(
                select(FhirResource.version).where(
                    FhirResource.resource_type == "Patient",
                    FhirResource.resource_id == patient_id,
                    FhirResource.deleted.is_(False),
                )
            )
            is not None
        )

    # Reading ---------------------------------------------------------------------------------

    def _current_rows(self, query: Select[FhirResource]) -> Iterator[FhirResourceVersion]:
        heads = self.session.scalars(query).all()
        if not heads:
            return iter(())
        keys = [(h.resource_type, h.resource_id, h.version) for h in heads]
        rows = self.session.scalars(
            select(FhirResourceVersion).where(
                or_(
                    *(
                        and_(
                            FhirResourceVersion.resource_type == t,
                            FhirResourceVersion.resource_id == i,
                            FhirResourceVersion.version == v,
                        )
                        for t, i, v in keys
                    )
                )
            )
        ).all()
        order = {k: n for n, k in enumerate(keys)}
        return iter(sorted(rows, key=lambda r: order[(r.resource_type, r.resource_id, r.version)]))

    def _decrypt_current(self, row: FhirResourceVersion) -> dict[str, Any]:
        return self._decrypt(row)

    def _head(self, resource_type: str, resource_id: str) -> FhirResource | None:
        return self.session.get(FhirResource, (resource_type, resource_id))

    def _version_row(
        self, resource_type: str, resource_id: str, version: int
    ) -> FhirResourceVersion | None:
        return self.session.scalars(
            select(FhirResourceVersion).where(
                FhirResourceVersion.resource_type == resource_type,
                FhirResourceVersion.resource_id == resource_id,
                FhirResourceVersion.version == version,
            )
        ).first()

    def _present(
        self,
        action: Action,
        row: FhirResourceVersion,
        custodian: uuid.UUID | None,
        *,
        audit: bool = True,
    ) -> tuple[StoredResource | None, Decision]:
        """Decide on one stored version; decrypt, mask and return it if permitted."""
        body = None if row.deleted else self._decrypt(row)
        labels = _labels(body)
        decision = self._decide(action, row.resource_type, row.patient_id, custodian, labels)
        entity = Entity(row.patient_id, row.resource_type, row.resource_id, row.version)
        if audit:
            self._record(
                action,
                Outcome.SUCCESS if decision.permitted else Outcome.MINOR_FAILURE,
                entity,
                decision.reasons,
                break_glass=decision.break_glass,
            )
        if not decision.permitted:
            return None, decision
        if body is not None:
            body = _with_meta(body, row)
            if decision.masks:
                body = apply_masks(body, decision.masks)
        stored = StoredResource(
            row.resource_type,
            row.resource_id,
            row.version,
            row.last_updated,
            row.deleted,
            row.patient_id,
            body,
        )
        return stored, decision

    def _not_found(self, action: Action, resource_type: str, resource_id: str) -> RecordNotFound:
        self._record(
            action, Outcome.MINOR_FAILURE, Entity(None, resource_type, resource_id), ("not-found",)
        )
        return RecordNotFound(f"{resource_type}/{resource_id} not found")

    def read(self, resource_type: str, resource_id: str) -> StoredResource:
        head = self._head(resource_type, resource_id)
        if head is None:
            raise self._not_found(Action.READ, resource_type, resource_id)
        row = self._version_row(resource_type, resource_id, head.version)
        assert row is not None  # noqa: S101 - the head always names an existing version.
        stored, _decision = self._present(Action.READ, row, head.custodian_org_id)
        if stored is None:
            raise RecordNotFound(f"{resource_type}/{resource_id} not found")
        if stored.deleted:
            raise RecordGone(f"{resource_type}/{resource_id} was deleted")
        return stored

    def vread(self, resource_type: str, resource_id: str, version: int) -> StoredResource:
        head = self._head(resource_type, resource_id)
        row = self._version_row(resource_type, resource_id, version) if head else None
        if head is None or row is None:
            raise self._not_found(Action.VREAD, resource_type, resource_id)
        stored, _decision = self._present(Action.VREAD, row, head.custodian_org_id)
        if stored is None:
            raise RecordNotFound(f"{resource_type}/{resource_id} not found")
        if stored.deleted:
            raise RecordGone(f"{resource_type}/{resource_id}/_history/{version} is a deletion")
        return stored

    def history(self, resource_type: str, resource_id: str) -> list[StoredResource]:
        head = self._head(resource_type, resource_id)
        if head is None:
            raise self._not_found(Action.HISTORY, resource_type, resource_id)
        rows = self.session.scalars(
            select(FhirResourceVersion)
            .where(
                FhirResourceVersion.resource_type == resource_type,
                FhirResourceVersion.resource_id == resource_id,
            )
            .order_by(FhirResourceVersion.version.desc())
        ).all()
        visible: list[StoredResource] = []
        decisions: list[Decision] = []
        for row in rows:
            stored, decision = self._present(
                Action.HISTORY, row, head.custodian_org_id, audit=False
            )
            decisions.append(decision)
            if stored is not None:
                visible.append(stored)
        permitted = bool(visible)
        self._record(
            Action.HISTORY,
            Outcome.SUCCESS if permitted else Outcome.MINOR_FAILURE,
            Entity(head.patient_id, resource_type, resource_id, head.version),
            decisions[0].reasons if decisions else ("not-found",),
            break_glass=any(d.break_glass for d in decisions),
        )
        if not permitted:
            raise RecordNotFound(f"{resource_type}/{resource_id} not found")
        return visible

    # Writing ---------------------------------------------------------------------------------

    def _custodian_for_write(self) -> uuid.UUID | None:
        return self.ctx.org_id

    def _encrypt(
        self,
        body: dict[str, Any],
        *,
        resource_type: str,
        resource_id: str,
        version: int,
        patient_id: str | None,
        custodian: uuid.UUID | None,
    ) -> tuple[bytes, uuid.UUID]:
        if patient_id is not None:
            key = self.keys.current_key("patient", patient_id)
        else:
            key = self.keys.current_key("organization", str(custodian or "platform"))
        plaintext = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        blob = seal(key, plaintext, aad_for(resource_type, resource_id, version, patient_id))
        return blob, key.id

    def _index(
        self, resource_type: str, resource_id: str, body: dict[str, Any], *, new: bool = False
    ) -> None:
        """Replace the resource's search index rows (one executemany, not one ORM object each)."""
        if not new:
            self.session.execute(
                delete(FhirSearchIndex).where(
                    FhirSearchIndex.resource_type == resource_type,
                    FhirSearchIndex.resource_id == resource_id,
                )
            )
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for entry in search_params.extract(body):
            value = (
                blind_index(self.blind_key(), entry.value, context=entry.param)
                if entry.identifying
                else entry.value[:255]
            )
            rows.setdefault(
                (entry.param, value),
                {
                    "resource_type": resource_type,
                    "resource_id": resource_id,
                    "param": entry.param,
                    "value": value,
                    "identifying": entry.identifying,
                    "low": entry.low,
                    "high": entry.high,
                },
            )
        if rows:
            self.session.execute(insert(FhirSearchIndex), list(rows.values()))

    def _check_writable(self, body: dict[str, Any]) -> None:
        if (
            body.get("resourceType") == "Bundle"
            and body.get("type") in self.UNSTORABLE_BUNDLE_TYPES
        ):
            raise InvalidInput(
                "transaction and batch Bundles are processed by POST to the base URL, not stored"
            )

    def create(self, data: object, *, resource_id: str | None = None) -> StoredResource:
        """Validate, decide, encrypt, index and audit a new resource with a server id."""
        body = validate_resource(data)
        resource_type = str(body["resourceType"])
        self._check_writable(body)
        resource_id = resource_id or str(uuid.uuid4())
        body["id"] = resource_id
        patient_id = search_params.patient_of(body)
        custodian = self._custodian_for_write()
        entity = Entity(patient_id, resource_type, resource_id, 1)
        if resource_type == "Patient" and not self.ctx.is_system:
            decision = self._decide_registration()
        else:
            # The compartment's Patient must exist (and be visible, decided next). System
            # imports are exempt: source files may refer to patients that arrive later or never.
            if (
                patient_id is not None
                and resource_type != "Patient"
                and not self.ctx.is_system
                and not self._patient_exists(patient_id)
            ):
                self._record(Action.CREATE, Outcome.MINOR_FAILURE, entity, ("patient-not-found",))
                raise RecordNotFound(f"Patient/{patient_id} not found")
            decision = self._decide(
                Action.CREATE, resource_type, patient_id, custodian, _labels(body)
            )
        self._record(
            Action.CREATE,
            Outcome.SUCCESS if decision.permitted else Outcome.MINOR_FAILURE,
            entity,
            decision.reasons,
        )
        if not decision.permitted:
            raise RecordNotFound(
                f"Patient/{patient_id} not found" if patient_id else "not permitted here"
            )
        now = self._now()
        body["meta"] = {**_meta(body), "versionId": "1", "lastUpdated": _instant(now)}
        blob, key_id = self._encrypt(
            body,
            resource_type=resource_type,
            resource_id=resource_id,
            version=1,
            patient_id=patient_id,
            custodian=custodian,
        )
        self.session.add(
            FhirResource(
                resource_type=resource_type,
                resource_id=resource_id,
                version=1,
                patient_id=patient_id,
                custodian_org_id=custodian,
                deleted=False,
                last_updated=now,
            )
        )
        self.session.add(
            FhirResourceVersion(
                resource_type=resource_type,
                resource_id=resource_id,
                version=1,
                patient_id=patient_id,
                last_updated=now,
                deleted=False,
                ciphertext=blob,
                key_id=key_id,
            )
        )
        self._index(resource_type, resource_id, body, new=True)
        self._derive_relationships(resource_type, resource_id, body, patient_id, now)
        if resource_type == "Consent":
            self._consent_changed(patient_id, resource_id)
        self.session.flush()
        return StoredResource(resource_type, resource_id, 1, now, False, patient_id, body)

    def _decide_registration(self) -> Decision:
        """Registering a new patient: any clinician with write permission may, at their
        organisation; the registration becomes a care relationship."""
        subject = self._subject
        if subject.can_write_clinical and self.ctx.purpose in (Purpose.TREAT, Purpose.HOPERAT):
            return Decision(True, ("registration: new patient at the clinician's organisation",))
        return Decision(False, ("registration-not-permitted",))

    def update(
        self, resource_type: str, resource_id: str, data: object, *, if_match: int | None = None
    ) -> StoredResource:
        body = validate_resource(data)
        if body.get("resourceType") != resource_type:
            raise InvalidInput(
                f"body resourceType {body.get('resourceType')!r} does not match the URL"
            )
        if body.get("id") not in (None, resource_id):
            raise InvalidInput("the resource id in the body differs from the id in the URL")
        self._check_writable(body)
        body["id"] = resource_id
        head = self._head(resource_type, resource_id)
        if head is None:
            raise self._not_found(Action.UPDATE, resource_type, resource_id)
        current = self._version_row(resource_type, resource_id, head.version)
        assert current is not None  # noqa: S101
        old_body = None if current.deleted else self._decrypt(current)
        decision = self._decide(
            Action.UPDATE, resource_type, head.patient_id, head.custodian_org_id, _labels(old_body)
        )
        entity = Entity(head.patient_id, resource_type, resource_id, head.version + 1)
        self._record(
            Action.UPDATE,
            Outcome.SUCCESS if decision.permitted else Outcome.MINOR_FAILURE,
            entity,
            decision.reasons,
        )
        if not decision.permitted:
            raise RecordNotFound(f"{resource_type}/{resource_id} not found")
        if if_match is not None and if_match != head.version:
            raise VersionConflict(
                f"If-Match names version {if_match} but the current version is {head.version}"
            )
        patient_id = search_params.patient_of(body)
        if patient_id != head.patient_id:
            raise InvalidInput("an update may not move a resource to another patient's record")
        version = head.version + 1
        now = self._now()
        body["meta"] = {
            **_meta(body),
            "versionId": str(version),
            "lastUpdated": _instant(now),
        }
        blob, key_id = self._encrypt(
            body,
            resource_type=resource_type,
            resource_id=resource_id,
            version=version,
            patient_id=patient_id,
            custodian=head.custodian_org_id,
        )
        self.session.add(
            FhirResourceVersion(
                resource_type=resource_type,
                resource_id=resource_id,
                version=version,
                patient_id=patient_id,
                last_updated=now,
                deleted=False,
                ciphertext=blob,
                key_id=key_id,
            )
        )
        head.version, head.deleted, head.last_updated = version, False, now
        self._index(resource_type, resource_id, body)
        self._derive_relationships(resource_type, resource_id, body, patient_id, now)
        if resource_type == "Consent":
            self._consent_changed(patient_id, resource_id)
        self.session.flush()
        return StoredResource(resource_type, resource_id, version, now, False, patient_id, body)

    def delete(self, resource_type: str, resource_id: str) -> int:
        """Logical delete: a new, empty version; returns that version number."""
        head = self._head(resource_type, resource_id)
        if head is None:
            raise self._not_found(Action.DELETE, resource_type, resource_id)
        current = self._version_row(resource_type, resource_id, head.version)
        assert current is not None  # noqa: S101
        old_body = None if current.deleted else self._decrypt(current)
        decision = self._decide(
            Action.DELETE, resource_type, head.patient_id, head.custodian_org_id, _labels(old_body)
        )
        self._record(
            Action.DELETE,
            Outcome.SUCCESS if decision.permitted else Outcome.MINOR_FAILURE,
            Entity(head.patient_id, resource_type, resource_id, head.version + 1),
            decision.reasons,
        )
        if not decision.permitted:
            raise RecordNotFound(f"{resource_type}/{resource_id} not found")
        if head.deleted:
            return head.version
        now = self._now()
        version = head.version + 1
        self.session.add(
            FhirResourceVersion(
                resource_type=resource_type,
                resource_id=resource_id,
                version=version,
                patient_id=head.patient_id,
                last_updated=now,
                deleted=True,
                ciphertext=None,
                key_id=None,
            )
        )
        head.version, head.deleted, head.last_updated = version, True, now
        self.session.execute(
            delete(FhirSearchIndex).where(
                FhirSearchIndex.resource_type == resource_type,
                FhirSearchIndex.resource_id == resource_id,
            )
        )
        if resource_type in ("CareTeam", "Encounter"):
            self._access.replace_relationships(
                f"{resource_type}/{resource_id}",
                head.patient_id or "",
                RelationshipKind.CARE_TEAM,
                [],
            )
        if resource_type == "Consent":
            self._consent_changed(head.patient_id, resource_id)
        self.session.flush()
        return version

    def _consent_changed(self, patient_id: str | None, resource_id: str) -> None:
        self._facts.pop(patient_id or "", None)
        self._record(
            EventType.CONSENT_CHANGED,
            Outcome.SUCCESS,
            Entity(patient_id, "Consent", resource_id),
            ("consent-written",),
        )

    # Care relationships derived from the record ------------------------------------------------

    def _derive_relationships(
        self,
        resource_type: str,
        resource_id: str,
        body: dict[str, Any],
        patient_id: str | None,
        now: datetime,
    ) -> None:
        source = f"{resource_type}/{resource_id}"
        if resource_type == "Patient" and self.ctx.org_id is not None:
            days = self.settings.registration_relationship_days
            self._access.replace_relationships(
                f"registration:{resource_id}:{self.ctx.org_id}",
                resource_id,
                RelationshipKind.REGISTRATION,
                [(self.ctx.org_id, None, now, now + timedelta(days=days))],
            )
            return
        if patient_id is None or resource_type not in ("CareTeam", "Encounter"):
            return
        if resource_type == "CareTeam":
            kind = RelationshipKind.CARE_TEAM
            members = [
                (p.get("member") or {}).get("reference", "") for p in body.get("participant") or []
            ]
            active = body.get("status") in (None, "active", "proposed")
        else:
            kind = RelationshipKind.ENCOUNTER
            members = [
                (p.get("individual") or {}).get("reference", "")
                for p in body.get("participant") or []
            ]
            active = body.get("status") not in ("cancelled", "entered-in-error")
        start, end = _period(body.get("period"), now, self.settings.registration_relationship_days)
        entries: list[tuple[uuid.UUID, uuid.UUID | None, datetime, datetime]] = []
        org = self.ctx.org_id
        if active and org is not None:
            for member in members:
                if member.startswith("Practitioner/"):
                    for user_id in self._access.practitioner_users(member.split("/", 1)[1]):
                        entries.append((org, user_id, start, end))
        self._access.replace_relationships(source, patient_id, kind, entries)

    # Search ----------------------------------------------------------------------------------

    def search(
        self,
        resource_type: str,
        params: dict[str, list[str]],
        *,
        offset: int = 0,
        count: int | None = None,
    ) -> SearchPage:
        """Search current versions; only what the caller may see is counted and returned."""
        count = min(
            max(count or self.settings.fhir_default_page_size, 0), self.settings.fhir_max_page_size
        )
        offset = max(offset, 0)
        criteria = search_params.parse_search_query(resource_type, params)
        query = select(FhirResource).where(
            FhirResource.resource_type == resource_type, FhirResource.deleted.is_(False)
        )
        audited_query: list[tuple[str, str]] = []
        for criterion in criteria:
            condition, shown = self._criterion_condition(criterion)
            query = query.where(condition)
            audited_query.extend(shown)
        query = self._visibility_prefilter(query)
        total_candidates = self.session.scalar(select(func.count()).select_from(query.subquery()))
        if (total_candidates or 0) > MAX_SEARCH_CANDIDATES:
            raise InvalidInput(
                f"the search matches more than {MAX_SEARCH_CANDIDATES} records; add parameters"
            )
        query = query.order_by(FhirResource.last_updated.desc(), FhirResource.resource_id)
        visible: list[StoredResource] = []
        reasons: set[str] = set()
        break_glass = False
        for row in self._current_rows(query):
            head_custodian = self._custodian_of(row)
            stored, decision = self._present(Action.SEARCH, row, head_custodian, audit=False)
            if stored is not None:
                visible.append(stored)
                reasons.update(decision.reasons)
                break_glass = break_glass or decision.break_glass
        page = visible[offset : offset + count]
        patients = tuple(sorted({s.patient_id for s in page if s.patient_id}))
        self._record(
            Action.SEARCH,
            Outcome.SUCCESS,
            Entity(
                patients[0] if len(patients) == 1 else None,
                resource_type,
                query=tuple(audited_query),
                patients=patients,
            ),
            tuple(sorted(reasons))[:10] or ("no-visible-results",),
            break_glass=break_glass,
        )
        return SearchPage(total=len(visible), entries=page, offset=offset, count=count)

    def _custodian_of(self, row: FhirResourceVersion) -> uuid.UUID | None:
        head = self._head(row.resource_type, row.resource_id)
        return head.custodian_org_id if head else None

    def _visibility_prefilter(self, query: Select[FhirResource]) -> Select[FhirResource]:
        """Narrow candidates in SQL to patients the caller could possibly see; the policy still
        decides every remaining row."""
        subject = self._subject
        if subject.system:
            return query
        if subject.roles & {Role.PATIENT, Role.GUARDIAN} and not subject.can_read_clinical:
            ids = subject.own_patient_ids | subject.ward_patient_ids
            return query.where(FhirResource.patient_id.in_(sorted(ids)))
        if not subject.can_read_clinical or self.ctx.org_id is None or self.ctx.user_id is None:
            return query.where(FhirResource.patient_id.is_(None))
        related = self._access.patients_related_to(self.ctx.org_id, self.ctx.user_id)
        if self.ctx.purpose is Purpose.ETREAT:
            # Grants are made per patient by a read; a search sees the patients already granted.
            related |= self._granted_patients()
        return query.where(
            or_(FhirResource.patient_id.is_(None), FhirResource.patient_id.in_(sorted(related)))
        )

    def _granted_patients(self) -> set[str]:
        from medcollab.access.models import BreakGlassGrant  # noqa: PLC0415

        if self.ctx.user_id is None:
            return set()
        return set(
            self.session.scalars(
                select(BreakGlassGrant.patient_id).where(
                    BreakGlassGrant.user_id == self.ctx.user_id,
                    BreakGlassGrant.expires_at > self._now(),
                )
            )
        )

    def _criterion_condition(
        self, criterion: search_params.Criterion
    ) -> tuple[ColumnElement[bool], list[tuple[str, str]]]:
        """SQL for one criterion (values OR-ed) and its audit form (blind indexes, not values)."""
        index = FhirSearchIndex
        matches: list[ColumnElement[bool]] = []
        shown: list[tuple[str, str]] = []
        for value in criterion.values:
            if criterion.identifying:
                hashed = blind_index(self.blind_key(), value.value, context=criterion.param)
                matches.append(index.value == hashed)
                shown.append((criterion.param, f"blind:{hashed[:16]}"))
            elif criterion.kind == "date" and value.low is not None and value.high is not None:
                matches.append(_date_condition(value))
                shown.append((criterion.param, f"{value.prefix}{value.value}"))
            else:
                matches.append(index.value == value.value[:255])
                shown.append((criterion.param, value.value[:64]))
        condition = exists(
            select(index.id).where(
                index.resource_type == FhirResource.resource_type,
                index.resource_id == FhirResource.resource_id,
                index.param == criterion.param,
                or_(*matches),
            )
        )
        return condition, shown

    def record_transaction(self, entries: int, outcome_reason: str, *, success: bool) -> None:
        """Audit a whole transaction Bundle (its entries are audited one by one as well)."""
        self._record(
            EventType.FHIR_TRANSACTION,
            Outcome.SUCCESS if success else Outcome.MINOR_FAILURE,
            Entity(query=(("entries", str(entries)),)),
            (outcome_reason[:200],),
        )

    # $everything -----------------------------------------------------------------------------

    def everything(
        self, patient_id: str, *, action: Action = Action.EVERYTHING
    ) -> list[StoredResource]:
        rows = list(
            self._current_rows(
                select(FhirResource)
                .where(FhirResource.patient_id == patient_id, FhirResource.deleted.is_(False))
                .order_by(FhirResource.resource_type, FhirResource.resource_id)
            )
        )
        if not rows:
            raise self._not_found(action, "Patient", patient_id)
        visible: list[StoredResource] = []
        decisions: list[Decision] = []
        for row in rows:
            stored, decision = self._present(action, row, self._custodian_of(row), audit=False)
            decisions.append(decision)
            if stored is not None:
                visible.append(stored)
        patient_visible = any(s.resource_type == "Patient" for s in visible)
        self._record(
            action,
            Outcome.SUCCESS if patient_visible else Outcome.MINOR_FAILURE,
            Entity(patient_id, "Patient", patient_id),
            next((d.reasons for d in decisions if d.permitted), decisions[0].reasons),
            break_glass=any(d.break_glass for d in decisions),
        )
        if not patient_visible:
            raise RecordNotFound(f"Patient/{patient_id} not found")
        return visible

    # Explain ---------------------------------------------------------------------------------

    def explain(self, action: Action, resource_type: str, patient_id: str | None) -> Decision:
        """The decision for a hypothetical access, without touching data (for ``access explain``)."""
        labels: frozenset[str] = frozenset()
        return self._decide(action, resource_type, patient_id, self.ctx.org_id, labels)


def _date_condition(value: search_params.SearchValue) -> ColumnElement[bool]:
    """FHIR R4 date prefixes over the indexed [low, high] range (see search_params.date_matches)."""
    low, high = FhirSearchIndex.low, FhirSearchIndex.high
    inside = and_(low.is_not(None), high.is_not(None), low >= value.low, high <= value.high)
    match value.prefix:
        case "ne":
            return not_(inside)
        case "gt":
            return or_(high.is_(None), high > value.high)
        case "lt":
            return or_(low.is_(None), low < value.low)
        case "ge":
            return or_(high.is_(None), high >= value.low)
        case "le":
            return or_(low.is_(None), low <= value.high)
    return inside


def _labels(body: dict[str, Any] | None) -> frozenset[str]:
    if not body:
        return frozenset()
    security = (body.get("meta") or {}).get("security") or []
    return frozenset(str(c.get("code")) for c in security if isinstance(c, dict) and c.get("code"))


def _meta(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("meta")
    return dict(meta) if isinstance(meta, dict) else {}


def _instant(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _with_meta(body: dict[str, Any], row: FhirResourceVersion) -> dict[str, Any]:
    meta = dict(body.get("meta") or {})
    meta["versionId"] = str(row.version)
    meta["lastUpdated"] = _instant(row.last_updated)
    return {**body, "meta": meta}


def _period(period: Any, now: datetime, default_days: int) -> tuple[datetime, datetime]:
    """A relationship's validity from a FHIR Period; open ends default to ``default_days``."""
    start, end = now, now + timedelta(days=default_days)
    if isinstance(period, dict):
        start = _parse_instant(period.get("start")) or start
        parsed_end = _parse_instant(period.get("end"))
        end = (
            parsed_end if parsed_end is not None else max(end, start + timedelta(days=default_days))
        )
    return start, end


def _parse_instant(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if value.tzinfo is None:
        from datetime import UTC  # noqa: PLC0415

        value = value.replace(tzinfo=UTC)
    return value


def apply_masks(body: dict[str, Any], masks: frozenset[str]) -> dict[str, Any]:
    """Remove masked elements and label the result REDACTED (minimum necessary)."""
    resource_type = body.get("resourceType")
    masked = copy.deepcopy(body)
    removed = False
    for mask in masks:
        scope, _, element = mask.partition(".")
        if scope not in ("*", resource_type):
            continue
        if element == "*":
            keep = {"resourceType", "id", "meta"}
            for key in [k for k in masked if k not in keep]:
                del masked[key]
                removed = True
        elif element in masked:
            del masked[element]
            removed = True
    if removed:
        meta = masked.setdefault("meta", {})
        meta["security"] = [*meta.get("security", []), REDACTED]
    return masked
