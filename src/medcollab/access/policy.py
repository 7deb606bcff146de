"""The access policy for protected health information.

:func:`decide` is a pure function of its inputs (who, what action, which resource, why, when, the
care relationships, the patient's consents and any break-glass grant), so it can be tested
exhaustively and explained. Deny is the default: every permit names the rule that allowed it, and
every deny names the first rule that refused it. Callers turn a deny into "not found" for reads, so
the existence of a record never leaks.

The tables below (purposes per role, minimum-necessary rules per role and per purpose) are the
reviewable policy; the code under them only applies them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from medcollab.kernel.permissions import CLINICAL_ROLES, Role


class Action(StrEnum):
    READ = "read"
    VREAD = "vread"
    HISTORY = "history"
    SEARCH = "search"
    EVERYTHING = "everything"
    EXPORT = "export"
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


READ_ACTIONS: Final = frozenset(
    {Action.READ, Action.VREAD, Action.HISTORY, Action.SEARCH, Action.EVERYTHING, Action.EXPORT}
)
WRITE_ACTIONS: Final = frozenset({Action.CREATE, Action.UPDATE, Action.DELETE})


class Purpose(StrEnum):
    """HL7 v3 PurposeOfUse codes (http://terminology.hl7.org/CodeSystem/v3-ActReason)."""

    TREAT = "TREAT"
    ETREAT = "ETREAT"
    HPAYMT = "HPAYMT"
    HOPERAT = "HOPERAT"
    HRESCH = "HRESCH"
    PUBHLTH = "PUBHLTH"
    PATRQT = "PATRQT"


#: Which purposes each role may claim. A purpose outside this table is refused with 403.
ROLE_PURPOSES: Final[MappingProxyType[Role, frozenset[Purpose]]] = MappingProxyType(
    {
        Role.PHYSICIAN: frozenset({Purpose.TREAT, Purpose.ETREAT, Purpose.HOPERAT, Purpose.HPAYMT}),
        Role.NURSE: frozenset({Purpose.TREAT, Purpose.ETREAT, Purpose.HOPERAT, Purpose.HPAYMT}),
        Role.PHARMACIST: frozenset({Purpose.TREAT, Purpose.HOPERAT, Purpose.HPAYMT}),
        Role.TECHNICIAN: frozenset({Purpose.TREAT, Purpose.HOPERAT}),
        Role.PATIENT: frozenset({Purpose.PATRQT}),
        Role.GUARDIAN: frozenset({Purpose.PATRQT}),
        Role.RESEARCHER: frozenset({Purpose.HRESCH}),
        Role.ORG_ADMIN: frozenset({Purpose.HOPERAT}),
        Role.SECURITY_OFFICER: frozenset({Purpose.HOPERAT}),
        Role.PRIVACY_OFFICER: frozenset({Purpose.HOPERAT}),
        Role.AUDITOR: frozenset({Purpose.HOPERAT}),
        Role.PLATFORM_ADMIN: frozenset({Purpose.HOPERAT}),
    }
)


def default_purpose(roles: Iterable[Role]) -> Purpose:
    roles = set(roles)
    if roles & CLINICAL_ROLES:
        return Purpose.TREAT
    if roles & {Role.PATIENT, Role.GUARDIAN}:
        return Purpose.PATRQT
    if Role.RESEARCHER in roles:
        return Purpose.HRESCH
    return Purpose.HOPERAT


def purpose_allowed(roles: Iterable[Role], purpose: Purpose) -> bool:
    return any(purpose in ROLE_PURPOSES[role] for role in roles)


# Minimum necessary ---------------------------------------------------------------------------------

_MEDICATION_TYPES = frozenset(
    {
        "Medication",
        "MedicationRequest",
        "MedicationStatement",
        "MedicationDispense",
        "MedicationAdministration",
    }
)
_DIRECTORY_TYPES: Final = frozenset(
    {
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "Location",
        "HealthcareService",
        "Endpoint",
        "Medication",
        "Substance",
        "Device",
    }
)


@dataclass(frozen=True, slots=True)
class MinimumNecessary:
    """What a role or purpose may see: resource types (None: all) and elements to remove."""

    types: frozenset[str] | None = None
    #: ``Type.element`` paths removed before data leaves; ``*.element`` applies to every type.
    masks: frozenset[str] = frozenset()


#: Per-role rules. Physicians and nurses see the whole record of patients in their care.
ROLE_MINIMUM_NECESSARY: Final[MappingProxyType[Role, MinimumNecessary]] = MappingProxyType(
    {
        # Pharmacists: demographics, medications and allergies, and document metadata without content.
        Role.PHARMACIST: MinimumNecessary(
            types=frozenset({"Patient", "AllergyIntolerance", "DocumentReference"})
            | _MEDICATION_TYPES,
            masks=frozenset({"DocumentReference.content"}),
        ),
        # Technicians: what orders, results and imaging need.
        Role.TECHNICIAN: MinimumNecessary(
            types=frozenset(
                {
                    "Patient",
                    "ServiceRequest",
                    "Observation",
                    "DiagnosticReport",
                    "ImagingStudy",
                    "Specimen",
                    "Procedure",
                }
            ),
        ),
    }
)

#: Per-purpose rules, applied on top of the role's.
PURPOSE_MINIMUM_NECESSARY: Final[MappingProxyType[Purpose, MinimumNecessary]] = MappingProxyType(
    {
        # Payment needs what was done and billed, not clinical notes.
        Purpose.HPAYMT: MinimumNecessary(
            masks=frozenset(
                {"DocumentReference.content", "*.note", "*.text", "Observation.interpretation"}
            )
            | {"ClinicalImpression.*", "Composition.section", "Communication.payload"},
        ),
        Purpose.HOPERAT: MinimumNecessary(masks=frozenset({"DocumentReference.content", "*.note"})),
    }
)


# Decision inputs -------------------------------------------------------------------------------


class RelationshipKind(StrEnum):
    REGISTRATION = "registration"
    CARE_TEAM = "care-team"
    ENCOUNTER = "encounter"
    REFERRAL = "referral"


@dataclass(frozen=True, slots=True)
class Relationship:
    """A care relationship between a clinician (or a whole organisation) and a patient."""

    kind: RelationshipKind
    patient_id: str
    org_id: str
    #: None: every clinician of the organisation; else only this user.
    user_id: str | None
    starts_at: datetime
    expires_at: datetime
    #: Resource types the relationship covers; None: the whole record.
    scope: frozenset[str] | None = None
    source: str = ""

    def covers(self, subject: Subject, resource_type: str, now: datetime) -> bool:
        return (
            self.org_id == subject.org_id
            and (self.user_id is None or self.user_id == subject.user_id)
            and self.starts_at <= now < self.expires_at
            and (self.scope is None or resource_type in self.scope)
        )


@dataclass(frozen=True, slots=True)
class ConsentDirectives:
    """The patient's active privacy directives, parsed from their FHIR Consent resources."""

    denied_orgs: frozenset[str] = frozenset()
    denied_labels: frozenset[str] = frozenset()
    sources: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BreakGlass:
    patient_id: str
    expires_at: datetime
    grant_id: str


@dataclass(frozen=True, slots=True)
class Subject:
    """Who asks, in the organisation they act for."""

    user_id: str
    org_id: str
    roles: frozenset[Role]
    can_read_clinical: bool = False
    can_write_clinical: bool = False
    can_break_glass: bool = False
    own_patient_ids: frozenset[str] = frozenset()
    ward_patient_ids: frozenset[str] = frozenset()
    training_current: bool = True
    sanctioned: bool = False
    system: bool = False


@dataclass(frozen=True, slots=True)
class Resource:
    """What the decision needs to know about a resource (never its content beyond labels)."""

    resource_type: str
    patient_id: str | None
    custodian_org_id: str | None
    security_labels: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    permitted: bool
    reasons: tuple[str, ...]
    masks: frozenset[str] = frozenset()
    break_glass: bool = False
    consent_overridden: bool = False

    def explain(self) -> str:
        verdict = "PERMIT" if self.permitted else "DENY"
        flags = [
            f
            for f, on in (
                ("break-glass", self.break_glass),
                ("consent-overridden", self.consent_overridden),
            )
            if on
        ]
        extra = f" [{', '.join(flags)}]" if flags else ""
        return f"{verdict}{extra}: " + "; ".join(self.reasons)


@dataclass(frozen=True, slots=True)
class Request:
    action: Action
    purpose: Purpose
    now: datetime
    relationships: tuple[Relationship, ...] = ()
    consent: ConsentDirectives = field(default_factory=ConsentDirectives)
    break_glass: BreakGlass | None = None
    #: From the jurisdiction profile: may break-glass override a consent denial?
    break_glass_overrides_consent: bool = False


def _deny(*reasons: str) -> Decision:
    return Decision(False, tuple(reasons))


def _type_allowed(subject: Subject, resource_type: str) -> bool:
    """The union of the subject's roles' type limits; a role without limits lifts them."""
    allowed: set[str] = set()
    for role in subject.roles:
        rule = ROLE_MINIMUM_NECESSARY.get(role)
        if rule is None or rule.types is None:
            return True
        allowed |= rule.types
    return resource_type in allowed


def masks_for(subject: Subject, purpose: Purpose) -> frozenset[str]:
    """Elements to remove: the role's masks (unless a role without limits applies) and the
    purpose's."""
    masks: set[str] = set()
    rules = [ROLE_MINIMUM_NECESSARY.get(r) for r in subject.roles]
    if rules and all(rule is not None for rule in rules):
        for rule in rules:
            masks |= rule.masks if rule else frozenset()
    purpose_rule = PURPOSE_MINIMUM_NECESSARY.get(purpose)
    if purpose_rule is not None:
        masks |= purpose_rule.masks
    return frozenset(masks)


def _gate(subject: Subject, purpose: Purpose) -> Decision | None:
    """Refusals that depend only on the subject: sanctions, training, purpose."""
    if subject.sanctioned:
        return _deny("subject-frozen: a sanction freezes access to PHI")
    if not subject.training_current:
        return _deny("training-lapsed: privacy training is not current")
    if not purpose_allowed(subject.roles, purpose):
        return _deny(f"purpose-not-allowed: {purpose.value} for roles {sorted(subject.roles)}")
    return None


def _self_service(subject: Subject, resource: Resource, action: Action) -> Decision | None:
    """Patients read their own compartment, guardians their wards'; both manage consents."""
    patient = resource.patient_id
    if patient is None or not subject.roles & {Role.PATIENT, Role.GUARDIAN}:
        return None
    if patient in subject.own_patient_ids:
        who = "own-record"
    elif patient in subject.ward_patient_ids:
        who = "guardian-of-patient"
    else:
        return None
    if action in READ_ACTIONS:
        return Decision(True, (f"{who}: {action.value}",))
    if resource.resource_type == "Consent":
        return Decision(True, (f"{who}: manages own consents",))
    return _deny(f"{who}: patients do not write clinical data")


def _clinician_gate(subject: Subject, resource: Resource, action: Action) -> Decision | None:
    if not subject.roles & CLINICAL_ROLES:
        return _deny("no-clinical-role: only clinicians, patients and guardians reach PHI")
    if action in READ_ACTIONS and not subject.can_read_clinical:
        return _deny("missing-permission: clinical:record:read")
    if action in WRITE_ACTIONS and not subject.can_write_clinical:
        return _deny("missing-permission: clinical:record:write")
    if not _type_allowed(subject, resource.resource_type):
        return _deny(f"minimum-necessary: role may not see {resource.resource_type}")
    return None


def _organisational(
    subject: Subject, resource: Resource, action: Action, masks: frozenset[str]
) -> Decision:
    """Resources outside any patient's compartment."""
    if resource.custodian_org_id == subject.org_id:
        return Decision(True, ("custodian-organisation",), masks)
    if action in READ_ACTIONS and resource.resource_type in _DIRECTORY_TYPES:
        return Decision(True, ("directory-resource",), masks)
    return _deny("other-organisation: not the custodian of this resource")


def _basis(subject: Subject, resource: Resource, request: Request) -> tuple[str, bool] | Decision:
    """Why a clinician may touch this patient's resource: a relationship or a break-glass grant."""
    now, purpose, action = request.now, request.purpose, request.action
    relation = next(
        (r for r in request.relationships if r.covers(subject, resource.resource_type, now)), None
    )
    if relation is not None:
        return (
            f"care-relationship: {relation.kind.value} until {relation.expires_at.isoformat()}",
            False,
        )
    if purpose is Purpose.ETREAT and action in WRITE_ACTIONS:
        return _deny("break-glass-read-only: emergency access does not allow writes")
    grant = _usable_grant(subject, resource, request)
    if grant is not None:
        return f"break-glass: grant {grant.grant_id} until {grant.expires_at.isoformat()}", True
    return _deny("no-care-relationship: no active relationship covers this resource")


def _usable_grant(subject: Subject, resource: Resource, request: Request) -> BreakGlass | None:
    grant = request.break_glass
    if (
        request.purpose is Purpose.ETREAT
        and grant is not None
        and grant.patient_id == resource.patient_id
        and request.now < grant.expires_at
        and subject.can_break_glass
        and request.action in READ_ACTIONS
    ):
        return grant
    return None


def _apply_consent(
    subject: Subject,
    resource: Resource,
    request: Request,
    basis: tuple[str, bool],
    masks: frozenset[str],
) -> Decision:
    reason, via_break_glass = basis
    consent = request.consent
    refusals = []
    if subject.org_id in consent.denied_orgs:
        refusals.append("consent-denies-organisation")
    labels = resource.security_labels & consent.denied_labels
    if labels:
        refusals.append(f"consent-denies-labels: {','.join(sorted(labels))}")
    if not refusals:
        return Decision(True, (reason,), masks, via_break_glass)
    # A consent denial can only be overridden by a declared emergency, and only where the
    # jurisdiction allows it; the access then rests on the break-glass grant, flagged as such.
    grant = _usable_grant(subject, resource, request)
    if grant is not None and request.break_glass_overrides_consent:
        overridden = "consent-overridden-by-break-glass: " + "; ".join(refusals)
        emergency = f"break-glass: grant {grant.grant_id} until {grant.expires_at.isoformat()}"
        return Decision(True, (emergency, overridden), masks, True, True)
    return _deny(*refusals)


def decide(subject: Subject, resource: Resource, request: Request) -> Decision:
    """Permit or deny one action on one resource, with reasons. Deny by default."""
    if subject.system:
        return Decision(True, ("system-context",))
    settled = (
        _gate(subject, request.purpose)
        or _self_service(subject, resource, request.action)
        or _clinician_gate(subject, resource, request.action)
    )
    if settled is not None:
        return settled
    masks = masks_for(subject, request.purpose)
    if resource.patient_id is None:
        return _organisational(subject, resource, request.action, masks)
    basis = _basis(subject, resource, request)
    if isinstance(basis, Decision):
        return basis
    return _apply_consent(subject, resource, request, basis, masks)
