"""The FHIR R4 REST API at ``/fhir/R4`` (``application/fhir+json``; errors are OperationOutcome).

Every route reaches data only through the request's :class:`RecordRepository`, which decides,
decrypts and audits. The request headers that shape the decision:

* ``X-Purpose-Of-Use``: an HL7 v3 PurposeOfUse code (default TREAT for clinicians, PATRQT for
  patients); an unknown code is 400, a code the caller's role may not use is 403.
* ``X-Break-Glass-Reason`` with ``X-Purpose-Of-Use: ETREAT``: declares an emergency (at least 10
  characters), granting a clinician read access to that one patient for a limited time.
* ``X-Organization``: the organisation the caller acts for, when they hold roles in several.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse

from medcollab.access.context import AccessContext
from medcollab.access.policy import Purpose, default_purpose, purpose_allowed
from medcollab.api.deps import CurrentActor, DbSession, RuntimeDep
from medcollab.api.errors import status_for
from medcollab.errors import InvalidInput, MfaEnrollmentRequired, PermissionDenied
from medcollab.jurisdiction.profiles import effective_profile
from medcollab.kernel.permissions import STAFF_ROLES
from medcollab.records import bundles, capability
from medcollab.records.repository import (
    MIN_BREAK_GLASS_REASON,
    RecordRepository,
    SearchPage,
    StoredResource,
)
from medcollab.records.validation import resource_types

FHIR_JSON: Final = "application/fhir+json"
BASE: Final = "/fhir/R4"
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_MAX_REASON = 500
_RESULT_PARAMS: Final = frozenset({"_count", "_offset", "_format", "_sort"})

router = APIRouter(prefix=BASE, tags=["fhir"])
public_router = APIRouter(prefix=BASE, tags=["fhir"])


class FhirResponse(JSONResponse):
    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# The repository dependency -------------------------------------------------------------------------


def access_context(
    actor: CurrentActor,
    purpose_header: Annotated[str | None, Header(alias="X-Purpose-Of-Use")] = None,
    reason_header: Annotated[str | None, Header(alias="X-Break-Glass-Reason")] = None,
    org_header: Annotated[str | None, Header(alias="X-Organization")] = None,
) -> AccessContext:
    if actor.enrollment_only or (actor.roles & STAFF_ROLES and not actor.mfa_verified):
        raise MfaEnrollmentRequired(
            "multi-factor authentication is required for clinical data",
            hint="sign in with your authenticator, or enrol one at POST /auth/mfa/enroll",
        )
    grants = actor.grants
    if org_header:
        chosen = [g for g in grants if g.org_code == org_header.strip().upper()]
        if not chosen:
            raise PermissionDenied("you hold no role in the organisation named by X-Organization")
    else:
        first = sorted(grants, key=lambda g: g.org_code)[0].org_code if grants else None
        chosen = [g for g in grants if g.org_code == first]
    roles = frozenset(g.role for g in chosen)
    org_id = chosen[0].org_id if chosen else None
    if purpose_header is None:
        purpose = default_purpose(roles)
    else:
        try:
            purpose = Purpose(purpose_header.strip().upper())
        except ValueError:
            valid = ", ".join(p.value for p in Purpose)
            raise InvalidInput(f"unknown X-Purpose-Of-Use code; use one of {valid}") from None
        if not purpose_allowed(roles, purpose):
            raise PermissionDenied(f"your role may not act for purpose {purpose.value}")
    reason = None
    if reason_header is not None:
        reason = reason_header.strip()
        if purpose is not Purpose.ETREAT:
            raise InvalidInput("X-Break-Glass-Reason needs X-Purpose-Of-Use: ETREAT")
        if len(reason) < MIN_BREAK_GLASS_REASON or len(reason) > _MAX_REASON:
            raise InvalidInput(
                f"X-Break-Glass-Reason must be {MIN_BREAK_GLASS_REASON}-{_MAX_REASON} characters"
            )
    return AccessContext(
        user_id=actor.user_id,
        org_id=org_id,
        roles=roles,
        purpose=purpose,
        break_glass_reason=reason,
        session_ref=actor.session_ref,
        client_address=actor.client_address,
        user_agent=actor.user_agent,
    )


def record_repository(
    ctx: Annotated[AccessContext, Depends(access_context)],
    db: DbSession,
    runtime: RuntimeDep,
) -> RecordRepository:
    from medcollab.identity.models import Organization  # noqa: PLC0415

    org = db.get(Organization, ctx.org_id) if ctx.org_id else None
    profile = effective_profile(runtime.settings.jurisdiction, org.jurisdiction if org else None)
    return RecordRepository(
        session=db,
        ctx=ctx,
        keys=runtime.key_service(db),
        keyring=runtime.keyring,
        clock=runtime.clock,
        settings=runtime.settings,
        profile=profile,
    )


RecordRepo = Annotated[RecordRepository, Depends(record_repository)]


# Helpers -------------------------------------------------------------------------------------------


def _check_type(resource_type: str) -> None:
    if resource_type not in resource_types():
        raise InvalidInput(f"unknown FHIR R4 resource type {resource_type[:64]!r}")


def _check_id(resource_id: str) -> None:
    if not _ID.match(resource_id):
        raise InvalidInput("resource ids are 1-64 characters of letters, digits, '-' and '.'")


def _etag(stored: StoredResource) -> dict[str, str]:
    return {
        "ETag": f'W/"{stored.version}"',
        "Last-Modified": stored.last_updated.strftime("%a, %d %b %Y %H:%M:%S GMT"),
    }


def _resource_response(stored: StoredResource, status: int = 200) -> FhirResponse:
    headers = _etag(stored)
    if status == 201:
        headers["Location"] = (
            f"{BASE}/{stored.resource_type}/{stored.resource_id}/_history/{stored.version}"
        )
    return FhirResponse(stored.body, status_code=status, headers=headers)


async def _json_body(request: Request) -> object:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in ("application/fhir+json", "application/json"):
        from medcollab.errors import UnsupportedMediaType  # noqa: PLC0415

        raise UnsupportedMediaType(
            "FHIR bodies must be JSON", hint="send Content-Type: application/fhir+json"
        )
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInput("the body is not valid UTF-8 JSON") from None


def _parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    match = re.fullmatch(r'\s*(?:W/)?"?(\d{1,9})"?\s*', value)
    if not match:
        raise InvalidInput('If-Match must be a version ETag such as W/"3"')
    return int(match.group(1))


def _int_param(params: dict[str, list[str]], name: str, default: int | None) -> int | None:
    values = params.get(name)
    if not values:
        return default
    try:
        number = int(values[-1])
    except ValueError:
        raise InvalidInput(f"{name} must be an integer") from None
    if number < 0:
        raise InvalidInput(f"{name} must not be negative")
    return number


def _searchset(
    resource_type: str, params: dict[str, list[str]], page: SearchPage
) -> dict[str, Any]:
    def link(offset: int) -> str:
        query = [
            (k, v) for k, values in params.items() if k not in ("_offset", "_count") for v in values
        ]
        query += [("_count", str(page.count)), ("_offset", str(offset))]
        return f"{BASE}/{resource_type}?{urlencode(query)}"

    links = [{"relation": "self", "url": link(page.offset)}]
    if page.offset + page.count < page.total:
        links.append({"relation": "next", "url": link(page.offset + page.count)})
    if page.offset > 0:
        links.append({"relation": "previous", "url": link(max(page.offset - page.count, 0))})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": page.total,
        "link": links,
        "entry": [
            {
                "fullUrl": f"{BASE}/{s.resource_type}/{s.resource_id}",
                "resource": s.body,
                "search": {"mode": "match"},
            }
            for s in page.entries
        ],
    }


def _query_params(request: Request) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        params.setdefault(key, []).append(value)
    return params


# Routes ----------------------------------------------------------------------------------------------


@public_router.get("/metadata")
def metadata() -> FhirResponse:
    """The CapabilityStatement: exactly what this server supports."""
    return FhirResponse(capability.capability_statement())


@router.post("")
async def bundle(request: Request, repo: RecordRepo) -> FhirResponse:
    data = await _json_body(request)
    return FhirResponse(bundles.process(repo, data, status_for=status_for))


@router.get("/Patient/{patient_id}/$everything")
def everything(patient_id: str, repo: RecordRepo) -> FhirResponse:
    _check_id(patient_id)
    resources = repo.everything(patient_id)
    return FhirResponse(bundles.searchset(resources, total=len(resources)))


@router.get("/{resource_type}")
def search(resource_type: str, request: Request, repo: RecordRepo) -> FhirResponse:
    _check_type(resource_type)
    params = _query_params(request)
    offset = _int_param(params, "_offset", 0) or 0
    count = _int_param(params, "_count", None)
    criteria = {k: v for k, v in params.items() if k not in _RESULT_PARAMS}
    page = repo.search(resource_type, criteria, offset=offset, count=count)
    return FhirResponse(_searchset(resource_type, params, page))


@router.post("/{resource_type}")
async def create(resource_type: str, request: Request, repo: RecordRepo) -> FhirResponse:
    _check_type(resource_type)
    data = await _json_body(request)
    if not isinstance(data, dict) or data.get("resourceType") != resource_type:
        raise InvalidInput(f"the body must be a {resource_type} resource")
    if "id" in data:
        # Ids are assigned by the server; a client id is ignored, as FHIR's create allows.
        data = {k: v for k, v in data.items() if k != "id"}
    return _resource_response(repo.create(data), status=201)


@router.get("/{resource_type}/{resource_id}")
def read(resource_type: str, resource_id: str, repo: RecordRepo) -> FhirResponse:
    _check_type(resource_type)
    _check_id(resource_id)
    return _resource_response(repo.read(resource_type, resource_id))


@router.put("/{resource_type}/{resource_id}")
async def update(
    resource_type: str,
    resource_id: str,
    request: Request,
    repo: RecordRepo,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
) -> FhirResponse:
    _check_type(resource_type)
    _check_id(resource_id)
    data = await _json_body(request)
    stored = repo.update(resource_type, resource_id, data, if_match=_parse_if_match(if_match))
    return _resource_response(stored)


@router.delete("/{resource_type}/{resource_id}")
def remove(resource_type: str, resource_id: str, repo: RecordRepo) -> Response:
    _check_type(resource_type)
    _check_id(resource_id)
    version = repo.delete(resource_type, resource_id)
    return Response(status_code=204, headers={"ETag": f'W/"{version}"'})


@router.get("/{resource_type}/{resource_id}/_history")
def history(resource_type: str, resource_id: str, repo: RecordRepo) -> FhirResponse:
    _check_type(resource_type)
    _check_id(resource_id)
    versions = repo.history(resource_type, resource_id)
    return FhirResponse(bundles.history_bundle(versions))


@router.get("/{resource_type}/{resource_id}/_history/{version}")
def vread(resource_type: str, resource_id: str, version: str, repo: RecordRepo) -> FhirResponse:
    _check_type(resource_type)
    _check_id(resource_id)
    if not version.isdigit() or len(version) > 9:
        raise InvalidInput("a version id is a positive integer")
    return _resource_response(repo.vread(resource_type, resource_id, int(version)))
