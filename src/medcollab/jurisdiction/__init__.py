"""Jurisdiction profiles: the deadlines, ages, retention and transfer rules that differ by law.

Other packages import from here rather than from :mod:`medcollab.jurisdiction.profiles`, so the
module layout can change without touching its readers.
"""

from medcollab.jurisdiction.profiles import (
    DEFAULT_AUDIT_RETENTION,
    DEFAULT_JURISDICTION,
    GDPR,
    HIPAA,
    PIPL,
    PROFILES,
    Basis,
    Cited,
    CrossBorderRules,
    Jurisdiction,
    JurisdictionProfile,
    TransferMechanism,
    effective_profile,
    get_profile,
)

__all__ = [
    "DEFAULT_AUDIT_RETENTION",
    "DEFAULT_JURISDICTION",
    "GDPR",
    "HIPAA",
    "PIPL",
    "PROFILES",
    "Basis",
    "Cited",
    "CrossBorderRules",
    "Jurisdiction",
    "JurisdictionProfile",
    "TransferMechanism",
    "effective_profile",
    "get_profile",
]
