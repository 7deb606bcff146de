"""Roles, permissions, and the one table that maps the former to the latter.

Permissions are ``"scope:resource:action"`` strings in a single :class:`Permission` enum. The
:data:`ROLE_PERMISSIONS` table below is the *only* place where a role gains a permission, so a
security review reads one screen of code. Clinical data access is additionally decided per patient
(care relationships, consent, purpose of use) by the access package; a permission here is necessary,
never sufficient.
"""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType
from typing import Final


class Role(StrEnum):
    PATIENT = "patient"
    GUARDIAN = "guardian"
    PHYSICIAN = "physician"
    NURSE = "nurse"
    PHARMACIST = "pharmacist"
    TECHNICIAN = "technician"
    ORG_ADMIN = "org_admin"
    SECURITY_OFFICER = "security_officer"
    PRIVACY_OFFICER = "privacy_officer"
    AUDITOR = "auditor"
    RESEARCHER = "researcher"
    PLATFORM_ADMIN = "platform_admin"


#: Roles that act on behalf of themselves or a ward. Everyone else is staff and must use MFA.
SUBJECT_ROLES: Final = frozenset({Role.PATIENT, Role.GUARDIAN})
STAFF_ROLES: Final = frozenset(set(Role) - SUBJECT_ROLES)
CLINICAL_ROLES: Final = frozenset({Role.PHYSICIAN, Role.NURSE, Role.PHARMACIST, Role.TECHNICIAN})


class Permission(StrEnum):
    # Own account.
    SELF_PROFILE_READ = "self:profile:read"
    SELF_MFA_MANAGE = "self:mfa:manage"
    SELF_SESSIONS_MANAGE = "self:sessions:manage"
    # Clinical records (further restricted per patient by the access package).
    CLINICAL_RECORD_READ = "clinical:record:read"
    CLINICAL_RECORD_WRITE = "clinical:record:write"
    CLINICAL_BREAKGLASS_USE = "clinical:breakglass:use"
    OWN_RECORD_READ = "subject:record:read"
    OWN_CONSENT_MANAGE = "subject:consent:manage"
    OWN_ACCESS_HISTORY_READ = "subject:access-history:read"
    # Administration within an organisation.
    ORG_USER_READ = "org:user:read"
    ORG_USER_MANAGE = "org:user:manage"
    ORG_SESSION_REVOKE = "org:session:revoke"
    ORG_MFA_RESET = "org:mfa:reset"
    # Platform administration.
    PLATFORM_ORG_READ = "platform:org:read"
    PLATFORM_ORG_MANAGE = "platform:org:manage"
    PLATFORM_USER_MANAGE = "platform:user:manage"
    # Oversight.
    AUDIT_LOG_READ = "audit:log:read"
    AUDIT_LOG_VERIFY = "audit:log:verify"
    ACCESS_DECISION_EXPLAIN = "access:decision:explain"
    SECURITY_KEYS_ROTATE = "security:keys:rotate"
    PRIVACY_BREAKGLASS_REVIEW = "privacy:breakglass:review"
    PRIVACY_CONSENT_READ = "privacy:consent:read"
    # Research (only ever de-identified data).
    RESEARCH_DATASET_READ = "research:dataset:read"


_P = Permission
_SELF = frozenset({_P.SELF_PROFILE_READ, _P.SELF_MFA_MANAGE, _P.SELF_SESSIONS_MANAGE})
_CLINICIAN = _SELF | {_P.CLINICAL_RECORD_READ, _P.CLINICAL_RECORD_WRITE, _P.CLINICAL_BREAKGLASS_USE}

#: The reviewable role -> permission table. Keep it sorted by role and free of logic.
ROLE_PERMISSIONS: Final[MappingProxyType[Role, frozenset[Permission]]] = MappingProxyType(
    {
        Role.PATIENT: _SELF
        | {_P.OWN_RECORD_READ, _P.OWN_CONSENT_MANAGE, _P.OWN_ACCESS_HISTORY_READ},
        Role.GUARDIAN: _SELF
        | {_P.OWN_RECORD_READ, _P.OWN_CONSENT_MANAGE, _P.OWN_ACCESS_HISTORY_READ},
        Role.PHYSICIAN: _CLINICIAN,
        Role.NURSE: _CLINICIAN,
        # Pharmacists and technicians write within their scope (dispensing, results); field masks in
        # the access package narrow what they see.
        Role.PHARMACIST: _CLINICIAN - {_P.CLINICAL_BREAKGLASS_USE},
        Role.TECHNICIAN: _CLINICIAN - {_P.CLINICAL_BREAKGLASS_USE},
        Role.ORG_ADMIN: _SELF
        | {_P.ORG_USER_READ, _P.ORG_USER_MANAGE, _P.ORG_SESSION_REVOKE, _P.ORG_MFA_RESET},
        Role.SECURITY_OFFICER: _SELF
        | {
            _P.ORG_USER_READ,
            _P.ORG_SESSION_REVOKE,
            _P.AUDIT_LOG_READ,
            _P.AUDIT_LOG_VERIFY,
            _P.ACCESS_DECISION_EXPLAIN,
            _P.SECURITY_KEYS_ROTATE,
        },
        Role.PRIVACY_OFFICER: _SELF
        | {
            _P.ORG_USER_READ,
            _P.ACCESS_DECISION_EXPLAIN,
            _P.PRIVACY_BREAKGLASS_REVIEW,
            _P.PRIVACY_CONSENT_READ,
        },
        Role.AUDITOR: _SELF | {_P.AUDIT_LOG_READ, _P.AUDIT_LOG_VERIFY, _P.ACCESS_DECISION_EXPLAIN},
        Role.RESEARCHER: _SELF | {_P.RESEARCH_DATASET_READ},
        Role.PLATFORM_ADMIN: _SELF
        | {
            _P.PLATFORM_ORG_READ,
            _P.PLATFORM_ORG_MANAGE,
            _P.PLATFORM_USER_MANAGE,
            _P.ORG_USER_READ,
            _P.ORG_USER_MANAGE,
            _P.ORG_SESSION_REVOKE,
            _P.ORG_MFA_RESET,
        },
    }
)


def permissions_for(roles: frozenset[Role] | set[Role]) -> frozenset[Permission]:
    """The union of the permissions of ``roles``; an empty set of roles grants nothing."""
    granted: set[Permission] = set()
    for role in roles:
        granted |= ROLE_PERMISSIONS[role]
    return frozenset(granted)


def requires_mfa(roles: frozenset[Role] | set[Role]) -> bool:
    """MFA is mandatory as soon as a user holds any staff role, anywhere."""
    return any(role in STAFF_ROLES for role in roles)
