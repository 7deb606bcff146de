"""The decision matrix: role × action × relationship × consent × purpose × break-glass.

Every combination is decided by the real policy and compared with an expectation written
independently below (a table of rules in plain terms, not a call into the code under test).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from medcollab.access.policy import (
    READ_ACTIONS,
    ROLE_PURPOSES,
    Action,
    BreakGlass,
    ConsentDirectives,
    Purpose,
    Relationship,
    RelationshipKind,
    Request,
    Resource,
    Subject,
    decide,
)
from medcollab.kernel.permissions import CLINICAL_ROLES, Permission, Role, permissions_for

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ORG = "org-a"
OTHER_ORG = "org-b"
PATIENT = "pat-1"
USER = "user-1"

RELATIONSHIPS = {
    "none": (),
    "active": (
        Relationship(
            RelationshipKind.CARE_TEAM,
            PATIENT,
            ORG,
            USER,
            NOW - timedelta(days=1),
            NOW + timedelta(days=1),
        ),
    ),
    "expired": (
        Relationship(
            RelationshipKind.CARE_TEAM,
            PATIENT,
            ORG,
            USER,
            NOW - timedelta(days=10),
            NOW - timedelta(seconds=1),
        ),
    ),
    "other-org": (
        Relationship(
            RelationshipKind.REGISTRATION,
            PATIENT,
            OTHER_ORG,
            None,
            NOW - timedelta(days=1),
            NOW + timedelta(days=1),
        ),
    ),
    "scoped-to-imaging": (
        Relationship(
            RelationshipKind.REFERRAL,
            PATIENT,
            ORG,
            None,
            NOW - timedelta(days=1),
            NOW + timedelta(days=1),
            scope=frozenset({"ImagingStudy"}),
        ),
    ),
}
CONSENTS = {
    "none": ConsentDirectives(),
    "denies-org": ConsentDirectives(denied_orgs=frozenset({ORG})),
    "denies-label": ConsentDirectives(denied_labels=frozenset({"PSY"})),
    "denies-other-org": ConsentDirectives(denied_orgs=frozenset({OTHER_ORG})),
}
GRANTS = {
    "none": None,
    "active": BreakGlass(PATIENT, NOW + timedelta(minutes=30), "g1"),
    "expired": BreakGlass(PATIENT, NOW - timedelta(minutes=1), "g0"),
}
ROLES = list(Role)
ACTIONS = [Action.READ, Action.SEARCH, Action.CREATE, Action.UPDATE]
PURPOSES = list(Purpose)
LABELLED = Resource("Observation", PATIENT, ORG, frozenset({"PSY"}))
PLAIN = Resource("Observation", PATIENT, ORG)


def subject(role: Role) -> Subject:
    granted = permissions_for({role})
    return Subject(
        user_id=USER,
        org_id=ORG,
        roles=frozenset({role}),
        can_read_clinical=Permission.CLINICAL_RECORD_READ in granted,
        can_write_clinical=Permission.CLINICAL_RECORD_WRITE in granted,
        can_break_glass=Permission.CLINICAL_BREAKGLASS_USE in granted,
        own_patient_ids=frozenset({PATIENT}) if role is Role.PATIENT else frozenset(),
        ward_patient_ids=frozenset({PATIENT}) if role is Role.GUARDIAN else frozenset(),
    )


def expected(  # noqa: PLR0911 - the policy written out as one readable cascade.
    role: Role,
    action: Action,
    relation: str,
    consent: str,
    purpose: Purpose,
    grant: str,
    labelled: bool,
) -> bool:
    """The policy in plain terms, written for the test."""
    if purpose not in ROLE_PURPOSES[role]:
        return False
    if role in (Role.PATIENT, Role.GUARDIAN):
        return action in READ_ACTIONS  # Own record / ward's record, reading only.
    if role not in CLINICAL_ROLES:
        return False  # Administrators, officers, auditors and researchers never read PHI here.
    # Pharmacists see demographics, medications, allergies; technicians orders and results.
    if role is Role.PHARMACIST:
        return False  # The matrix resource is an Observation.
    covered = relation == "active"
    break_glass = (
        purpose is Purpose.ETREAT
        and grant == "active"
        and action in READ_ACTIONS
        and role in (Role.PHYSICIAN, Role.NURSE)
    )
    if purpose is Purpose.ETREAT and action not in READ_ACTIONS and not covered:
        return False
    if not (covered or break_glass):
        return False
    refused = consent == "denies-org" or (consent == "denies-label" and labelled)
    if refused:
        # Where the jurisdiction allows it, a declared emergency overrides a consent denial,
        # whether or not a relationship exists; the access then rests on the grant.
        return break_glass
    return True


CASES = list(
    itertools.product(ROLES, ACTIONS, RELATIONSHIPS, CONSENTS, PURPOSES, GRANTS, (False, True))
)


@pytest.mark.parametrize("overrides", [True, False], ids=["override-allowed", "no-override"])
def test_every_combination(overrides: bool) -> None:
    mismatches = []
    for role, action, relation, consent, purpose, grant, labelled in CASES:
        request = Request(
            action=action,
            purpose=purpose,
            now=NOW,
            relationships=RELATIONSHIPS[relation],
            consent=CONSENTS[consent],
            break_glass=GRANTS[grant],
            break_glass_overrides_consent=overrides,
        )
        decision = decide(subject(role), LABELLED if labelled else PLAIN, request)
        want = expected(role, action, relation, consent, purpose, grant, labelled)
        if not overrides and decision.consent_overridden:
            want = False
        if not overrides:
            refused = consent == "denies-org" or (consent == "denies-label" and labelled)
            if refused and role in CLINICAL_ROLES:
                want = False
        if decision.permitted != want:
            mismatches.append(
                (role, action, relation, consent, purpose, grant, labelled, decision.reasons)
            )
        assert decision.reasons, "every decision carries its reasons"
        if decision.consent_overridden:
            assert decision.break_glass
    assert len(CASES) == 12 * 4 * 5 * 4 * 7 * 3 * 2
    assert not mismatches, mismatches[:5]


def test_pharmacist_sees_medications_but_not_document_content() -> None:
    request = Request(Action.READ, Purpose.TREAT, NOW, RELATIONSHIPS["active"])
    pharmacist = subject(Role.PHARMACIST)
    for resource_type, allowed in [
        ("MedicationRequest", True),
        ("AllergyIntolerance", True),
        ("Patient", True),
        ("DocumentReference", True),
        ("Observation", False),
        ("Condition", False),
    ]:
        decision = decide(pharmacist, Resource(resource_type, PATIENT, ORG), request)
        assert decision.permitted is allowed, resource_type
    doc = decide(pharmacist, Resource("DocumentReference", PATIENT, ORG), request)
    assert "DocumentReference.content" in doc.masks


def test_payment_purpose_masks_clinical_notes() -> None:
    request = Request(Action.READ, Purpose.HPAYMT, NOW, RELATIONSHIPS["active"])
    decision = decide(subject(Role.PHYSICIAN), Resource("DocumentReference", PATIENT, ORG), request)
    assert decision.permitted
    assert {"DocumentReference.content", "*.note", "*.text"} <= decision.masks


@pytest.mark.parametrize(
    ("flags", "reason"),
    [({"sanctioned": True}, "subject-frozen"), ({"training_current": False}, "training-lapsed")],
)
def test_sanctions_and_lapsed_training_deny(flags: dict[str, bool], reason: str) -> None:
    base = subject(Role.PHYSICIAN)
    flagged = Subject(**{**{f: getattr(base, f) for f in base.__slots__}, **flags})  # type: ignore[attr-defined]
    decision = decide(
        flagged, PLAIN, Request(Action.READ, Purpose.TREAT, NOW, RELATIONSHIPS["active"])
    )
    assert not decision.permitted
    assert decision.reasons[0].startswith(reason)


def test_relationship_boundaries_are_exact() -> None:
    start, end = NOW, NOW + timedelta(hours=1)
    rel = (Relationship(RelationshipKind.REFERRAL, PATIENT, ORG, None, start, end),)
    doctor = subject(Role.PHYSICIAN)
    for moment, allowed in [
        (start - timedelta(microseconds=1), False),
        (start, True),
        (end - timedelta(microseconds=1), True),
        (end, False),
    ]:
        decision = decide(doctor, PLAIN, Request(Action.READ, Purpose.TREAT, moment, rel))
        assert decision.permitted is allowed, moment


def test_non_patient_resources() -> None:
    doctor = subject(Role.PHYSICIAN)
    request = Request(Action.READ, Purpose.TREAT, NOW)
    assert decide(doctor, Resource("Practitioner", None, OTHER_ORG), request).permitted
    assert not decide(doctor, Resource("Basic", None, OTHER_ORG), request).permitted
    assert decide(doctor, Resource("Basic", None, ORG), request).permitted
    write = Request(Action.UPDATE, Purpose.TREAT, NOW)
    assert not decide(doctor, Resource("Practitioner", None, OTHER_ORG), write).permitted


def test_system_context_is_permitted_and_says_so() -> None:
    system = Subject(user_id="system:import", org_id=ORG, roles=frozenset(), system=True)
    decision = decide(system, PLAIN, Request(Action.CREATE, Purpose.HOPERAT, NOW))
    assert decision.permitted
    assert decision.reasons == ("system-context",)
