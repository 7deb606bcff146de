"""Referrals, remote consultations and appointments between organisations.

Every service here is built from the request's :class:`RecordRepository`, the one chokepoint to
personal health information, and keeps its rules:

* **Clinical content is FHIR, written through the repository.** A referral is a ServiceRequest (what
  is asked, why, for which period) plus a Task (the workflow: requested, accepted, rejected,
  cancelled); a schedule is a Schedule with Slots; a booking is an Appointment. The repository
  validates, encrypts and audits them. The ``collab_*`` tables beside them hold only ids, codes,
  times and states, so that workflows can query and lock them in SQL.
* **Workflow steps act under a visibly named context.** Creating a referral is a write by the
  referring clinician and goes through their own repository, so the policy decides it. Later steps
  change resources the actor could not otherwise touch (the receiving clinician updates the
  referring side's Task, a patient cancels an Appointment); the service checks that the actor is a
  party to the workflow, then writes through a repository whose context keeps the actor's identity
  and adds the system name (``system:collab-referral``, ``system:collab-booking``,
  ``system:collab-consultation``), so the audit log shows both who acted and that the workflow,
  not a care relationship, authorised the write.
* **A referral grants exactly its scope for exactly its period.** Acceptance records a ``referral``
  care relationship for the receiving organisation (or only the named practitioner's accounts there)
  limited to the referral's resource types and to ``[starts_at, ends_at)``; the access policy then
  treats it like any other relationship. Decline and revocation remove it; expiry needs no job,
  because the relationship itself ends.
* **Consultation content is sealed with the patient's data key.** Topics, messages, file names and
  files are encrypted with :meth:`KeyService.seal` under associated data that binds each ciphertext
  to its thread, row and patient; crypto-shredding the patient erases them. Every read is audited
  with the patient named, so it appears in their access history.
* **Who may join a consultation.** A participant needs a basis for seeing the patient's case, checked
  when invited, when joining and on every access:

  1. a care relationship covering ``Communication`` at the participant's organisation (the access
     policy's own decision, including the patient's consent denials), or
  2. an active FHIR ``Consent`` of the patient (scope ``patient-privacy`` or ``treatment``) with a
     ``permit`` provision whose actor is the participant's organisation, or
  3. the jurisdiction rule :data:`TREATMENT_DISCLOSURE_WITHOUT_CONSENT`: where the law lets one
     provider disclose health information to another for treatment without the patient's consent
     (HIPAA), a clinician acting for treatment may be invited without one.

  A ``deny`` provision naming the participant's organisation refuses all three.
* **A slot is booked once.** The booking claims the slot with a conditional ``UPDATE ... WHERE
  status = 'free'`` before anything else is written; of two concurrent claims the database lets one
  change the row, and the other is refused with 409.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from importlib import import_module
from pathlib import PurePosixPath, PureWindowsPath
from types import MappingProxyType
from typing import Any, Final, NoReturn, cast

from sqlalchemy import ColumnElement, CursorResult, Update, and_, or_, select, update
from sqlalchemy.orm import Session

from medcollab.access.consents import ORG_IDENTIFIER_SYSTEM, directives
from medcollab.access.context import AccessContext
from medcollab.access.policy import Action, Purpose, RelationshipKind, Subject
from medcollab.access.services import AccessService
from medcollab.audit.events import Entity, EventType, Outcome
from medcollab.collaboration.models import (
    AppointmentRecord,
    AppointmentStatus,
    AttachmentRecord,
    ConsultationRecord,
    ConsultationStatus,
    InvitationRecord,
    InvitationStatus,
    MessageRecord,
    ParticipantRecord,
    ParticipantRole,
    ReferralRecord,
    ReferralStatus,
    ScheduleRecord,
    SlotRecord,
    SlotStatus,
)
from medcollab.crypto.envelope import IntegrityError, length_prefixed
from medcollab.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    UnsupportedMediaType,
)
from medcollab.identity.models import FhirLinkKind, Membership, Organization, User
from medcollab.identity.services import UserService
from medcollab.jurisdiction.profiles import (
    Basis,
    Cited,
    Jurisdiction,
    JurisdictionProfile,
    effective_profile,
)
from medcollab.kernel.permissions import CLINICAL_ROLES, Permission, Role, permissions_for
from medcollab.records.repository import RecordIntegrityFailure, RecordRepository
from medcollab.records.search_params import date_range
from medcollab.records.validation import resource_types
from medcollab.runtime import Runtime

_FHIR_ID: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
#: The code system of the platform's own codes in collaboration resources.
COLLAB_SYSTEM: Final = "urn:medcollab:collaboration"
_SNOMED: Final = "http://snomed.info/sct"
_PATIENT_ROLES: Final = frozenset({Role.PATIENT, Role.GUARDIAN})


# Errors ------------------------------------------------------------------------------------------


class ReferralExpired(Conflict):
    """The referral's period is over: it can no longer be accepted."""

    code = "referral_expired"


class InvitationExpired(Conflict):
    """The consultation invitation passed its expiry time unanswered."""

    code = "invitation_expired"


class ConsentRequired(PermissionDenied):
    """The invitee has no basis for seeing the patient's case (see the module docstring)."""

    code = "consent_required"
    keeps_writes = True  # The refusal's audit event must survive the refusal.


class ConsultationAccessEnded(PermissionDenied):
    """A participant's basis for seeing the case has lapsed (relationship ended, consent denied)."""

    code = "consultation_access_ended"
    keeps_writes = True


class SlotUnavailable(Conflict):
    """The slot is already booked (or gone): someone else was first."""

    code = "slot_unavailable"
    keeps_writes = True  # Nothing is written before the claim; the refusal is audited.


class UnsafeAttachment(UnsupportedMediaType):
    """The file is not one of the accepted types, judged by its content."""

    code = "unsupported_attachment"


class AttachmentTooLarge(PayloadTooLarge):
    code = "attachment_too_large"


# The jurisdiction rule for consultations --------------------------------------------------------

#: May a clinician of another organisation be shown a patient's case *for treatment* without the
#: patient's consent? This is deliberately not ``break_glass_overrides_consent`` (an emergency
#: exception); it is the routine-treatment rule, kept here beside the only code that applies it.
TREATMENT_DISCLOSURE_WITHOUT_CONSENT: Final[Mapping[Jurisdiction, Cited[bool]]] = MappingProxyType(
    {
        Jurisdiction.PIPL: Cited(
            False,
            source="PIPL Art. 23, Art. 29",
            note=(
                "Providing personal information to another processor needs the individual's "
                "separate consent (Art. 23); health information is sensitive and needs separate "
                "consent too (Art. 29). Only emergencies are excepted (Art. 13(4)), and that is "
                "break-glass, not a consultation."
            ),
        ),
        Jurisdiction.GDPR: Cited(
            False,
            source="GDPR Art. 9(2)(h), Art. 9(3)",
            basis=Basis.DEPLOYMENT_CHOICE,
            note=(
                "Art. 9(2)(h) permits processing for diagnosis and treatment under professional "
                "secrecy, but whether a provider may disclose to another without consent is "
                "member-state law. The platform asks for the patient's consent everywhere in the "
                "EU; a deployment whose member state allows it derives its own rule."
            ),
        ),
        Jurisdiction.HIPAA: Cited(
            True,
            source="45 CFR 164.506(c)(2)",
            note=(
                "A covered entity may disclose protected health information for treatment "
                "activities of another health care provider without authorisation."
            ),
        ),
    }
)


def treatment_disclosure_allowed(profile: JurisdictionProfile) -> bool:
    return TREATMENT_DISCLOSURE_WITHOUT_CONSENT[profile.code].value


# Shared plumbing ---------------------------------------------------------------------------------


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rowcount(result: object) -> int:
    return cast("CursorResult[Any]", result).rowcount


def _check_fhir_id(value: str, what: str) -> str:
    if not _FHIR_ID.fullmatch(value):
        raise InvalidInput(f"{what} is 1-64 letters, digits, '-' or '.'")
    return value


def _text(value: str, what: str, *, maximum: int) -> str:
    """Free text as given (never trimmed or rewritten), within bounds."""
    if not value.strip():
        raise InvalidInput(f"{what} must not be empty")
    if len(value) > maximum:
        raise InvalidInput(f"{what} must be at most {maximum} characters")
    return value


class _Service:
    """What every collaboration service shares: the caller's repository, audit, party checks."""

    def __init__(self, *, repo: RecordRepository, runtime: Runtime) -> None:
        self._repo = repo
        self._runtime = runtime
        self._db: Session = repo.session
        self._ctx = repo.ctx
        self._clock = repo.clock
        self._keys = repo.keys
        self._access = AccessService(session=self._db, clock=self._clock, keyring=runtime.keyring)
        self._subject: Subject | None = None
        self._org_codes: dict[uuid.UUID, str] | None = None

    # Who is asking ---------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self._clock.now()

    @property
    def subject(self) -> Subject:
        if self._subject is None:
            self._subject = self._access.subject(self._ctx)
        return self._subject

    def _user_id(self) -> uuid.UUID:
        if self._ctx.user_id is None:
            raise PermissionDenied("collaboration needs a signed-in user")
        return self._ctx.user_id

    def _org_id(self) -> uuid.UUID:
        if self._ctx.org_id is None:
            raise PermissionDenied("act for an organisation (X-Organization) to collaborate")
        return self._ctx.org_id

    def _is_clinician(self) -> bool:
        return bool(self._ctx.roles & CLINICAL_ROLES)

    def _require_clinician(self, permission: Permission = Permission.CLINICAL_RECORD_WRITE) -> None:
        """Clinicians only, with the permission in the organisation they act for, not frozen by a
        sanction and with current privacy training (the policy's subject gate, applied here
        because workflow steps do not all pass through a policy decision)."""
        self._user_id()
        self._org_id()
        if not self._is_clinician() or permission not in permissions_for(self._ctx.roles):
            raise PermissionDenied("only clinicians of the organisation you act for may do this")
        self._require_gates()

    def _require_gates(self) -> None:
        subject = self.subject
        if subject.sanctioned:
            raise PermissionDenied("a sanction freezes your access to patient data")
        if not subject.training_current:
            raise PermissionDenied("your privacy training is not current (or the account is off)")

    def _own_patients(self) -> frozenset[str]:
        """Patients the caller acts for as patient or guardian (their linked FHIR Patients)."""
        if not self._ctx.roles & _PATIENT_ROLES:
            return frozenset()
        return self.subject.own_patient_ids | self.subject.ward_patient_ids

    def _org_code(self, org_id: uuid.UUID) -> str:
        if self._org_codes is None:
            self._org_codes = {
                uuid.UUID(oid): code for code, oid in self._access.org_ids_by_code().items()
            }
        return self._org_codes.get(org_id, "?")

    def org_code(self, org_id: uuid.UUID) -> str:
        """The organisation's short code, for display."""
        return self._org_code(org_id)

    def _org_by_code(self, code: str) -> Organization:
        return UserService(session=self._db, runtime=self._runtime).org_by_code(code)

    def _clinical_members(
        self, org_id: uuid.UUID, user_ids: Iterable[uuid.UUID]
    ) -> dict[uuid.UUID, frozenset[Role]]:
        """The clinical roles each of ``user_ids`` holds at ``org_id`` (users without any omitted)."""
        wanted = list(user_ids)
        if not wanted:
            return {}
        rows = self._db.execute(
            select(Membership.user_id, Membership.role).where(
                Membership.org_id == org_id,
                Membership.user_id.in_(wanted),
                Membership.role.in_(sorted(CLINICAL_ROLES)),
            )
        ).all()
        found: dict[uuid.UUID, set[Role]] = {}
        for user_id, role in rows:
            found.setdefault(user_id, set()).add(role)
        return {user_id: frozenset(roles) for user_id, roles in found.items()}

    def _practitioner_of(self, user_id: uuid.UUID) -> str | None:
        links = UserService(session=self._db, runtime=self._runtime).links_of(user_id)
        return next((rid for kind, rid in links if kind is FhirLinkKind.PRACTITIONER), None)

    def _display_name(self, user_id: uuid.UUID) -> str:
        user = self._db.get(User, user_id)
        if user is None:
            return "former user"
        return UserService(session=self._db, runtime=self._runtime).display_name(user)

    # Audit and repositories --------------------------------------------------------------------

    def _repository(self, ctx: AccessContext) -> RecordRepository:
        return RecordRepository(
            session=self._db,
            ctx=ctx,
            keys=self._keys,
            keyring=self._runtime.keyring,
            clock=self._clock,
            settings=self._repo.settings,
            profile=self._repo.profile,
        )

    def _workflow(self, name: str, *, org_id: uuid.UUID | None = None) -> RecordRepository:
        """A repository for a workflow step the service has already authorised: the actor's
        identity stays in the context (and so in the audit log), marked ``system:<name>``."""
        ctx = dataclasses.replace(
            self._ctx,
            system_name=name,
            break_glass_reason=None,
            org_id=org_id if org_id is not None else self._ctx.org_id,
        )
        return self._repository(ctx)

    def _profile_of(self, org_id: uuid.UUID) -> JurisdictionProfile:
        org = self._db.get(Organization, org_id)
        return effective_profile(
            self._repo.settings.jurisdiction, org.jurisdiction if org is not None else None
        )

    def _transition(self, statement: Update) -> bool:
        """Run a conditional state change; True if this request won it."""
        return _rowcount(self._db.execute(statement)) == 1


def _org_ref(org_id: uuid.UUID, code: str) -> dict[str, Any]:
    return {
        "reference": f"Organization/{org_id}",
        "identifier": {"system": ORG_IDENTIFIER_SYSTEM, "value": code},
    }


# Referrals ---------------------------------------------------------------------------------------

MAX_REFERRAL_DAYS: Final = 365
MAX_REASON_LENGTH: Final = 2000
MAX_NOTE_LENGTH: Final = 500
_REFERRAL_CONTEXT: Final = "collab-referral"


class ReferralSide(StrEnum):
    REFERRING = "referring"
    RECEIVING = "receiving"
    PATIENT = "patient"


@dataclass(frozen=True, slots=True)
class ReferralView:
    id: str
    task_id: str
    patient_id: str
    from_org: str
    to_org: str
    to_practitioner_id: str | None
    #: The shared resource types; None means the whole record.
    scope: tuple[str, ...] | None
    starts_at: datetime
    ends_at: datetime
    #: ``requested``, ``accepted``, ``declined``, ``revoked`` or ``expired`` (computed).
    status: str
    created_at: datetime
    decided_at: datetime | None
    revoked_at: datetime | None
    revoked_side: str | None
    #: The clinical reason and the notes of later steps; only in the detail view.
    reason: str | None = None
    notes: tuple[str, ...] = ()


def referral_status(record: ReferralRecord, now: datetime) -> str:
    """The state a person sees: a live referral whose period has ended is ``expired``."""
    live = record.status in (ReferralStatus.REQUESTED, ReferralStatus.ACCEPTED)
    if live and now >= record.ends_at:
        return "expired"
    return record.status.value


def _scope_of(record: ReferralRecord) -> frozenset[str] | None:
    return frozenset(record.scope.split(",")) if record.scope else None


class ReferralService(_Service):
    """Refer a patient to another organisation; accept, decline, revoke; list and read."""

    def create(
        self,
        *,
        patient_id: str,
        to_org: str,
        reason: str,
        days: int,
        scope: Sequence[str] | None = None,
        starts_at: datetime | None = None,
        to_practitioner_id: str | None = None,
    ) -> ReferralView:
        self._require_clinician()
        from_org, user_id = self._org_id(), self._user_id()
        _check_fhir_id(patient_id, "a patient id")
        reason = _text(reason, "the reason", maximum=MAX_REASON_LENGTH)
        if not 1 <= days <= MAX_REFERRAL_DAYS:
            raise InvalidInput(f"a referral lasts 1-{MAX_REFERRAL_DAYS} days")
        types = self._check_scope(scope)
        now = self._now()
        start = starts_at or now
        if start.tzinfo is None:
            raise InvalidInput("the start time needs a time zone (e.g. 2026-01-01T08:00:00Z)")
        if start < now:
            raise InvalidInput("a referral cannot start in the past")
        if start > now + timedelta(days=MAX_REFERRAL_DAYS):
            raise InvalidInput(f"a referral must start within {MAX_REFERRAL_DAYS} days")
        end = start + timedelta(days=days)
        receiving = self._org_by_code(to_org)
        if receiving.id == from_org:
            raise InvalidInput("refer to another organisation, not the one you act for")
        if to_practitioner_id is not None:
            _check_fhir_id(to_practitioner_id, "a practitioner id")
            if not self._named_users(receiving.id, to_practitioner_id):
                raise InvalidInput(
                    f"no clinician of {receiving.code} is linked to "
                    f"Practitioner/{to_practitioner_id}"
                )
        referral_id = uuid.uuid4()
        sr_id, task_id = str(referral_id), str(uuid.uuid4())
        requester = self._practitioner_of(user_id)
        performers = [_org_ref(receiving.id, receiving.code)]
        if to_practitioner_id is not None:
            performers.append({"reference": f"Practitioner/{to_practitioner_id}"})
        period = {"start": _instant(start), "end": _instant(end)}
        service_request = {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "category": [
                {"coding": [{"system": _SNOMED, "code": "3457005", "display": "Patient referral"}]}
            ],
            "code": {
                "coding": [{"system": COLLAB_SYSTEM, "code": "referral", "display": "Referral"}]
            },
            "subject": {"reference": f"Patient/{patient_id}"},
            "authoredOn": _instant(now),
            "occurrencePeriod": period,
            "requester": {"reference": f"Practitioner/{requester}"}
            if requester
            else _org_ref(from_org, self._org_code(from_org)),
            "performer": performers,
            "reasonCode": [{"text": reason}],
        }
        # The clinician's own repository decides this write: they must be allowed to write to
        # the patient's record, or the referral does not exist (404, like any invisible patient).
        self._repo.create(service_request, resource_id=sr_id)
        task = {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "code": {
                "coding": [
                    {"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}
                ]
            },
            # No Task.for: the records store files Task outside the patient's compartment (under
            # the organisation's key), so the patient is reached through the focus instead and
            # crypto-shredding the patient leaves nothing identifying behind here.
            "focus": {"reference": f"ServiceRequest/{sr_id}"},
            "authoredOn": _instant(now),
            "lastModified": _instant(now),
            "requester": _org_ref(from_org, self._org_code(from_org)),
            "owner": _org_ref(receiving.id, receiving.code),
            "restriction": {
                "period": period,
                "recipient": [
                    {"reference": f"Practitioner/{to_practitioner_id}"}
                    if to_practitioner_id
                    else _org_ref(receiving.id, receiving.code)
                ],
            },
            "input": [
                {
                    "type": {"coding": [{"system": COLLAB_SYSTEM, "code": "data-scope"}]},
                    "valueCode": t,
                }
                for t in (sorted(types) if types is not None else ["*"])
            ],
        }
        self._repo.create(task, resource_id=task_id)
        record = ReferralRecord(
            id=referral_id,
            patient_id=patient_id,
            service_request_id=sr_id,
            task_id=task_id,
            from_org_id=from_org,
            from_user_id=user_id,
            to_org_id=receiving.id,
            to_practitioner_id=to_practitioner_id,
            scope=",".join(sorted(types)) if types is not None else None,
            starts_at=start,
            ends_at=end,
            status=ReferralStatus.REQUESTED,
            created_at=now,
        )
        self._db.add(record)
        self._db.flush()
        self._repo.record_event(
            EventType.REFERRAL_CREATED,
            Entity(patient_id, "ServiceRequest", sr_id),
            self._step_reasons(record),
        )
        return self._view(record)

    @staticmethod
    def _check_scope(scope: Sequence[str] | None) -> frozenset[str] | None:
        if scope is None:
            return None
        if not scope:
            raise InvalidInput("name at least one resource type, or omit the scope for all data")
        known = resource_types()
        unknown = [t for t in scope if t not in known]
        if unknown:
            shown = unknown[0][:64] if unknown[0].isalnum() else "(a value that cannot be shown)"
            raise InvalidInput(f"the scope names {shown!r}, which is not a FHIR R4 resource type")
        return frozenset(scope)

    def _named_users(self, org_id: uuid.UUID, practitioner_id: str) -> list[uuid.UUID]:
        """The accounts of a named practitioner that hold a clinical role at ``org_id``."""
        linked = self._access.practitioner_users(practitioner_id)
        return sorted(self._clinical_members(org_id, linked))

    def _step_reasons(self, record: ReferralRecord) -> tuple[str, ...]:
        scope = record.scope or "*"
        return (
            f"referral={record.id}",
            f"from={record.from_org_id}",
            f"to={record.to_org_id}",
            f"scope={scope[:150]}",
            f"period={_instant(record.starts_at)}/{_instant(record.ends_at)}",
        )

    def _get(self, referral_id: str) -> ReferralRecord:
        try:
            key = uuid.UUID(referral_id)
        except ValueError:
            raise NotFound("no such referral") from None
        record = self._db.get(ReferralRecord, key)
        if record is None:
            raise NotFound("no such referral")
        return record

    def _side(self, record: ReferralRecord) -> ReferralSide | None:
        """Which party the caller is, in the organisation they act for; None if none."""
        if record.patient_id in self._own_patients():
            return ReferralSide.PATIENT
        if self._is_clinician() and self._ctx.org_id is not None:
            if self._ctx.org_id == record.from_org_id:
                return ReferralSide.REFERRING
            if self._ctx.org_id == record.to_org_id:
                return ReferralSide.RECEIVING
        return None

    def _party(self, referral_id: str) -> tuple[ReferralRecord, ReferralSide]:
        record = self._get(referral_id)
        side = self._side(record)
        if side is None:
            raise NotFound("no such referral")
        return record, side

    def _update_resources(
        self,
        record: ReferralRecord,
        *,
        task_status: str,
        request_status: str | None = None,
        note: str | None = None,
        status_reason: str | None = None,
    ) -> None:
        repo = self._workflow(_REFERRAL_CONTEXT)
        now = self._now()
        task = dict(repo.read("Task", record.task_id).body or {})
        task.pop("meta", None)
        task["status"] = task_status
        task["lastModified"] = _instant(now)
        if status_reason is not None:
            # A coded, platform-written reason: the Task sits under the organisation's key.
            task["statusReason"] = {"coding": [{"system": COLLAB_SYSTEM, "code": status_reason}]}
        repo.update("Task", record.task_id, task)
        if request_status is None and note is None:
            return
        request = dict(repo.read("ServiceRequest", record.service_request_id).body or {})
        request.pop("meta", None)
        if request_status is not None:
            request["status"] = request_status
        if note is not None:
            request["note"] = [*request.get("note", []), {"text": note, "time": _instant(now)}]
        repo.update("ServiceRequest", record.service_request_id, request)

    def accept(self, referral_id: str) -> ReferralView:
        record, side = self._party(referral_id)
        self._require_clinician()
        if side is not ReferralSide.RECEIVING:
            raise PermissionDenied("only the receiving organisation accepts a referral")
        now = self._now()
        if record.status is not ReferralStatus.REQUESTED:
            raise Conflict(f"the referral is already {referral_status(record, now)}")
        if now >= record.ends_at:
            raise ReferralExpired(
                f"the referral's period ended at {_instant(record.ends_at)}; "
                "ask the referring side for a new referral"
            )
        users: list[uuid.UUID | None] = [None]
        if record.to_practitioner_id is not None:
            users = list(self._named_users(record.to_org_id, record.to_practitioner_id))
            if not users:
                raise Conflict(
                    "the named practitioner no longer has an account at your organisation"
                )
        won = self._transition(
            update(ReferralRecord)
            .where(
                ReferralRecord.id == record.id, ReferralRecord.status == ReferralStatus.REQUESTED
            )
            .values(status=ReferralStatus.ACCEPTED, decided_at=now, decided_by=self._user_id())
        )
        if not won:
            raise Conflict("the referral was decided by someone else a moment ago")
        self._db.refresh(record)
        self._access.replace_relationships(
            f"referral:{record.id}",
            record.patient_id,
            RelationshipKind.REFERRAL,
            [(record.to_org_id, user, record.starts_at, record.ends_at) for user in users],
            scope=_scope_of(record),
        )
        self._update_resources(record, task_status="accepted")
        self._repo.record_event(
            EventType.REFERRAL_ACCEPTED,
            Entity(record.patient_id, "ServiceRequest", record.service_request_id),
            (*self._step_reasons(record), f"accounts={len(users)}"),
        )
        self._db.flush()
        return self._view(record)

    def decline(self, referral_id: str, note: str | None = None) -> ReferralView:
        record, side = self._party(referral_id)
        self._require_clinician()
        if side is not ReferralSide.RECEIVING:
            raise PermissionDenied("only the receiving organisation declines a referral")
        if note is not None:
            note = _text(note, "the note", maximum=MAX_NOTE_LENGTH)
        now = self._now()
        return self._end(
            record,
            update(ReferralRecord)
            .where(
                ReferralRecord.id == record.id, ReferralRecord.status == ReferralStatus.REQUESTED
            )
            .values(status=ReferralStatus.DECLINED, decided_at=now, decided_by=self._user_id()),
            now=now,
            task_status="rejected",
            status_reason="declined",
            note=note,
            event=EventType.REFERRAL_DECLINED,
        )

    def revoke(self, referral_id: str, note: str | None = None) -> ReferralView:
        """The referring side, the receiving side or the patient (or guardian) ends the referral."""
        record, side = self._party(referral_id)
        if side is ReferralSide.PATIENT:
            self._user_id()
        else:
            self._require_clinician()
        if note is not None:
            note = _text(note, "the note", maximum=MAX_NOTE_LENGTH)
        now = self._now()
        return self._end(
            record,
            update(ReferralRecord)
            .where(
                ReferralRecord.id == record.id,
                ReferralRecord.status.in_([ReferralStatus.REQUESTED, ReferralStatus.ACCEPTED]),
            )
            .values(
                status=ReferralStatus.REVOKED,
                revoked_at=now,
                revoked_by=self._user_id(),
                revoked_side=side.value,
            ),
            now=now,
            task_status="cancelled",
            status_reason=f"revoked-by-{side.value}",
            note=note,
            event=EventType.REFERRAL_REVOKED,
            reasons=(f"side={side.value}",),
        )

    def _end(
        self,
        record: ReferralRecord,
        transition: Update,
        *,
        now: datetime,
        task_status: str,
        status_reason: str,
        note: str | None,
        event: EventType,
        reasons: tuple[str, ...] = (),
    ) -> ReferralView:
        """Decline or revoke: win the conditional transition, remove the referral's care
        relationship, mark the Task and the ServiceRequest, audit the step."""
        if not self._transition(transition):
            self._db.refresh(record)
            raise Conflict(f"the referral is already {referral_status(record, now)}")
        self._db.refresh(record)
        self._access.replace_relationships(
            f"referral:{record.id}", record.patient_id, RelationshipKind.REFERRAL, []
        )
        self._update_resources(
            record,
            task_status=task_status,
            request_status="revoked",
            note=note,
            status_reason=status_reason,
        )
        self._repo.record_event(
            event,
            Entity(record.patient_id, "ServiceRequest", record.service_request_id),
            (*self._step_reasons(record), *reasons),
        )
        return self._view(record)

    def list_mine(self, *, limit: int = 100) -> list[ReferralView]:
        """Referrals the caller is party to: their organisation's (both directions) for
        clinicians, their own (or their wards') for patients and guardians."""
        conditions: list[ColumnElement[bool]] = []
        patients = self._own_patients()
        if patients:
            conditions.append(ReferralRecord.patient_id.in_(sorted(patients)))
        if self._is_clinician():
            self._require_clinician(Permission.CLINICAL_RECORD_READ)
            org = self._org_id()
            conditions.append(
                or_(ReferralRecord.from_org_id == org, ReferralRecord.to_org_id == org)
            )
        if not conditions:
            raise PermissionDenied("referrals are visible to clinicians and to their patients")
        rows = self._db.scalars(
            select(ReferralRecord)
            .where(or_(*conditions))
            .order_by(ReferralRecord.created_at.desc(), ReferralRecord.id)
            .limit(limit)
        ).all()
        listed = tuple(sorted({r.patient_id for r in rows}))
        if listed:
            self._repo.record_event(
                EventType.REFERRAL_LISTED,
                Entity(
                    listed[0] if len(listed) == 1 else None,
                    "ServiceRequest",
                    patients=listed,
                ),
                (f"referrals={len(rows)}",),
            )
        return [self._view(r) for r in rows]

    def get(self, referral_id: str) -> ReferralView:
        """One referral with its reason and notes, read from the ServiceRequest (audited)."""
        record, side = self._party(referral_id)
        if side is ReferralSide.PATIENT:
            # Patients read their own record through their own repository: the policy decides.
            reader = self._repo
        else:
            self._require_clinician(Permission.CLINICAL_RECORD_READ)
            reader = self._workflow(_REFERRAL_CONTEXT)
        body = reader.read("ServiceRequest", record.service_request_id).body or {}
        reasons = body.get("reasonCode") or [{}]
        notes = tuple(str(n.get("text", "")) for n in body.get("note") or [])
        return dataclasses.replace(
            self._view(record), reason=str(reasons[0].get("text") or ""), notes=notes
        )

    def _view(self, record: ReferralRecord) -> ReferralView:
        scope = _scope_of(record)
        return ReferralView(
            id=record.service_request_id,
            task_id=record.task_id,
            patient_id=record.patient_id,
            from_org=self._org_code(record.from_org_id),
            to_org=self._org_code(record.to_org_id),
            to_practitioner_id=record.to_practitioner_id,
            scope=tuple(sorted(scope)) if scope is not None else None,
            starts_at=record.starts_at,
            ends_at=record.ends_at,
            status=referral_status(record, self._now()),
            created_at=record.created_at,
            decided_at=record.decided_at,
            revoked_at=record.revoked_at,
            revoked_side=record.revoked_side,
        )


# Consultations -----------------------------------------------------------------------------------

MAX_TOPIC_LENGTH: Final = 200
MAX_MESSAGE_LENGTH: Final = 20_000
MAX_INVITATION_DAYS: Final = 30
DEFAULT_INVITATION_DAYS: Final = 7
#: The default limit on one attachment; the transport's body limit (``max_body_bytes``) may be
#: lower, and then it decides first.
MAX_ATTACHMENT_BYTES: Final = 20 * 1024 * 1024
MAX_FILENAME_LENGTH: Final = 255
_CONSULT_CONTEXT: Final = "collab-consultation"
#: The policy's resource type for a case discussion about a patient (FHIR Communication).
_DISCUSSION_TYPE: Final = "Communication"
_AAD_LABEL: Final = b"medcollab/consultation/v1"
_CONSENT_SCOPES: Final = frozenset({"patient-privacy", "treatment"})


def _aad(kind: bytes, consult_id: uuid.UUID, row_id: uuid.UUID, patient_id: str) -> bytes:
    """Binds a sealed value to its kind, thread, row and patient: moved ciphertexts do not open."""
    return length_prefixed(_AAD_LABEL, kind, consult_id.bytes, row_id.bytes, patient_id.encode())


@dataclass(frozen=True, slots=True)
class ParticipantView:
    user_id: uuid.UUID
    name: str
    org: str
    role: str
    joined_at: datetime


@dataclass(frozen=True, slots=True)
class InvitationView:
    id: uuid.UUID
    consultation_id: uuid.UUID
    patient_id: str
    invitee_user_id: uuid.UUID
    invitee_org: str
    invited_by: str
    basis: str
    #: ``pending``, ``accepted``, ``declined``, ``revoked`` or ``expired`` (computed).
    status: str
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ConsultationView:
    id: uuid.UUID
    patient_id: str
    org: str
    topic: str
    status: str
    created_at: datetime
    closed_at: datetime | None
    archived_at: datetime | None
    my_role: str | None
    participants: tuple[ParticipantView, ...] = ()
    invitations: tuple[InvitationView, ...] = ()


@dataclass(frozen=True, slots=True)
class MessageView:
    id: uuid.UUID
    author_user_id: uuid.UUID
    author_name: str
    author_org: str
    created_at: datetime
    #: Exactly as written. It is data, never markup: renderers escape it.
    text: str


@dataclass(frozen=True, slots=True)
class AttachmentView:
    id: uuid.UUID
    uploaded_by: uuid.UUID
    uploader_name: str
    org: str
    created_at: datetime
    media_type: str
    size: int
    filename: str


def invitation_status(record: InvitationRecord, now: datetime) -> str:
    if record.status is InvitationStatus.PENDING and now >= record.expires_at:
        return "expired"
    return record.status.value


class ConsultationService(_Service):
    """Case discussions about one patient across organisations (see the module docstring)."""

    def __init__(
        self,
        *,
        repo: RecordRepository,
        runtime: Runtime,
        max_attachment_bytes: int = MAX_ATTACHMENT_BYTES,
    ) -> None:
        super().__init__(repo=repo, runtime=runtime)
        self._max_attachment_bytes = max_attachment_bytes
        self._consents: dict[str, list[dict[str, Any]]] = {}
        self._names: dict[uuid.UUID, str] = {}

    # Sealing -----------------------------------------------------------------------------------

    def _seal(
        self, kind: bytes, consult: ConsultationRecord, row_id: uuid.UUID, data: bytes
    ) -> bytes:
        aad = _aad(kind, consult.id, row_id, consult.patient_id)
        return self._keys.seal("patient", consult.patient_id, data, aad=aad)

    def _unseal(
        self, kind: bytes, consult: ConsultationRecord, row_id: uuid.UUID, blob: bytes
    ) -> bytes:
        aad = _aad(kind, consult.id, row_id, consult.patient_id)
        try:
            return self._keys.unseal("patient", consult.patient_id, blob, aad=aad)
        except IntegrityError:
            self._integrity_failure(consult, kind)

    def _integrity_failure(self, consult: ConsultationRecord, kind: bytes) -> NoReturn:
        self._repo.record_event(
            EventType.RECORD_INTEGRITY_FAILURE,
            Entity(consult.patient_id, "Consultation", str(consult.id)),
            (f"sealed-{kind.decode()}-failed-authentication",),
            outcome=Outcome.MAJOR_FAILURE,
        )
        raise RecordIntegrityFailure(
            "a stored consultation item failed its integrity check; it has been withheld and "
            "the security officer alerted"
        )

    def _name(self, user_id: uuid.UUID) -> str:
        if user_id not in self._names:
            self._names[user_id] = self._display_name(user_id)
        return self._names[user_id]

    # The basis for seeing a patient's case -------------------------------------------------------

    def _patient_consents(self, patient_id: str) -> list[dict[str, Any]]:
        """The patient's Consents, read through the repository (audited, like any read)."""
        if patient_id not in self._consents:
            page = self._workflow(_CONSULT_CONTEXT).search(
                "Consent",
                {"patient": [f"Patient/{patient_id}"]},
                count=self._repo.settings.fhir_max_page_size,
            )
            self._consents[patient_id] = [dict(s.body or {}) for s in page.entries]
        return self._consents[patient_id]

    def _basis(
        self,
        *,
        user_id: uuid.UUID,
        org_id: uuid.UUID,
        roles: frozenset[Role],
        patient_id: str,
        profile: JurisdictionProfile,
    ) -> str:
        """Why this clinician may see the patient's case; raises :class:`ConsentRequired` if
        nothing allows it. The order and the rules are in the module docstring."""
        probe = self._repository(
            AccessContext(user_id=user_id, org_id=org_id, roles=roles, purpose=Purpose.TREAT)
        )
        decision = probe.explain(Action.READ, _DISCUSSION_TYPE, patient_id)
        if decision.permitted:
            return decision.reasons[0].split(" until ", 1)[0][:200]
        if not any(r.startswith("no-care-relationship") for r in decision.reasons):
            # Sanctions, lapsed training, a role that may not see the case, or the patient's
            # consent denying the organisation: nothing below may override these. Only a consent
            # denial is named; the others are facts about a colleague, kept to the audit log.
            if any(r.startswith("consent-denies") for r in decision.reasons):
                raise ConsentRequired(
                    "the patient's consent denies sharing with that organisation",
                    hint=decision.reasons[0][:200],
                )
            raise ConsentRequired(
                "this clinician may not take part in the patient's case (their role, training "
                "or an access restriction does not allow it)",
                hint=decision.reasons[0][:200],
            )
        consents = self._patient_consents(patient_id)
        org_codes = self._access.org_ids_by_code()
        now = self._now()
        denied = directives(consents, now, org_codes).denied_orgs
        if str(org_id) in denied:
            raise ConsentRequired("the patient's consent denies sharing with that organisation")
        code = self._org_code(org_id)
        for consent in consents:
            if _consent_permits(consent, org_id, code, now):
                return f"consent:Consent/{consent.get('id')}"
        if treatment_disclosure_allowed(profile):
            source = TREATMENT_DISCLOSURE_WITHOUT_CONSENT[profile.code].source
            return f"jurisdiction:{profile.code.value}:{source}"[:200]
        raise ConsentRequired(
            f"the clinician has no care relationship with the patient and the patient has not "
            f"consented to sharing with {code}; the patient can record a Consent (scope "
            f"patient-privacy or treatment) that permits {code}, or the clinician's organisation "
            "needs a care relationship (a referral, for example)"
        )

    def _participant_roles(self, user_id: uuid.UUID, org_id: uuid.UUID) -> frozenset[Role]:
        return self._clinical_members(org_id, [user_id]).get(user_id, frozenset())

    # Finding a thread --------------------------------------------------------------------------

    def _thread(self, consult_id: str) -> ConsultationRecord:
        try:
            key = uuid.UUID(consult_id)
        except ValueError:
            raise NotFound("no such consultation") from None
        consult = self._db.get(ConsultationRecord, key)
        if consult is None:
            raise NotFound("no such consultation")
        return consult

    def _member(self, consult_id: str) -> tuple[ConsultationRecord, ParticipantRecord]:
        """The thread and the caller's participation, with a live basis; else 404 or 403.

        Participation is per organisation: a clinician must act for the organisation they joined
        for. Every refusal is audited with the patient named.
        """
        consult = self._thread(consult_id)
        if not self._is_clinician() or self._ctx.user_id is None:
            self._deny(consult, "not-a-clinician")
        participant = self._db.scalar(
            select(ParticipantRecord).where(
                ParticipantRecord.consult_id == consult.id,
                ParticipantRecord.user_id == self._ctx.user_id,
            )
        )
        if participant is None or participant.org_id != self._ctx.org_id:
            self._deny(consult, "not-a-participant")
        if self._ctx.purpose is not Purpose.TREAT:
            raise PermissionDenied("case discussions are for treatment (X-Purpose-Of-Use: TREAT)")
        try:
            self._basis(
                user_id=participant.user_id,
                org_id=participant.org_id,
                roles=self._ctx.roles,
                patient_id=consult.patient_id,
                profile=self._profile_of(consult.org_id),
            )
        except ConsentRequired as refused:
            self._repo.record_event(
                EventType.CONSULTATION_ACCESS_DENIED,
                Entity(consult.patient_id, "Consultation", str(consult.id)),
                ("basis-lapsed", refused.diagnostics()[:300]),
                outcome=Outcome.MINOR_FAILURE,
            )
            raise ConsultationAccessEnded(
                "your access to this case has ended: " + refused.message
            ) from None
        return consult, participant

    def participation(self, consult_id: str) -> tuple[ConsultationRecord, ParticipantRecord]:
        """The thread and the caller's participation with a live basis, for services that add
        to a thread (imaging shares); refusals are audited and answered 404 or 403."""
        return self._member(consult_id)

    def _deny(self, consult: ConsultationRecord, reason: str) -> NoReturn:
        self._repo.record_event(
            EventType.CONSULTATION_ACCESS_DENIED,
            Entity(consult.patient_id, "Consultation", str(consult.id)),
            (reason,),
            outcome=Outcome.MINOR_FAILURE,
        )
        raise _ConsultationNotFound("no such consultation")

    @staticmethod
    def _require_open(consult: ConsultationRecord) -> None:
        if consult.status is not ConsultationStatus.OPEN:
            raise Conflict(f"the consultation is {consult.status.value}; it takes no new content")

    def _entity(self, consult: ConsultationRecord, kind: str = "Consultation") -> Entity:
        return Entity(consult.patient_id, kind, str(consult.id))

    # Threads -----------------------------------------------------------------------------------

    def create(self, *, patient_id: str, topic: str) -> ConsultationView:
        """Open a thread about a patient the caller may write for (the policy decides)."""
        self._require_clinician()
        _check_fhir_id(patient_id, "a patient id")
        topic = _text(topic, "the topic", maximum=MAX_TOPIC_LENGTH)
        if self._ctx.purpose is not Purpose.TREAT:
            raise PermissionDenied("case discussions are for treatment (X-Purpose-Of-Use: TREAT)")
        user_id, org_id = self._user_id(), self._org_id()
        decision = self._repo.explain(Action.CREATE, _DISCUSSION_TYPE, patient_id)
        consult_id = uuid.uuid4()
        entity = Entity(patient_id, "Consultation", str(consult_id))
        if not decision.permitted:
            self._repo.record_event(
                EventType.CONSULTATION_CREATED,
                entity,
                decision.reasons,
                outcome=Outcome.MINOR_FAILURE,
            )
            raise _ConsultationNotFound(f"Patient/{patient_id} not found")
        now = self._now()
        consult = ConsultationRecord(
            id=consult_id,
            patient_id=patient_id,
            org_id=org_id,
            created_by=user_id,
            topic_enc=b"",
            status=ConsultationStatus.OPEN,
            created_at=now,
        )
        consult.topic_enc = self._seal(b"topic", consult, consult_id, topic.encode("utf-8"))
        self._db.add(consult)
        self._db.flush()
        self._db.add(
            ParticipantRecord(
                consult_id=consult_id,
                user_id=user_id,
                org_id=org_id,
                role=ParticipantRole.OWNER,
                joined_at=now,
            )
        )
        self._db.flush()
        self._repo.record_event(EventType.CONSULTATION_CREATED, entity, decision.reasons[:1])
        return self._view(consult, topic, ParticipantRole.OWNER)

    def _view(
        self,
        consult: ConsultationRecord,
        topic: str,
        role: ParticipantRole | None,
        *,
        detail: bool = False,
    ) -> ConsultationView:
        participants: tuple[ParticipantView, ...] = ()
        invitations: tuple[InvitationView, ...] = ()
        if detail:
            participants = tuple(
                ParticipantView(
                    p.user_id, self._name(p.user_id), self._org_code(p.org_id), p.role, p.joined_at
                )
                for p in self._db.scalars(
                    select(ParticipantRecord)
                    .where(ParticipantRecord.consult_id == consult.id)
                    .order_by(ParticipantRecord.joined_at, ParticipantRecord.id)
                )
            )
            invitations = tuple(
                self._invitation_view(i, consult)
                for i in self._db.scalars(
                    select(InvitationRecord)
                    .where(InvitationRecord.consult_id == consult.id)
                    .order_by(InvitationRecord.created_at, InvitationRecord.id)
                )
            )
        return ConsultationView(
            id=consult.id,
            patient_id=consult.patient_id,
            org=self._org_code(consult.org_id),
            topic=topic,
            status=consult.status.value,
            created_at=consult.created_at,
            closed_at=consult.closed_at,
            archived_at=consult.archived_at,
            my_role=role.value if role is not None else None,
            participants=participants,
            invitations=invitations,
        )

    def get(self, consult_id: str) -> ConsultationView:
        consult, me = self._member(consult_id)
        topic = self._unseal(b"topic", consult, consult.id, consult.topic_enc).decode("utf-8")
        self._repo.record_event(EventType.CONSULTATION_READ, self._entity(consult), ("thread",))
        return self._view(consult, topic, me.role, detail=True)

    def list_mine(self, *, include_archived: bool = False) -> list[ConsultationView]:
        """The caller's threads (in the organisation they act for), topics included; each thread
        shown is audited as a read. Threads whose basis has lapsed are left out."""
        self._require_clinician(Permission.CLINICAL_RECORD_READ)
        query = (
            select(ConsultationRecord, ParticipantRecord)
            .join(ParticipantRecord, ParticipantRecord.consult_id == ConsultationRecord.id)
            .where(
                ParticipantRecord.user_id == self._user_id(),
                ParticipantRecord.org_id == self._org_id(),
            )
            .order_by(ConsultationRecord.created_at.desc(), ConsultationRecord.id)
            .limit(200)
        )
        if not include_archived:
            query = query.where(ConsultationRecord.status != ConsultationStatus.ARCHIVED)
        views: list[ConsultationView] = []
        for consult, participant in self._db.execute(query):
            try:
                self._basis(
                    user_id=participant.user_id,
                    org_id=participant.org_id,
                    roles=self._ctx.roles,
                    patient_id=consult.patient_id,
                    profile=self._profile_of(consult.org_id),
                )
            except ConsentRequired:
                continue
            topic = self._unseal(b"topic", consult, consult.id, consult.topic_enc)
            self._repo.record_event(EventType.CONSULTATION_READ, self._entity(consult), ("listed",))
            views.append(self._view(consult, topic.decode("utf-8"), participant.role))
        return views

    def close(self, consult_id: str) -> ConsultationView:
        return self._finish(consult_id, archive=False)

    def archive(self, consult_id: str) -> ConsultationView:
        return self._finish(consult_id, archive=True)

    def _finish(self, consult_id: str, *, archive: bool) -> ConsultationView:
        """Close (no new content, pending invitations withdrawn) or archive a closed thread;
        both stay readable by their participants, and only the owner does either."""
        consult, me = self._member(consult_id)
        if me.role is not ParticipantRole.OWNER:
            raise PermissionDenied("only the consultation's owner closes or archives it")
        now = self._now()
        if archive:
            won = self._transition(
                update(ConsultationRecord)
                .where(
                    ConsultationRecord.id == consult.id,
                    ConsultationRecord.status == ConsultationStatus.CLOSED,
                )
                .values(status=ConsultationStatus.ARCHIVED, archived_at=now)
            )
            event, needs = EventType.CONSULTATION_ARCHIVED, "closed before it is archived"
        else:
            won = self._transition(
                update(ConsultationRecord)
                .where(
                    ConsultationRecord.id == consult.id,
                    ConsultationRecord.status == ConsultationStatus.OPEN,
                )
                .values(status=ConsultationStatus.CLOSED, closed_at=now)
            )
            event, needs = EventType.CONSULTATION_CLOSED, "open to be closed"
        if not won:
            self._db.refresh(consult)
            raise Conflict(f"the consultation is {consult.status.value}; it must be {needs}")
        if not archive:
            self._db.execute(
                update(InvitationRecord)
                .where(
                    InvitationRecord.consult_id == consult.id,
                    InvitationRecord.status == InvitationStatus.PENDING,
                )
                .values(status=InvitationStatus.REVOKED, decided_at=now)
            )
        self._db.refresh(consult)
        self._repo.record_event(event, self._entity(consult))
        topic = self._unseal(b"topic", consult, consult.id, consult.topic_enc).decode("utf-8")
        return self._view(consult, topic, me.role)

    # Invitations -------------------------------------------------------------------------------

    def invite(
        self,
        consult_id: str,
        *,
        user_id: uuid.UUID,
        org: str,
        days: int = DEFAULT_INVITATION_DAYS,
    ) -> InvitationView:
        consult, me = self._member(consult_id)
        if me.role is not ParticipantRole.OWNER:
            raise PermissionDenied("only the consultation's owner invites participants")
        self._require_open(consult)
        if not 1 <= days <= MAX_INVITATION_DAYS:
            raise InvalidInput(f"an invitation is valid for 1-{MAX_INVITATION_DAYS} days")
        invitee_org = self._org_by_code(org)
        roles = self._participant_roles(user_id, invitee_org.id)
        if not roles:
            raise NotFound(f"no clinician with that id works at {invitee_org.code}")
        already = self._db.scalar(
            select(ParticipantRecord.id).where(
                ParticipantRecord.consult_id == consult.id, ParticipantRecord.user_id == user_id
            )
        )
        if already is not None:
            raise Conflict("that clinician already takes part in this consultation")
        now = self._now()
        pending = self._db.scalar(
            select(InvitationRecord.id).where(
                InvitationRecord.consult_id == consult.id,
                InvitationRecord.invitee_user_id == user_id,
                InvitationRecord.status == InvitationStatus.PENDING,
                InvitationRecord.expires_at > now,
            )
        )
        if pending is not None:
            raise Conflict("that clinician already has a pending invitation")
        invitation_id = uuid.uuid4()
        entity = Entity(consult.patient_id, "Consultation", str(consult.id))
        try:
            basis = self._basis(
                user_id=user_id,
                org_id=invitee_org.id,
                roles=roles,
                patient_id=consult.patient_id,
                profile=self._profile_of(consult.org_id),
            )
        except ConsentRequired as refused:
            self._repo.record_event(
                EventType.CONSULTATION_INVITATION_REFUSED,
                entity,
                (
                    f"invitee={user_id}",
                    f"invitee-org={invitee_org.id}",
                    refused.diagnostics()[:300],
                ),
                outcome=Outcome.MINOR_FAILURE,
            )
            raise
        invitation = InvitationRecord(
            id=invitation_id,
            consult_id=consult.id,
            invitee_user_id=user_id,
            invitee_org_id=invitee_org.id,
            invited_by=self._user_id(),
            basis=basis,
            status=InvitationStatus.PENDING,
            created_at=now,
            expires_at=now + timedelta(days=days),
        )
        self._db.add(invitation)
        self._db.flush()
        self._repo.record_event(
            EventType.CONSULTATION_INVITED,
            entity,
            (f"invitation={invitation_id}", f"invitee={user_id}", f"basis={basis}"),
        )
        return self._invitation_view(invitation, consult)

    def _invitation_view(
        self, invitation: InvitationRecord, consult: ConsultationRecord
    ) -> InvitationView:
        return InvitationView(
            id=invitation.id,
            consultation_id=invitation.consult_id,
            patient_id=consult.patient_id,
            invitee_user_id=invitation.invitee_user_id,
            invitee_org=self._org_code(invitation.invitee_org_id),
            invited_by=self._name(invitation.invited_by),
            basis=invitation.basis,
            status=invitation_status(invitation, self._now()),
            created_at=invitation.created_at,
            expires_at=invitation.expires_at,
        )

    def my_invitations(self) -> list[InvitationView]:
        """Invitations waiting for the caller, in any organisation."""
        self._require_clinician(Permission.CLINICAL_RECORD_READ)
        rows = self._db.execute(
            select(InvitationRecord, ConsultationRecord)
            .join(ConsultationRecord, ConsultationRecord.id == InvitationRecord.consult_id)
            .where(
                InvitationRecord.invitee_user_id == self._user_id(),
                InvitationRecord.status == InvitationStatus.PENDING,
            )
            .order_by(InvitationRecord.created_at.desc(), InvitationRecord.id)
            .limit(200)
        )
        return [self._invitation_view(i, c) for i, c in rows]

    def _my_invitation(
        self, consult_id: str, invitation_id: str
    ) -> tuple[ConsultationRecord, InvitationRecord]:
        consult = self._thread(consult_id)
        try:
            key = uuid.UUID(invitation_id)
        except ValueError:
            raise NotFound("no such invitation") from None
        invitation = self._db.get(InvitationRecord, key)
        if (
            invitation is None
            or invitation.consult_id != consult.id
            or invitation.invitee_user_id != self._ctx.user_id
        ):
            raise NotFound("no such invitation")
        return consult, invitation

    def accept_invitation(self, consult_id: str, invitation_id: str) -> ConsultationView:
        """Join the thread: the invitee, acting for the invited organisation, before expiry and
        with a basis that still holds."""
        self._require_clinician(Permission.CLINICAL_RECORD_READ)
        consult, invitation = self._my_invitation(consult_id, invitation_id)
        if self._ctx.org_id != invitation.invitee_org_id:
            raise PermissionDenied(
                f"act for {self._org_code(invitation.invitee_org_id)} (X-Organization) to accept"
            )
        now = self._now()
        if invitation.status is not InvitationStatus.PENDING:
            raise Conflict(f"the invitation is already {invitation.status.value}")
        if now >= invitation.expires_at:
            raise InvitationExpired(
                f"the invitation expired at {_instant(invitation.expires_at)}; "
                "ask the consultation's owner for a new one"
            )
        self._require_open(consult)
        basis = self._basis(
            user_id=self._user_id(),
            org_id=invitation.invitee_org_id,
            roles=self._ctx.roles,
            patient_id=consult.patient_id,
            profile=self._profile_of(consult.org_id),
        )
        won = self._transition(
            update(InvitationRecord)
            .where(
                InvitationRecord.id == invitation.id,
                InvitationRecord.status == InvitationStatus.PENDING,
            )
            .values(status=InvitationStatus.ACCEPTED, decided_at=now)
        )
        if not won:
            raise Conflict("the invitation was answered a moment ago")
        self._db.add(
            ParticipantRecord(
                consult_id=consult.id,
                user_id=self._user_id(),
                org_id=invitation.invitee_org_id,
                role=ParticipantRole.MEMBER,
                joined_at=now,
            )
        )
        self._db.flush()
        self._repo.record_event(
            EventType.CONSULTATION_JOINED,
            self._entity(consult),
            (f"invitation={invitation.id}", f"basis={basis}"),
        )
        topic = self._unseal(b"topic", consult, consult.id, consult.topic_enc).decode("utf-8")
        return self._view(consult, topic, ParticipantRole.MEMBER)

    def decline_invitation(self, consult_id: str, invitation_id: str) -> InvitationView:
        self._require_clinician(Permission.CLINICAL_RECORD_READ)
        consult, invitation = self._my_invitation(consult_id, invitation_id)
        now = self._now()
        won = self._transition(
            update(InvitationRecord)
            .where(
                InvitationRecord.id == invitation.id,
                InvitationRecord.status == InvitationStatus.PENDING,
            )
            .values(status=InvitationStatus.DECLINED, decided_at=now)
        )
        if not won:
            raise Conflict(f"the invitation is already {invitation.status.value}")
        self._db.refresh(invitation)
        self._repo.record_event(
            EventType.CONSULTATION_DECLINED,
            self._entity(consult),
            (f"invitation={invitation.id}",),
        )
        return self._invitation_view(invitation, consult)

    # Messages ----------------------------------------------------------------------------------

    def post_message(self, consult_id: str, text: str) -> MessageView:
        consult, me = self._member(consult_id)
        self._require_open(consult)
        text = _text(text, "the message", maximum=MAX_MESSAGE_LENGTH)
        message_id = uuid.uuid4()
        now = self._now()
        message = MessageRecord(
            id=message_id,
            consult_id=consult.id,
            author_user_id=me.user_id,
            author_org_id=me.org_id,
            created_at=now,
            body_enc=self._seal(b"message", consult, message_id, text.encode("utf-8")),
        )
        self._db.add(message)
        self._db.flush()
        self._repo.record_event(
            EventType.CONSULTATION_MESSAGE_POSTED,
            self._entity(consult),
            (f"message={message_id}",),
        )
        return MessageView(
            message_id, me.user_id, self._name(me.user_id), self._org_code(me.org_id), now, text
        )

    def messages(self, consult_id: str, *, limit: int = 200) -> list[MessageView]:
        consult, _me = self._member(consult_id)
        rows = self._db.scalars(
            select(MessageRecord)
            .where(MessageRecord.consult_id == consult.id)
            .order_by(MessageRecord.created_at, MessageRecord.id)
            .limit(limit)
        ).all()
        views = [
            MessageView(
                row.id,
                row.author_user_id,
                self._name(row.author_user_id),
                self._org_code(row.author_org_id),
                row.created_at,
                self._unseal(b"message", consult, row.id, row.body_enc).decode("utf-8"),
            )
            for row in rows
        ]
        self._repo.record_event(
            EventType.CONSULTATION_READ, self._entity(consult), (f"messages={len(rows)}",)
        )
        return views

    # Attachments -------------------------------------------------------------------------------

    def add_attachment(self, consult_id: str, *, filename: str, content: bytes) -> AttachmentView:
        consult, me = self._member(consult_id)
        self._require_open(consult)
        name = clean_filename(filename)
        if len(content) > self._max_attachment_bytes:
            raise AttachmentTooLarge(
                f"attachments are limited to {self._max_attachment_bytes} bytes; "
                f"this file has {len(content)}"
            )
        media_type = detect_media_type(content, name)
        attachment_id = uuid.uuid4()
        now = self._now()
        record = AttachmentRecord(
            id=attachment_id,
            consult_id=consult.id,
            uploaded_by=me.user_id,
            uploader_org_id=me.org_id,
            created_at=now,
            media_type=media_type,
            size=len(content),
            filename_enc=self._seal(b"attachment-name", consult, attachment_id, name.encode()),
            content_enc=self._seal(b"attachment", consult, attachment_id, content),
        )
        self._db.add(record)
        self._db.flush()
        self._repo.record_event(
            EventType.CONSULTATION_ATTACHMENT_ADDED,
            self._entity(consult),
            (f"attachment={attachment_id}", f"type={media_type}", f"size={len(content)}"),
        )
        return self._attachment_view(record, name)

    def _attachment_view(self, record: AttachmentRecord, name: str) -> AttachmentView:
        return AttachmentView(
            record.id,
            record.uploaded_by,
            self._name(record.uploaded_by),
            self._org_code(record.uploader_org_id),
            record.created_at,
            record.media_type,
            record.size,
            name,
        )

    def attachments(self, consult_id: str) -> list[AttachmentView]:
        consult, _me = self._member(consult_id)
        rows = self._db.scalars(
            select(AttachmentRecord)
            .where(AttachmentRecord.consult_id == consult.id)
            .order_by(AttachmentRecord.created_at, AttachmentRecord.id)
        ).all()
        views = [
            self._attachment_view(
                row,
                self._unseal(b"attachment-name", consult, row.id, row.filename_enc).decode(),
            )
            for row in rows
        ]
        self._repo.record_event(
            EventType.CONSULTATION_READ, self._entity(consult), (f"attachments={len(rows)}",)
        )
        return views

    def read_attachment(self, consult_id: str, attachment_id: str) -> tuple[AttachmentView, bytes]:
        consult, _me = self._member(consult_id)
        try:
            key = uuid.UUID(attachment_id)
        except ValueError:
            raise NotFound("no such attachment") from None
        record = self._db.get(AttachmentRecord, key)
        if record is None or record.consult_id != consult.id:
            raise NotFound("no such attachment")
        content = self._unseal(b"attachment", consult, record.id, record.content_enc)
        name = self._unseal(b"attachment-name", consult, record.id, record.filename_enc).decode()
        self._repo.record_event(
            EventType.CONSULTATION_ATTACHMENT_READ,
            Entity(consult.patient_id, "Binary", str(record.id)),
            (f"consultation={consult.id}", f"type={record.media_type}"),
        )
        return self._attachment_view(record, name), content

    # The patient's view ------------------------------------------------------------------------

    def list_for_patient(self, *, limit: int = 200) -> list[PatientConsultationView]:
        """The consultations about the caller's own patient record (or their wards'): topic,
        status and the organisations taking part, never the messages or files. Each thread shown
        is audited as a read naming its patient, so it appears in their access history."""
        self._user_id()
        patients = self._own_patients()
        if not patients:
            raise PermissionDenied("this list is for patients and their guardians")
        threads = self._db.scalars(
            select(ConsultationRecord)
            .where(ConsultationRecord.patient_id.in_(sorted(patients)))
            .order_by(ConsultationRecord.created_at.desc(), ConsultationRecord.id)
            .limit(limit)
        ).all()
        orgs: dict[uuid.UUID, set[uuid.UUID]] = {}
        if threads:
            for consult_id, org_id in self._db.execute(
                select(ParticipantRecord.consult_id, ParticipantRecord.org_id).where(
                    ParticipantRecord.consult_id.in_([t.id for t in threads])
                )
            ):
                orgs.setdefault(consult_id, set()).add(org_id)
        views = []
        for consult in threads:
            topic = self._unseal(b"topic", consult, consult.id, consult.topic_enc).decode("utf-8")
            self._repo.record_event(
                EventType.CONSULTATION_READ, self._entity(consult), ("patient-listed",)
            )
            views.append(
                PatientConsultationView(
                    id=consult.id,
                    patient_id=consult.patient_id,
                    org=self._org_code(consult.org_id),
                    topic=topic,
                    status=consult.status.value,
                    created_at=consult.created_at,
                    organisations=tuple(
                        sorted(self._org_code(o) for o in orgs.get(consult.id, {consult.org_id}))
                    ),
                )
            )
        return views


@dataclass(frozen=True, slots=True)
class PatientConsultationView:
    """A consultation as its patient sees it in a list: no messages, no files, no names."""

    id: uuid.UUID
    patient_id: str
    #: The organisation that opened the thread.
    org: str
    topic: str
    status: str
    created_at: datetime
    #: Every organisation with a participant in the thread.
    organisations: tuple[str, ...]


class _ConsultationNotFound(NotFound):
    """A refused consultation access looks like a missing one; its audit event is kept."""

    keeps_writes = True


def _consent_permits(
    consent: Mapping[str, Any], org_id: uuid.UUID, org_code: str, now: datetime
) -> bool:
    """An active Consent of a sharing scope with an in-period ``permit`` provision (at any
    depth) whose actor is the organisation."""
    if consent.get("status") != "active":
        return False
    codings = (consent.get("scope") or {}).get("coding") or []
    if not any(isinstance(c, dict) and c.get("code") in _CONSENT_SCOPES for c in codings):
        return False

    def walk(provision: Mapping[str, Any], inherited: str) -> bool:
        if not _in_period(provision.get("period"), now):
            return False
        kind = provision.get("type") or inherited
        if kind == "permit" and _names_org(provision, org_id, org_code):
            return True
        return any(walk(p, kind) for p in provision.get("provision") or [] if isinstance(p, dict))

    provision = consent.get("provision")
    # A permit must be explicit at the provision that names the organisation or above it.
    return isinstance(provision, dict) and walk(provision, "")


def _names_org(provision: Mapping[str, Any], org_id: uuid.UUID, org_code: str) -> bool:
    for actor in provision.get("actor") or []:
        ref = (actor or {}).get("reference") or {}
        if ref.get("reference") == f"Organization/{org_id}":
            return True
        identifier = ref.get("identifier") or {}
        if (
            identifier.get("system") == ORG_IDENTIFIER_SYSTEM
            and str(identifier.get("value") or "").upper() == org_code
        ):
            return True
    return False


def _in_period(period: object, now: datetime) -> bool:
    if not isinstance(period, dict):
        return True
    start = date_range(str(period["start"])) if period.get("start") else None
    end = date_range(str(period["end"])) if period.get("end") else None
    if period.get("start") and (start is None or now < start[0]):
        return False
    return not (period.get("end") and (end is None or now > end[1]))


# File types --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FileType:
    label: str
    media_type: str
    extensions: frozenset[str]


_PDF: Final = _FileType("PDF", "application/pdf", frozenset({".pdf"}))
_PNG: Final = _FileType("PNG", "image/png", frozenset({".png"}))
_JPEG: Final = _FileType("JPEG", "image/jpeg", frozenset({".jpg", ".jpeg", ".jpe"}))
# DICOM files are often written without an extension; "" accepts that.
_DICOM: Final = _FileType("DICOM", "application/dicom", frozenset({".dcm", ".dicom", ""}))
ACCEPTED_TYPES: Final = (_PDF, _PNG, _JPEG, _DICOM)
_BY_EXTENSION: Final = {ext: t for t in ACCEPTED_TYPES for ext in t.extensions if ext}
_ACCEPTED_LABELS: Final = "PDF, PNG, JPEG or DICOM"

#: Magic numbers of programs and scripts, refused whatever the file is called.
_EXECUTABLES: Final = (
    (b"\x7fELF", "an ELF executable"),
    (b"MZ", "a Windows (PE) executable"),
    (b"\xfe\xed\xfa\xce", "a Mach-O executable"),
    (b"\xfe\xed\xfa\xcf", "a Mach-O executable"),
    (b"\xce\xfa\xed\xfe", "a Mach-O executable"),
    (b"\xcf\xfa\xed\xfe", "a Mach-O executable"),
    (b"\xca\xfe\xba\xbe", "a Mach-O universal binary or Java class"),
    (b"#!", "a script"),
    (b"\x00asm", "a WebAssembly module"),
)
#: PDF name objects that run code, launch programs or carry files inside the document.
_ACTIVE_PDF_NAMES: Final = frozenset(
    {b"JavaScript", b"JS", b"Launch", b"EmbeddedFile", b"EmbeddedFiles", b"RichMedia"}
)
_PDF_NAME: Final = re.compile(rb"/([^\s/<>\[\]()%{}]+)")
_PDF_NAME_ESCAPE: Final = re.compile(rb"#([0-9A-Fa-f]{2})")


def _dicom_parser() -> Callable[[bytes], object] | None:
    """The de-identification package's DICOM parser (``medcollab.deid.dicom.parse_dicom``), when
    it and its DICOM library are installed; without them only the Part 10 framing is checked."""
    try:
        module = import_module("medcollab.deid.dicom")
    except ImportError:
        return None
    parse = getattr(module, "parse_dicom", None)
    return cast("Callable[[bytes], object]", parse) if callable(parse) else None


def _looks_like_dicom(content: bytes) -> bool:
    # DICOM Part 10: a 128-byte preamble, then "DICM", then the file meta group (0002,xxxx).
    return len(content) >= 136 and content[128:132] == b"DICM" and content[132:134] == b"\x02\x00"


def _check_dicom(content: bytes) -> None:
    """A file framed as DICOM must also parse as one instance (not a DICOMDIR, not truncated)."""
    parse = _dicom_parser()
    if parse is None:
        return
    try:
        parse(content)
    except PayloadTooLarge:
        raise
    except InvalidInput as refused:
        raise UnsafeAttachment(
            f"the file is not a readable DICOM file: {refused.message}"
        ) from None


def _sniff(content: bytes) -> _FileType | None:
    if content.startswith(b"%PDF-"):
        return _PDF
    if content.startswith(b"\x89PNG\r\n\x1a\n") and content[12:16] == b"IHDR":
        return _PNG
    if content.startswith(b"\xff\xd8\xff"):
        return _JPEG
    if _looks_like_dicom(content):
        return _DICOM
    return None


def _extension(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    return suffix if len(suffix) <= 10 else "?"


def detect_media_type(content: bytes, filename: str) -> str:
    """The media type of ``content``, judged from its bytes; the client's claims are not trusted.

    Refused: empty files; programs and scripts, by the magic number at the start where loaders
    look for it (which also catches PE/DICOM polyglots, whose PE header sits in the DICOM
    preamble); PDFs with active content; DICOM files that do not parse as one instance; anything
    that is not PDF, PNG, JPEG or DICOM; and a file whose name claims another type than its
    content.
    """
    if not content:
        raise InvalidInput("the file is empty")
    refuse_programs(content)
    ext = _extension(filename)
    claimed = _BY_EXTENSION.get(ext)
    found = _sniff(content)
    if found is None:
        what = f"named {ext} but is not a {claimed.label} file" if claimed else "not recognised"
        raise UnsafeAttachment(
            f"the file is {what}: its content is not {_ACCEPTED_LABELS} "
            "(file types are detected from the content, not from the name or Content-Type)"
        )
    if ext not in found.extensions:
        named = f"named {ext}" if claimed or ext == "" else "named with another extension"
        raise UnsafeAttachment(
            f"the file is {named} but its content is {found.label}; rename it to match its type"
        )
    if found is _PDF:
        _check_pdf(content)
    if found is _DICOM:
        _check_dicom(content)
    return found.media_type


def refuse_programs(content: bytes) -> None:
    """Refuse programs and scripts by the magic number at the start, where loaders look for it.

    DICOM's 128-byte preamble is free-form, so a DICOM file can also be a program (a PE/DICOM
    polyglot); this catches those too.
    """
    for magic, label in _EXECUTABLES:
        if content.startswith(magic):
            raise UnsafeAttachment(
                f"the file is {label}, not a document or image; only {_ACCEPTED_LABELS} files "
                "are accepted"
            )


def _check_pdf(content: bytes) -> None:
    for match in _PDF_NAME.finditer(content):
        name = _PDF_NAME_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), match.group(1))
        if name in _ACTIVE_PDF_NAMES:
            raise UnsafeAttachment(
                "the PDF contains active content (scripts, launch actions or embedded files), "
                "which is refused; print it to a plain PDF and attach that"
            )


def clean_filename(filename: str) -> str:
    """The base name only, without control characters, at most 255 characters."""
    base = PureWindowsPath(PurePosixPath(filename).name).name
    cleaned = "".join(ch for ch in base if ch.isprintable())
    if not cleaned.strip() or cleaned in (".", ".."):
        raise InvalidInput("the file needs a name")
    if len(cleaned) > MAX_FILENAME_LENGTH:
        raise InvalidInput(f"file names are at most {MAX_FILENAME_LENGTH} characters")
    return cleaned


# Appointments ------------------------------------------------------------------------------------

MAX_SLOTS_PER_REQUEST: Final = 200
MAX_SLOT_HOURS: Final = 12
MAX_SCHEDULE_DAYS: Final = 366
MAX_SLOT_LISTING: Final = 500
_BOOKING_CONTEXT: Final = "collab-booking"


@dataclass(frozen=True, slots=True)
class ScheduleView:
    id: str
    org: str
    practitioner_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SlotView:
    id: str
    schedule_id: str
    org: str
    practitioner_id: str
    starts_at: datetime
    ends_at: datetime
    status: str


@dataclass(frozen=True, slots=True)
class AppointmentView:
    id: str
    slot_id: str
    patient_id: str
    org: str
    practitioner_id: str
    starts_at: datetime
    ends_at: datetime
    status: str
    created_at: datetime
    cancelled_at: datetime | None


class AppointmentService(_Service):
    """Schedules and slots published by practitioners; bookings by patients and guardians."""

    def publish_schedule(
        self, *, days: int = 90, practitioner_id: str | None = None
    ) -> ScheduleView:
        """A Schedule for the caller's own Practitioner at the organisation they act for."""
        self._require_clinician()
        user_id, org_id = self._user_id(), self._org_id()
        if not 1 <= days <= MAX_SCHEDULE_DAYS:
            raise InvalidInput(f"a schedule's planning horizon is 1-{MAX_SCHEDULE_DAYS} days")
        links = [
            rid
            for kind, rid in UserService(session=self._db, runtime=self._runtime).links_of(user_id)
            if kind is FhirLinkKind.PRACTITIONER
        ]
        if practitioner_id is not None and practitioner_id not in links:
            raise PermissionDenied("you can publish only your own Practitioner's schedule")
        if not links:
            raise Conflict(
                "your account is not linked to a FHIR Practitioner; ask your administrator to "
                "link it before publishing a schedule"
            )
        practitioner = practitioner_id or links[0]
        now = self._now()
        stored = self._repo.create(
            {
                "resourceType": "Schedule",
                "active": True,
                "actor": [{"reference": f"Practitioner/{practitioner}"}],
                "planningHorizon": {
                    "start": _instant(now),
                    "end": _instant(now + timedelta(days=days)),
                },
            }
        )
        record = ScheduleRecord(
            id=stored.resource_id,
            org_id=org_id,
            practitioner_id=practitioner,
            owner_user_id=user_id,
            created_at=now,
        )
        self._db.add(record)
        self._db.flush()
        self._repo.record_event(
            EventType.SCHEDULE_PUBLISHED,
            Entity(None, "Schedule", record.id),
            (f"practitioner={practitioner}",),
        )
        return ScheduleView(record.id, self._org_code(org_id), practitioner, now)

    def add_slots(
        self, schedule_id: str, periods: Sequence[tuple[datetime, datetime]]
    ) -> list[SlotView]:
        """Free Slots on a schedule of the caller's organisation; no overlaps, none in the past."""
        self._require_clinician()
        schedule = self._db.get(ScheduleRecord, schedule_id)
        if schedule is None or schedule.org_id != self._ctx.org_id:
            raise NotFound("no such schedule")
        if not periods:
            raise InvalidInput("give at least one slot")
        if len(periods) > MAX_SLOTS_PER_REQUEST:
            raise InvalidInput(f"at most {MAX_SLOTS_PER_REQUEST} slots per request")
        now = self._now()
        ordered = sorted(periods)
        for start, end in ordered:
            if start.tzinfo is None or end.tzinfo is None:
                raise InvalidInput("slot times need a time zone (e.g. 2026-01-01T08:00:00Z)")
            if end <= start:
                raise InvalidInput("a slot must end after it starts")
            if end - start > timedelta(hours=MAX_SLOT_HOURS):
                raise InvalidInput(f"a slot lasts at most {MAX_SLOT_HOURS} hours")
            if start < now:
                raise InvalidInput("slots cannot start in the past")
        for (_s1, e1), (s2, _e2) in itertools.pairwise(ordered):
            if s2 < e1:
                raise Conflict("the new slots overlap each other")
        overlaps = [
            and_(SlotRecord.starts_at < end, SlotRecord.ends_at > start) for start, end in ordered
        ]
        clash = self._db.scalar(
            select(SlotRecord.id).where(SlotRecord.schedule_id == schedule.id, or_(*overlaps))
        )
        if clash is not None:
            raise Conflict("a new slot overlaps one already on the schedule")
        views = []
        for start, end in ordered:
            stored = self._repo.create(
                {
                    "resourceType": "Slot",
                    "schedule": {"reference": f"Schedule/{schedule.id}"},
                    "status": "free",
                    "start": _instant(start),
                    "end": _instant(end),
                }
            )
            slot = SlotRecord(
                id=stored.resource_id,
                schedule_id=schedule.id,
                org_id=schedule.org_id,
                starts_at=start,
                ends_at=end,
                status=SlotStatus.FREE,
                appointment_id=None,
            )
            self._db.add(slot)
            views.append(self._slot_view(slot, schedule))
        self._db.flush()
        return views

    def _slot_view(self, slot: SlotRecord, schedule: ScheduleRecord) -> SlotView:
        return SlotView(
            slot.id,
            slot.schedule_id,
            self._org_code(slot.org_id),
            schedule.practitioner_id,
            slot.starts_at,
            slot.ends_at,
            slot.status.value,
        )

    def free_slots(
        self,
        *,
        org: str | None = None,
        schedule_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[SlotView]:
        """Bookable slots: free and in the future. Times and practitioners only, no patient."""
        self._user_id()
        now = self._now()
        start = max(start or now, now)
        end = end or start + timedelta(days=60)
        query = (
            select(SlotRecord, ScheduleRecord)
            .join(ScheduleRecord, ScheduleRecord.id == SlotRecord.schedule_id)
            .where(
                SlotRecord.status == SlotStatus.FREE,
                SlotRecord.starts_at >= start,
                SlotRecord.starts_at < end,
            )
            .order_by(SlotRecord.starts_at, SlotRecord.id)
            .limit(MAX_SLOT_LISTING)
        )
        if org is not None:
            query = query.where(SlotRecord.org_id == self._org_by_code(org).id)
        if schedule_id is not None:
            query = query.where(SlotRecord.schedule_id == schedule_id)
        return [self._slot_view(s, sch) for s, sch in self._db.execute(query)]

    def _booking_patient(self, patient_id: str | None) -> str:
        patients = self._own_patients()
        if not patients:
            raise PermissionDenied("appointments are booked by the patient or their guardian")
        if patient_id is None:
            if len(patients) != 1:
                raise InvalidInput("name the patient you book for (you are guardian of several)")
            return next(iter(patients))
        if patient_id not in patients:
            raise NotFound("no such patient")
        return patient_id

    def book(self, slot_id: str, *, patient_id: str | None = None) -> AppointmentView:
        """Book a free slot for the caller (or their ward). The claim comes first and is atomic
        in SQL, so of two concurrent bookings exactly one succeeds; the other gets 409."""
        self._user_id()
        self._require_gates()
        patient = self._booking_patient(patient_id)
        _check_fhir_id(slot_id, "a slot id")
        now = self._now()
        slot = self._db.get(SlotRecord, slot_id)
        if slot is None:
            raise NotFound("no such slot")
        if slot.starts_at <= now:
            raise Conflict("the slot has already begun")
        appointment_id = str(uuid.uuid4())
        claimed = self._transition(
            update(SlotRecord)
            .where(SlotRecord.id == slot_id, SlotRecord.status == SlotStatus.FREE)
            .values(status=SlotStatus.BUSY, appointment_id=appointment_id)
            .execution_options(synchronize_session=False)
        )
        entity = Entity(patient, "Appointment", appointment_id)
        if not claimed:
            self._repo.record_event(
                EventType.APPOINTMENT_BOOKING_REFUSED,
                entity,
                (f"slot={slot_id}", "slot-taken"),
                outcome=Outcome.MINOR_FAILURE,
            )
            raise SlotUnavailable("the slot has just been booked by someone else; pick another")
        self._db.refresh(slot)
        schedule = self._db.get(ScheduleRecord, slot.schedule_id)
        assert schedule is not None  # noqa: S101 - a slot's schedule is a foreign key.
        repo = self._workflow(_BOOKING_CONTEXT, org_id=slot.org_id)
        repo.create(
            {
                "resourceType": "Appointment",
                "status": "booked",
                "slot": [{"reference": f"Slot/{slot.id}"}],
                "start": _instant(slot.starts_at),
                "end": _instant(slot.ends_at),
                "created": _instant(now),
                "participant": [
                    {"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"},
                    {
                        "actor": {"reference": f"Practitioner/{schedule.practitioner_id}"},
                        "status": "accepted",
                    },
                ],
            },
            resource_id=appointment_id,
        )
        self._set_slot_resource(repo, slot.id, "busy")
        record = AppointmentRecord(
            id=appointment_id,
            slot_id=slot.id,
            org_id=slot.org_id,
            patient_id=patient,
            booked_by=self._user_id(),
            status=AppointmentStatus.BOOKED,
            created_at=now,
        )
        self._db.add(record)
        self._db.flush()
        self._repo.record_event(
            EventType.APPOINTMENT_BOOKED,
            entity,
            (f"slot={slot.id}", f"org={slot.org_id}", f"start={_instant(slot.starts_at)}"),
        )
        return self._appointment_view(record, slot, schedule)

    @staticmethod
    def _set_slot_resource(repo: RecordRepository, slot_id: str, status: str) -> None:
        body = dict(repo.read("Slot", slot_id).body or {})
        body.pop("meta", None)
        body["status"] = status
        repo.update("Slot", slot_id, body)

    def cancel(self, appointment_id: str) -> AppointmentView:
        """Cancel before the start: the patient (or guardian), or a clinician of the organisation."""
        self._user_id()
        _check_fhir_id(appointment_id, "an appointment id")
        record = self._db.get(AppointmentRecord, appointment_id)
        if record is None:
            raise NotFound("no such appointment")
        if record.patient_id in self._own_patients():
            self._require_gates()
        elif self._is_clinician() and record.org_id == self._ctx.org_id:
            self._require_clinician()
        else:
            raise NotFound("no such appointment")
        slot = self._db.get(SlotRecord, record.slot_id)
        schedule = self._db.get(ScheduleRecord, slot.schedule_id) if slot else None
        assert slot is not None  # noqa: S101 - a foreign key.
        assert schedule is not None  # noqa: S101 - a foreign key.
        now = self._now()
        if record.status is not AppointmentStatus.BOOKED:
            raise Conflict(f"the appointment is already {record.status.value}")
        if now >= slot.starts_at:
            raise Conflict("the appointment has already begun and cannot be cancelled")
        won = self._transition(
            update(AppointmentRecord)
            .where(
                AppointmentRecord.id == record.id,
                AppointmentRecord.status == AppointmentStatus.BOOKED,
            )
            .values(
                status=AppointmentStatus.CANCELLED, cancelled_at=now, cancelled_by=self._ctx.user_id
            )
        )
        if not won:
            raise Conflict("the appointment was cancelled a moment ago")
        self._db.execute(
            update(SlotRecord)
            .where(SlotRecord.id == slot.id, SlotRecord.appointment_id == record.id)
            .values(status=SlotStatus.FREE, appointment_id=None)
            .execution_options(synchronize_session=False)
        )
        self._db.refresh(record)
        self._db.refresh(slot)
        repo = self._workflow(_BOOKING_CONTEXT, org_id=record.org_id)
        body = dict(repo.read("Appointment", record.id).body or {})
        body.pop("meta", None)
        body["status"] = "cancelled"
        repo.update("Appointment", record.id, body)
        self._set_slot_resource(repo, slot.id, "free")
        self._repo.record_event(
            EventType.APPOINTMENT_CANCELLED,
            Entity(record.patient_id, "Appointment", record.id),
            (f"slot={slot.id}",),
        )
        return self._appointment_view(record, slot, schedule)

    def list_mine(self) -> list[AppointmentView]:
        """The caller's own (or wards') appointments, or their organisation's for clinicians."""
        conditions: list[ColumnElement[bool]] = []
        patients = self._own_patients()
        if patients:
            conditions.append(AppointmentRecord.patient_id.in_(sorted(patients)))
        if self._is_clinician():
            self._require_clinician(Permission.CLINICAL_RECORD_READ)
            conditions.append(AppointmentRecord.org_id == self._org_id())
        if not conditions:
            raise PermissionDenied("appointments are visible to patients and clinicians")
        rows = self._db.execute(
            select(AppointmentRecord, SlotRecord, ScheduleRecord)
            .join(SlotRecord, SlotRecord.id == AppointmentRecord.slot_id)
            .join(ScheduleRecord, ScheduleRecord.id == SlotRecord.schedule_id)
            .where(or_(*conditions))
            .order_by(SlotRecord.starts_at, AppointmentRecord.id)
            .limit(MAX_SLOT_LISTING)
        )
        views = [self._appointment_view(a, s, sch) for a, s, sch in rows]
        listed = tuple(sorted({v.patient_id for v in views}))
        if listed:
            self._repo.record_event(
                EventType.APPOINTMENT_LISTED,
                Entity(listed[0] if len(listed) == 1 else None, "Appointment", patients=listed),
                (f"appointments={len(views)}",),
            )
        return views

    def _appointment_view(
        self, record: AppointmentRecord, slot: SlotRecord, schedule: ScheduleRecord
    ) -> AppointmentView:
        return AppointmentView(
            id=record.id,
            slot_id=slot.id,
            patient_id=record.patient_id,
            org=self._org_code(record.org_id),
            practitioner_id=schedule.practitioner_id,
            starts_at=slot.starts_at,
            ends_at=slot.ends_at,
            status=record.status.value,
            created_at=record.created_at,
            cancelled_at=record.cancelled_at,
        )
