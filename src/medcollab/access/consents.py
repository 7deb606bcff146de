"""Reading a patient's privacy directives from their FHIR R4 Consent resources.

Only active Consents with scope ``patient-privacy`` count. A ``deny`` provision naming an
organisation (``actor.reference``: ``Organization/<platform organisation id>`` or an identifier in
:data:`ORG_IDENTIFIER_SYSTEM` holding the organisation code) withdraws sharing with it; a ``deny``
provision with ``securityLabel`` codes (HL7 v3 sensitivity: PSY, HIV, ETH, GDIS, ...) hides data
carrying those labels. Nested provisions are read the same way; a provision whose period has ended
or not begun is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final

from medcollab.access.policy import ConsentDirectives

ORG_IDENTIFIER_SYSTEM: Final = "urn:medcollab:organization"
_SCOPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/consentscope"


def _in_period(provision: Mapping[str, Any], now: datetime) -> bool:
    period = provision.get("period") or {}
    start, end = period.get("start"), period.get("end")
    stamp = now.isoformat()
    # ISO-8601 strings of the same form compare chronologically; a bare date compares by day.
    if start and stamp[: len(start)] < start[: len(stamp)]:
        return False
    return not (end and stamp[: len(end)] > end[: len(stamp)])


def _is_privacy(consent: Mapping[str, Any]) -> bool:
    codings = (consent.get("scope") or {}).get("coding") or []
    return any(c.get("code") == "patient-privacy" for c in codings if isinstance(c, dict))


def _actor_orgs(provision: Mapping[str, Any], org_ids_by_code: Mapping[str, str]) -> set[str]:
    orgs: set[str] = set()
    for actor in provision.get("actor") or []:
        ref = (actor or {}).get("reference") or {}
        text = ref.get("reference") or ""
        if text.startswith("Organization/"):
            orgs.add(text.split("/", 1)[1])
        identifier = ref.get("identifier") or {}
        if identifier.get("system") == ORG_IDENTIFIER_SYSTEM:
            code = str(identifier.get("value") or "").upper()
            if code in org_ids_by_code:
                orgs.add(org_ids_by_code[code])
    return orgs


def _walk(
    provision: Mapping[str, Any],
    inherited: str,
    *,
    now: datetime,
    org_ids_by_code: Mapping[str, str],
    orgs: set[str],
    labels: set[str],
) -> None:
    if not _in_period(provision, now):
        return
    kind = provision.get("type") or inherited
    if kind == "deny":
        orgs |= _actor_orgs(provision, org_ids_by_code)
        labels |= {
            str(c.get("code")) for c in provision.get("securityLabel") or [] if c.get("code")
        }
    for nested in provision.get("provision") or []:
        _walk(nested, kind, now=now, org_ids_by_code=org_ids_by_code, orgs=orgs, labels=labels)


def directives(
    consents: Iterable[Mapping[str, Any]], now: datetime, org_ids_by_code: Mapping[str, str]
) -> ConsentDirectives:
    orgs: set[str] = set()
    labels: set[str] = set()
    sources: list[str] = []
    for consent in consents:
        if consent.get("status") != "active" or not _is_privacy(consent):
            continue
        provision = consent.get("provision") or {}
        before = (len(orgs), len(labels))
        _walk(
            provision, "permit", now=now, org_ids_by_code=org_ids_by_code, orgs=orgs, labels=labels
        )
        if (len(orgs), len(labels)) != before:
            sources.append(f"Consent/{consent.get('id')}")
    return ConsentDirectives(frozenset(orgs), frozenset(labels), tuple(sources))
