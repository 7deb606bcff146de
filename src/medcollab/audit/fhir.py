"""Audit events as FHIR R4 AuditEvent resources (IHE Basic Audit Log Patterns shape).

Only security officers and auditors see these. The resource is built from the stored event body,
which holds identifiers, codes and hashes only: no names, no clinical content.
"""

from __future__ import annotations

from typing import Any, Final

from medcollab.audit.models import AuditEventRecord

_DICOM: Final = "http://dicom.nema.org/resources/ontology/DCM"
_AUDIT_TYPE: Final = "urn:medcollab:audit-event-type"
_PURPOSE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_SUBTYPE_REST: Final = "http://hl7.org/fhir/restful-interaction"

#: DICOM audit event ids (DCM) per event family, so generic SIEM tooling can group them.
_DCM_TYPES: Final = {
    "fhir": ("110110", "Patient Record"),
    "auth": ("110114", "User Authentication"),
    "admin": ("110136", "Security Roles Changed"),
    "access": ("110113", "Security Alert"),
    "security": ("110113", "Security Alert"),
    "consent": ("110110", "Patient Record"),
    "audit": ("110101", "Audit Log Used"),
}
_REST: Final = {
    "read": "read",
    "vread": "vread",
    "history": "history-instance",
    "search": "search-type",
    "create": "create",
    "update": "update",
    "delete": "delete",
    "transaction": "transaction",
    "everything": "operation",
    "export": "operation",
}


def to_audit_event(record: AuditEventRecord) -> dict[str, Any]:
    body: dict[str, Any] = dict(record.body)
    agent = body.get("agent") or {}
    assert isinstance(agent, dict)  # noqa: S101 - written by event_body().
    family = record.type.split(":", 1)[0]
    code, display = _DCM_TYPES.get(family, ("110100", "Application Activity"))
    subtype = [{"system": _AUDIT_TYPE, "code": record.type}]
    verb = record.type.rsplit(":", 1)[-1]
    if family == "fhir" and verb in _REST:
        subtype.append({"system": _SUBTYPE_REST, "code": _REST[verb]})
    who: dict[str, Any] = {}
    if agent.get("user"):
        who = {"reference": f"urn:medcollab:user:{agent['user']}"}
    elif agent.get("role"):
        who = {"display": agent["role"]}
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(record.seq),
        "type": {"system": _DICOM, "code": code, "display": display},
        "subtype": subtype,
        "action": record.action,
        "recorded": record.recorded_at.isoformat().replace("+00:00", "Z"),
        "outcome": record.outcome,
        "agent": [
            {
                "who": who,
                "requestor": True,
                **({"role": [{"text": agent["role"]}]} if agent.get("role") else {}),
                **(
                    {"network": {"address": agent["address"], "type": "2"}}
                    if agent.get("address")
                    else {}
                ),
                **(
                    {"purposeOfUse": [{"coding": [{"system": _PURPOSE, "code": body["purpose"]}]}]}
                    if body.get("purpose")
                    else {}
                ),
            }
        ],
        "source": {"observer": {"display": "medcollab"}},
    }
    reasons = body.get("reasons") or []
    if reasons:
        resource["outcomeDesc"] = "; ".join(str(r) for r in reasons)[:1000]
    entities = _entities(body)
    if entities:
        resource["entity"] = entities
    if body.get("break_glass"):
        resource["purposeOfEvent"] = [
            {"coding": [{"system": _PURPOSE, "code": "ETREAT", "display": "break-glass"}]}
        ]
    return resource


def _entities(body: dict[str, Any]) -> list[dict[str, Any]]:
    entity = body.get("entity") or {}
    out: list[dict[str, Any]] = []
    if entity.get("patient"):
        out.append({"what": {"reference": f"Patient/{entity['patient']}"}, "role": {"code": "1"}})
    if entity.get("type") and entity.get("id"):
        reference = f"{entity['type']}/{entity['id']}"
        if entity.get("version"):
            reference += f"/_history/{entity['version']}"
        out.append({"what": {"reference": reference}, "role": {"code": "4"}})
    query = entity.get("query") or []
    if query:
        out.append(
            {
                "type": {"code": "2"},
                "detail": [{"type": str(name), "valueString": str(value)} for name, value in query],
            }
        )
    for patient in entity.get("patients") or []:
        if patient != entity.get("patient"):
            out.append({"what": {"reference": f"Patient/{patient}"}, "role": {"code": "1"}})
    return out
