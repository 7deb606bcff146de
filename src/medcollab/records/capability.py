"""The CapabilityStatement: what this server supports, and nothing it does not."""

from __future__ import annotations

from typing import Any

from medcollab import __version__
from medcollab.records import search_params
from medcollab.records.validation import resource_types

_INTERACTIONS = ["read", "vread", "update", "delete", "history-instance", "create", "search-type"]


def capability_statement() -> dict[str, Any]:
    searchable = search_params.supported_parameters()
    resources = []
    for resource_type in sorted(resource_types()):
        entry: dict[str, Any] = {
            "type": resource_type,
            "interaction": [{"code": code} for code in _INTERACTIONS],
            "versioning": "versioned",
            "readHistory": True,
            "updateCreate": False,
            "conditionalCreate": False,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchParam": [
                {"name": "_id", "type": "token"},
                {"name": "_lastUpdated", "type": "date"},
                *(
                    {"name": name, "type": kind}
                    for name, kind in sorted(searchable.get(resource_type, {}).items())
                ),
            ],
        }
        if resource_type == "Patient":
            entry["operation"] = [
                {
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                }
            ]
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-29",
        "kind": "instance",
        "software": {"name": "medcollab", "version": __version__},
        "implementation": {
            "description": "medcollab FHIR R4 server (encrypted, access-controlled)"
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "OAuth",
                                }
                            ],
                            "text": "Bearer session tokens from POST /auth/login and /auth/mfa",
                        }
                    ],
                    "description": (
                        "Every request is decided by care relationship, consent, purpose of use "
                        "(X-Purpose-Of-Use) and break-glass (X-Break-Glass-Reason), and audited."
                    ),
                },
                "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }
