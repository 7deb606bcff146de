"""The FHIR search parameters the record store supports, and how values are indexed and queried.

Everything here is pure: :func:`extract` turns a (validated, reference-resolved) resource into
:class:`IndexEntry` rows, :func:`parse_search_query` turns query parameters into
:class:`Criterion` s, and :func:`patient_of` names the Patient compartment a resource belongs to.
The caller stores and compares; nothing here touches a database or a key.

**One table.** :data:`SEARCH_PARAMETERS` lists every supported parameter per resource type: its
R4 name, type, the element paths it reads (dotted, from the resource root) and whether its values
identify a person. Parameters in :data:`COMMON_PARAMETERS` apply to every type.

**Identifying values** (names, identifiers, telecom, addresses, birth dates, free-text
descriptions, DICOM UIDs) are marked ``identifying``: the caller stores only a keyed HMAC of
``IndexEntry.value`` (a blind index, which should also bind the resource type and parameter name),
never the value, and no date range for them. A blind index only answers equality, so:

* ``name``, ``family``, ``given``, ``address`` and the other string parameters match a *whole*
  normalised string (case-folded, accents removed, whitespace collapsed), not a prefix. ``name=``
  matches any single part of a name (a family name, one given name, a prefix or suffix), the name's
  ``text``, or the given names followed by the family name (``name=john smith``). ``:exact`` is
  accepted and means the same thing, since no finer distinction is stored.
* ``birthdate`` matches the stored date exactly at the precision given (``birthdate=1970-01-01``);
  range prefixes are refused for it.
* ``identifier`` and ``telecom`` tokens match ``value`` or ``system|value`` after normalisation
  (identifiers trimmed; e-mail addresses case-folded; phone numbers reduced to ``+`` and digits).

Non-identifying values (codes, statuses, clinical dates, references) are plain. Tokens index
``code`` and ``system|code`` (``|code`` when the coding has no system); dates index the ISO string
as written plus the instant range it covers (``low``/``high``, UTC, inclusive; ``None`` is
unbounded), so ``date=ge2020-01-01`` works through :func:`date_matches`; references index
``Type/id``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import Final

from medcollab.errors import InvalidInput
from medcollab.records.validation import resource_types


class ParamKind(StrEnum):
    TOKEN = "token"  # noqa: S105 - the FHIR search parameter type, not a credential.
    STRING = "string"
    DATE = "date"
    REFERENCE = "reference"
    URI = "uri"


class Normalise(StrEnum):
    """How the values of a parameter are normalised before they are indexed or compared."""

    EXACT = "exact"  # codes, references, uris: as written
    TEXT = "text"  # strings: case-folded, accents removed, whitespace collapsed
    IDENTIFIER = "identifier"  # identifier values: trimmed
    TELECOM = "telecom"  # contact points: e-mail case-folded, phone numbers to + and digits


@dataclass(frozen=True, slots=True)
class SearchParam:
    name: str
    kind: ParamKind
    paths: tuple[str, ...]
    identifying: bool = False
    #: For references: the resource types a value may point to (empty: any).
    targets: tuple[str, ...] = ()
    normalise: Normalise = Normalise.EXACT


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One searchable value of a resource. Identifying values must be blind-indexed by the caller."""

    param: str
    kind: str
    value: str
    identifying: bool
    low: datetime | None = None
    high: datetime | None = None


@dataclass(frozen=True, slots=True)
class SearchValue:
    """One value of a criterion, normalised as the index normalises it."""

    value: str
    prefix: str = "eq"
    low: datetime | None = None
    high: datetime | None = None


@dataclass(frozen=True, slots=True)
class Criterion:
    """One query parameter: a resource matches when any of ``values`` matches (comma is OR).

    Several criteria are joined with AND, including repeats of the same parameter.
    """

    param: str
    kind: str
    identifying: bool
    values: tuple[SearchValue, ...]
    modifier: str | None = None


class InvalidSearch(InvalidInput):
    """A search names an unknown parameter, modifier or prefix, or a value that cannot be used."""

    code = "invalid_search"


def _tok(name: str, *paths: str, identifying: bool = False, telecom: bool = False) -> SearchParam:
    if telecom:
        normalise = Normalise.TELECOM
    elif identifying:
        normalise = Normalise.IDENTIFIER
    else:
        normalise = Normalise.EXACT
    return SearchParam(name, ParamKind.TOKEN, paths or (name,), identifying, (), normalise)


def _str(name: str, *paths: str, identifying: bool = False) -> SearchParam:
    return SearchParam(name, ParamKind.STRING, paths or (name,), identifying, (), Normalise.TEXT)


def _date(name: str, *paths: str, identifying: bool = False) -> SearchParam:
    return SearchParam(name, ParamKind.DATE, paths or (name,), identifying)


def _ref(name: str, *paths: str, targets: tuple[str, ...] = ()) -> SearchParam:
    return SearchParam(name, ParamKind.REFERENCE, paths or (name,), False, targets)


def _uri(name: str, *paths: str, identifying: bool = False) -> SearchParam:
    return SearchParam(name, ParamKind.URI, paths or (name,), identifying)


_PATIENT: Final = ("Patient",)
_SUBJECT: Final = ("Patient", "Group")


def _identifier() -> SearchParam:
    # Identifiers of any resource (record numbers, order and visit numbers) can single a person
    # out, so all of them are blind-indexed; identifier search is exact matching anyway.
    return _tok("identifier", identifying=True)


def _person() -> list[SearchParam]:
    """The parameters of a person's demographics, all identifying (patients and staff alike)."""
    return [
        _identifier(),
        _str("name", identifying=True),
        _str("family", "name.family", identifying=True),
        _str("given", "name.given", identifying=True),
        _tok("telecom", identifying=True, telecom=True),
        _str("address", identifying=True),
        _str("address-city", "address.city", identifying=True),
        _str("address-state", "address.state", identifying=True),
        _str("address-postalcode", "address.postalCode", identifying=True),
        _str("address-country", "address.country", identifying=True),
        _tok("gender"),
        _tok("active"),
    ]


#: Parameters every resource type supports.
COMMON_PARAMETERS: Final[tuple[SearchParam, ...]] = (
    _tok("_id", "id"),
    _date("_lastUpdated", "meta.lastUpdated"),
    _tok("_tag", "meta.tag"),
    _tok("_security", "meta.security"),
    _uri("_profile", "meta.profile"),
)

#: The supported search parameters per resource type (R4 names, types and paths).
SEARCH_PARAMETERS: Final[Mapping[str, tuple[SearchParam, ...]]] = {
    "Patient": (
        *_person(),
        _date("birthdate", "birthDate", identifying=True),
        _ref("general-practitioner", "generalPractitioner"),
        _ref("organization", "managingOrganization", targets=("Organization",)),
    ),
    "Practitioner": (*_person(),),
    "PractitionerRole": (
        _identifier(),
        _ref("practitioner", targets=("Practitioner",)),
        _ref("organization", targets=("Organization",)),
        _ref("location", targets=("Location",)),
        _ref("service", "healthcareService", targets=("HealthcareService",)),
        _tok("role", "code"),
        _tok("specialty"),
        _tok("active"),
        _date("date", "period"),
        _tok("telecom", identifying=True, telecom=True),
    ),
    "Organization": (
        _identifier(),
        _str("name", "name", "alias"),
        _tok("type"),
        _tok("active"),
        _ref("partof", "partOf", targets=("Organization",)),
        _str("address"),
        _str("address-city", "address.city"),
    ),
    "Encounter": (
        _identifier(),
        _ref("patient", "subject", targets=_PATIENT),
        _ref("subject", targets=_SUBJECT),
        _tok("status"),
        _tok("class"),
        _tok("type"),
        _date("date", "period"),
        _tok("reason-code", "reasonCode"),
        _ref("participant", "participant.individual"),
        _ref("practitioner", "participant.individual", targets=("Practitioner",)),
        _ref("service-provider", "serviceProvider", targets=("Organization",)),
        _ref("location", "location.location", targets=("Location",)),
        _ref("part-of", "partOf", targets=("Encounter",)),
    ),
    "Condition": (
        _identifier(),
        _ref("patient", "subject", targets=_PATIENT),
        _ref("subject", targets=_SUBJECT),
        _tok("code"),
        _tok("category"),
        _tok("clinical-status", "clinicalStatus"),
        _tok("verification-status", "verificationStatus"),
        _tok("severity"),
        _tok("body-site", "bodySite"),
        _date("onset-date", "onsetDateTime", "onsetPeriod"),
        _date("abatement-date", "abatementDateTime", "abatementPeriod"),
        _date("recorded-date", "recordedDate"),
        _ref("encounter", targets=("Encounter",)),
        _ref("asserter"),
    ),
    "Observation": (
        _identifier(),
        _ref("patient", "subject", targets=_PATIENT),
        _ref("subject"),
        _tok("code"),
        _tok("category"),
        _tok("status"),
        _date("date", "effectiveDateTime", "effectivePeriod", "effectiveInstant"),
        _ref("encounter"),
        _ref("performer"),
        _tok("value-concept", "valueCodeableConcept"),
        _tok("component-code", "component.code"),
        _tok("combo-code", "code", "component.code"),
        _ref("based-on", "basedOn"),
        _ref("has-member", "hasMember"),
        _ref("derived-from", "derivedFrom"),
        _ref("specimen", targets=("Specimen",)),
        _ref("device"),
    ),
    "MedicationRequest": (
        _identifier(),
        _ref("patient", "subject", targets=_PATIENT),
        _ref("subject", targets=_SUBJECT),
        _tok("status"),
        _tok("intent"),
        _tok("category"),
        _tok("priority"),
        _tok("code", "medicationCodeableConcept"),
        _ref("medication", "medicationReference", targets=("Medication",)),
        _date("authoredon", "authoredOn"),
        _ref("requester"),
        _ref("encounter", targets=("Encounter",)),
        _ref("intended-performer", "performer"),
    ),
    "AllergyIntolerance": (
        _identifier(),
        _ref("patient", targets=_PATIENT),
        _tok("clinical-status", "clinicalStatus"),
        _tok("verification-status", "verificationStatus"),
        _tok("type"),
        _tok("category"),
        _tok("criticality"),
        _tok("code", "code", "reaction.substance"),
        _tok("manifestation", "reaction.manifestation"),
        _tok("severity", "reaction.severity"),
        _tok("route", "reaction.exposureRoute"),
        _date("date", "recordedDate"),
        _date("onset", "reaction.onset"),
        _date("last-date", "lastOccurrence"),
        _ref("recorder"),
        _ref("asserter"),
    ),
    "Procedure": (
        _identifier(),
        _ref("patient", "subject", targets=_PATIENT),
        _ref("subject", targets=_SUBJECT),
        _tok("code"),
        _tok("status"),
        _tok("category"),
        _date("date", "performedDateTime", "performedPeriod"),
        _ref("encounter"),
        _ref("performer", "performer.actor"),
        _ref("location", targets=("Location",)),
        _tok("reason-code", "reasonCode"),
        _ref("reason-reference", "reasonReference"),
        _ref("based-on", "basedOn"),
        _ref("part-of", "partOf"),
    ),
    "Immunization": (
        _identifier(),
        _ref("patient", targets=_PATIENT),
        _tok("status"),
        _tok("status-reason", "statusReason"),
        _tok("vaccine-code", "vaccineCode"),
        _date("date", "occurrenceDateTime"),
        _str("lot-number", "lotNumber"),
        _ref("location", targets=("Location",)),
        _ref("manufacturer", targets=("Organization",)),
        _ref("performer", "performer.actor"),
        _tok("reason-code", "reasonCode"),
        _tok("target-disease", "protocolApplied.targetDisease"),
        _str("series", "protocolApplied.series"),
    ),
    "DiagnosticReport": (
        _identifier(),
        _ref("patient", "subject", targets=_PATIENT),
        _ref("subject"),
        _tok("code"),
        _tok("category"),
        _tok("status"),
        _date("date", "effectiveDateTime", "effectivePeriod"),
        _date("issued"),
        _ref("encounter"),
        _ref("performer"),
        _ref("result", targets=("Observation",)),
        _ref("results-interpreter", "resultsInterpreter"),
        _ref("based-on", "basedOn"),
        _tok("conclusion", "conclusionCode"),
        _ref("specimen", targets=("Specimen",)),
        _ref("media", "media.link", targets=("Media",)),
    ),
    "DocumentReference": (
        _tok("identifier", "masterIdentifier", "identifier", identifying=True),
        _ref("patient", "subject", targets=_PATIENT),
        _ref("subject"),
        _tok("status"),
        _tok("type"),
        _tok("category"),
        _date("date"),
        _date("period", "context.period"),
        _ref("author"),
        _ref("authenticator"),
        _ref("custodian", targets=("Organization",)),
        _ref("encounter", "context.encounter"),
        _ref("related", "context.related"),
        _ref("relatesto", "relatesTo.target", targets=("DocumentReference",)),
        _tok("relation", "relatesTo.code"),
        _tok("event", "context.event"),
        _tok("facility", "context.facilityType"),
        _tok("setting", "context.practiceSetting"),
        _tok("security-label", "securityLabel"),
        _tok("contenttype", "content.attachment.contentType"),
        _tok("format", "content.format"),
        _tok("language", "content.attachment.language"),
        # Free text and attachment URLs can carry names or record numbers.
        _str("description", identifying=True),
        _uri("location", "content.attachment.url", identifying=True),
    ),
    "ImagingStudy": (
        _identifier(),
        _ref("patient", "subject", targets=_PATIENT),
        _ref("subject"),
        _tok("status"),
        _date("started"),
        _tok("modality", "series.modality"),
        _tok("bodysite", "series.bodySite"),
        _tok("reason", "reasonCode"),
        _ref("encounter", targets=("Encounter",)),
        _ref("basedon", "basedOn"),
        _ref("referrer"),
        _ref("interpreter"),
        _ref("endpoint", "endpoint", "series.endpoint", targets=("Endpoint",)),
        _ref("performer", "series.performer.actor"),
        _tok("dicom-class", "series.instance.sopClass"),
        # DICOM UIDs lead straight to image files whose headers name the patient.
        _tok("series", "series.uid", identifying=True),
        _tok("instance", "series.instance.uid", identifying=True),
    ),
    "CarePlan": (
        _identifier(),
        _ref("patient", "subject", targets=_PATIENT),
        _ref("subject", targets=_SUBJECT),
        _tok("status"),
        _tok("intent"),
        _tok("category"),
        _date("date", "period"),
        _ref("encounter", targets=("Encounter",)),
        _ref("care-team", "careTeam", targets=("CareTeam",)),
        _ref("condition", "addresses", targets=("Condition",)),
        _ref("goal", targets=("Goal",)),
        _tok("activity-code", "activity.detail.code"),
        _date("activity-date", "activity.detail.scheduledPeriod"),
        _ref("activity-reference", "activity.reference"),
        _ref("performer", "activity.detail.performer"),
        _ref("based-on", "basedOn", targets=("CarePlan",)),
        _ref("part-of", "partOf", targets=("CarePlan",)),
        _ref("replaces", targets=("CarePlan",)),
    ),
    "CareTeam": (
        _identifier(),
        _ref("patient", "subject", targets=_PATIENT),
        _ref("subject", targets=_SUBJECT),
        _tok("status"),
        _tok("category"),
        _date("date", "period"),
        _ref("encounter", targets=("Encounter",)),
        _ref("participant", "participant.member"),
    ),
    "Consent": (
        _identifier(),
        _ref("patient", targets=_PATIENT),
        _tok("status"),
        _tok("category"),
        _tok("scope"),
        _date("date", "dateTime"),
        _date("period", "provision.period"),
        _tok("action", "provision.action"),
        _tok("purpose", "provision.purpose"),
        _tok("security-label", "provision.securityLabel"),
        _ref("actor", "provision.actor.reference"),
        _ref("data", "provision.data.reference"),
        _ref("organization", targets=("Organization",)),
        _ref("consentor", "performer"),
        _ref("source-reference", "sourceReference"),
    ),
    "Provenance": (
        _ref("target"),
        _ref("patient", "target", targets=_PATIENT),
        _ref("agent", "agent.who"),
        _tok("agent-type", "agent.type"),
        _tok("agent-role", "agent.role"),
        _ref("entity", "entity.what"),
        _ref("location", targets=("Location",)),
        _date("recorded"),
        _date("when", "occurredDateTime", "occurredPeriod"),
        _tok("signature-type", "signature.type"),
    ),
}

#: Parameters that shape the result rather than select resources; the caller handles them.
RESULT_PARAMETERS: Final = frozenset(
    {"_count", "_offset", "_sort", "_page", "_page_token", "_format", "_pretty", "_summary",
     "_elements", "_total"}
)  # fmt: skip

#: The R4 Patient compartment for the supported types: the parameters, in order of precedence,
#: whose Patient reference makes a resource part of a patient's record. The first one wins, so a
#: patient-reported Observation about someone else still belongs to its subject.
PATIENT_COMPARTMENT: Final[Mapping[str, tuple[str, ...]]] = {
    "Encounter": ("patient",),
    "Condition": ("patient", "asserter"),
    "Observation": ("patient", "performer"),
    "MedicationRequest": ("patient",),
    "AllergyIntolerance": ("patient", "recorder", "asserter"),
    "Procedure": ("patient", "performer"),
    "Immunization": ("patient",),
    "DiagnosticReport": ("patient",),
    "DocumentReference": ("patient", "author"),
    "ImagingStudy": ("patient",),
    "CarePlan": ("patient", "performer"),
    "CareTeam": ("patient", "participant"),
    "Consent": ("patient",),
    "Provenance": ("patient",),
    # Practitioner, PractitionerRole and Organization are in no patient's compartment.
    "Practitioner": (),
    "PractitionerRole": (),
    "Organization": (),
}
#: Elements that name the patient in resource types outside the table (Claim.patient,
#: Coverage.beneficiary, Goal.subject, Task.for, Appointment.participant.actor, ...).
_FALLBACK_PATIENT_ELEMENTS: Final = (
    "subject",
    "patient",
    "beneficiary",
    "for",
    "participant.actor",
)

MAX_VALUE_LENGTH: Final = 1024
MAX_VALUES_PER_PARAMETER: Final = 50
MAX_CRITERIA: Final = 30


def parameters_for(resource_type: str) -> dict[str, SearchParam]:
    """The supported parameters of ``resource_type`` by name (common ones included)."""
    params = {p.name: p for p in COMMON_PARAMETERS}
    params.update((p.name, p) for p in SEARCH_PARAMETERS.get(resource_type, ()))
    return params


def supported_parameters() -> dict[str, dict[str, str]]:
    """Type-specific parameter names and types per resource type (for the CapabilityStatement).

    :data:`COMMON_PARAMETERS` apply to every R4 type on top of these.
    """
    return {
        resource_type: {p.name: p.kind.value for p in params}
        for resource_type, params in SEARCH_PARAMETERS.items()
    }


# --- normalisation -------------------------------------------------------------------------------

_PHONE_RE = re.compile(r"\+?[0-9 ()./\-]+")
_NON_DIGITS_RE = re.compile(r"[^0-9]")


def normalise_text(value: str) -> str:
    """Case-fold, strip accents and collapse whitespace, so that equal-looking strings are equal."""
    decomposed = unicodedata.normalize("NFKD", value)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(unicodedata.normalize("NFKC", stripped).casefold().split())


def normalise_telecom(value: str) -> str:
    """E-mail addresses case-folded, phone numbers reduced to an optional ``+`` and digits.

    The rule looks at the value alone, so a query without a ``system|`` normalises the same way as
    the indexed contact point did.
    """
    text = value.strip()
    if "@" in text:
        return text.casefold()
    if _PHONE_RE.fullmatch(text) and any(ch.isdigit() for ch in text):
        return ("+" if text.startswith("+") else "") + _NON_DIGITS_RE.sub("", text)
    return " ".join(text.split())


def _normalise(param: SearchParam, value: str) -> str:
    match param.normalise:
        case Normalise.TEXT:
            return normalise_text(value)
        case Normalise.TELECOM:
            return normalise_telecom(value)
        case Normalise.IDENTIFIER:
            return value.strip()
        case _:
            return value


# --- dates ---------------------------------------------------------------------------------------

_DATE_VALUE_RE = re.compile(
    r"(?P<year>[0-9]{4})(-(?P<month>[0-9]{2})(-(?P<day>[0-9]{2})"
    r"(T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})(:(?P<second>[0-9]{2})(?P<fraction>\.[0-9]+)?)?"
    r"(?P<zone>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?"
)
_ONE_MICROSECOND: Final = timedelta(microseconds=1)


def _add_months(moment: datetime, months: int) -> datetime:
    index = moment.year * 12 + moment.month - 1 + months
    return moment.replace(year=index // 12, month=index % 12 + 1)


def date_range(text: str) -> tuple[datetime, datetime] | None:
    """The UTC instants (first, last; inclusive) a FHIR date, dateTime or instant covers.

    ``2020`` covers the whole year, ``2020-03-01T10:00:00Z`` one second. A time without a zone
    (allowed in search values) is taken as UTC. Returns None when ``text`` is not such a value.
    """
    match = _DATE_VALUE_RE.fullmatch(text)
    if match is None:
        return None
    parts = match.groupdict()
    zone = UTC
    if parts["zone"] and parts["zone"] != "Z":
        sign = -1 if parts["zone"][0] == "-" else 1
        hours, minutes = int(parts["zone"][1:3]), int(parts["zone"][4:6])
        if hours > 14 or minutes > 59:
            return None
        zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        start = datetime(
            int(parts["year"]),
            int(parts["month"] or 1),
            int(parts["day"] or 1),
            int(parts["hour"] or 0),
            int(parts["minute"] or 0),
            # A leap second (60) is folded into the second before it.
            min(int(parts["second"] or 0), 59),
            int((parts["fraction"] or ".0")[1:7].ljust(6, "0")),
            tzinfo=zone,
        )
        if parts["fraction"]:
            digits = len(parts["fraction"]) - 1
            end = start + timedelta(microseconds=10 ** max(0, 6 - digits))
        elif parts["second"]:
            end = start + timedelta(seconds=1)
        elif parts["minute"]:
            end = start + timedelta(minutes=1)
        elif parts["day"]:
            end = start + timedelta(days=1)
        elif parts["month"]:
            end = _add_months(start, 1)
        else:
            end = start.replace(year=start.year + 1)
    except (ValueError, OverflowError):
        return None
    return start.astimezone(UTC), (end - _ONE_MICROSECOND).astimezone(UTC)


def date_matches(query: SearchValue, low: datetime | None, high: datetime | None) -> bool:
    """Whether an indexed date range ``[low, high]`` satisfies a date search value (R4 rules).

    ``None`` bounds are open (a Period without an end goes on forever). The same comparisons,
    written in SQL over the ``low``/``high`` columns, are what a database query needs:

    * ``eq``: the indexed range lies within the query range; ``ne``: it does not;
    * ``gt``/``lt``: the indexed range reaches beyond the end / before the start of the query;
    * ``ge``/``le``: the indexed range reaches the start / the end of the query or beyond.
    """
    if query.low is None or query.high is None:
        return False
    within = low is not None and high is not None and query.low <= low and high <= query.high
    checks = {
        "eq": within,
        "ne": not within,
        "gt": high is None or high > query.high,
        "lt": low is None or low < query.low,
        "ge": high is None or high >= query.low,
        "le": low is None or low <= query.high,
    }
    return checks.get(query.prefix, False)


# --- extraction ----------------------------------------------------------------------------------


def _walk(node: object, steps: Sequence[str]) -> Iterator[object]:
    """The values at a dotted element path, flattening repeating elements on the way."""
    if not steps:
        if isinstance(node, list):
            yield from node
        else:
            yield node
        return
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, steps)
        return
    if isinstance(node, dict):
        child = node.get(steps[0])
        if child is not None:
            yield from _walk(child, steps[1:])


def _values(resource: Mapping[str, object], path: str) -> Iterator[object]:
    return _walk(resource, path.split("."))


def _token_pairs(value: object) -> Iterator[tuple[str | None, str]]:
    """(system, code) pairs of a code, boolean, Coding, CodeableConcept, Identifier or ContactPoint."""
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str):
        yield None, value
    elif isinstance(value, dict):
        if isinstance(value.get("coding"), list):
            for coding in value["coding"]:
                yield from _token_pairs(coding)
        elif isinstance(value.get("code"), str):
            system = value.get("system")
            yield (system if isinstance(system, str) else ""), value["code"]
        elif isinstance(value.get("value"), str):
            system = value.get("system")
            yield (system if isinstance(system, str) else ""), value["value"]


_NAME_PARTS: Final = ("family", "given", "prefix", "suffix", "text")
_ADDRESS_PARTS: Final = ("line", "city", "district", "state", "postalCode", "country", "text")


def _strings(value: object) -> Iterator[str]:
    """The whole strings a string parameter indexes: a string, or each part of a name or address."""
    if isinstance(value, str):
        yield value
        return
    if not isinstance(value, dict):
        return
    parts = _NAME_PARTS if ("family" in value or "given" in value) else _ADDRESS_PARTS
    for part in parts:
        for item in _walk(value, (part,)):
            if isinstance(item, str):
                yield item
    given = [g for g in _walk(value, ("given",)) if isinstance(g, str)]
    family = value.get("family")
    if given and isinstance(family, str):
        yield " ".join([*given, family])


_REFERENCE_RE = re.compile(
    r"(?:[A-Za-z][A-Za-z0-9+.\-]*://\S*/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?"
)


def reference_target(reference: object) -> tuple[str, str] | None:
    """(type, id) of a literal reference (relative or absolute), or None for anything else.

    ``urn:uuid:`` references must be resolved by the caller before indexing; local (``#id``),
    conditional and logical (identifier-only) references name no stored resource.
    """
    if isinstance(reference, dict):
        reference = reference.get("reference")
    if not isinstance(reference, str):
        return None
    match = _REFERENCE_RE.fullmatch(reference)
    if match is None or match["type"] not in resource_types():
        return None
    return match["type"], match["id"]


def _date_entry(param: SearchParam, value: object) -> IndexEntry | None:
    if isinstance(value, str):
        bounds = date_range(value)
        if bounds is None:
            return None
        if param.identifying:
            # A blind index answers equality only, and a plain range would give the value away.
            return IndexEntry(param.name, param.kind, value, True)
        return IndexEntry(param.name, param.kind, value, False, bounds[0], bounds[1])
    if isinstance(value, dict) and ("start" in value or "end" in value) and not param.identifying:
        start, end = value.get("start"), value.get("end")
        low = date_range(start) if isinstance(start, str) else None
        high = date_range(end) if isinstance(end, str) else None
        if low is None and high is None:
            return None
        text = f"{start if low else ''}/{end if high else ''}"
        return IndexEntry(
            param.name, param.kind, text, False, low[0] if low else None, high[1] if high else None
        )
    return None


def _entries(param: SearchParam, value: object) -> Iterator[IndexEntry]:
    name, kind, identifying = param.name, param.kind, param.identifying
    if kind == ParamKind.TOKEN:
        for system, code in _token_pairs(value):
            normalised = _normalise(param, code)
            if not normalised:
                continue
            yield IndexEntry(name, kind, normalised, identifying)
            if system is not None:
                yield IndexEntry(name, kind, f"{system}|{normalised}", identifying)
    elif kind == ParamKind.STRING:
        for text in _strings(value):
            normalised = _normalise(param, text)
            if normalised:
                yield IndexEntry(name, kind, normalised, identifying)
    elif kind == ParamKind.DATE:
        entry = _date_entry(param, value)
        if entry is not None:
            yield entry
    elif kind == ParamKind.REFERENCE:
        target = reference_target(value)
        if target is not None and (not param.targets or target[0] in param.targets):
            yield IndexEntry(name, kind, f"{target[0]}/{target[1]}", identifying)
    elif isinstance(value, str) and value:
        yield IndexEntry(name, kind, value, identifying)


def extract(resource: Mapping[str, object]) -> list[IndexEntry]:
    """The index entries of a validated resource whose ``urn:uuid:`` references are resolved."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        return []
    entries: dict[IndexEntry, None] = {}
    for param in parameters_for(resource_type).values():
        for path in param.paths:
            for value in _values(resource, path):
                entries.update(dict.fromkeys(_entries(param, value)))
    return list(entries)


def _patient_id(value: object) -> str | None:
    target = reference_target(value)
    return target[1] if target is not None and target[0] == "Patient" else None


def patient_of(resource: Mapping[str, object]) -> str | None:
    """The id of the Patient whose record ``resource`` is part of (its compartment), if any."""
    resource_type = resource.get("resourceType")
    if resource_type == "Patient":
        resource_id = resource.get("id")
        return resource_id if isinstance(resource_id, str) and resource_id else None
    if not isinstance(resource_type, str):
        return None
    compartment = PATIENT_COMPARTMENT.get(resource_type)
    if compartment is None:
        paths: Iterable[str] = _FALLBACK_PATIENT_ELEMENTS
    else:
        params = parameters_for(resource_type)
        paths = [path for name in compartment for path in params[name].paths]
    for path in paths:
        for value in _values(resource, path):
            patient = _patient_id(value)
            if patient is not None:
                return patient
    return None


# --- queries -------------------------------------------------------------------------------------

_SHOWABLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.]{0,63}")
_DATE_PREFIXES: Final = frozenset({"eq", "ne", "gt", "lt", "ge", "le"})
_UNSUPPORTED_PREFIXES: Final = frozenset({"sa", "eb", "ap"})
_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _shown(text: str) -> str:
    return f"'{text}'" if _SHOWABLE_RE.fullmatch(text) else "(a name that cannot be shown)"


def _split_values(raw: str) -> list[str]:
    """Split on unescaped commas; escapes stay in place for the value's own parsing."""
    values: list[str] = []
    current: list[str] = []
    chars = iter(raw)
    for ch in chars:
        if ch == "\\":
            current.append(ch + next(chars, ""))
        elif ch == ",":
            values.append("".join(current))
            current = []
        else:
            current.append(ch)
    values.append("".join(current))
    return values


def _split_token(raw: str) -> tuple[str | None, str]:
    """Split ``system|code`` on its first unescaped bar (the raw, still escaped, value)."""
    index = 0
    while index < len(raw):
        if raw[index] == "\\":
            index += 2
            continue
        if raw[index] == "|":
            return raw[:index], raw[index + 1 :]
        index += 1
    return None, raw


def _unescape(text: str) -> str:
    return re.sub(r"\\([,|$\\])", r"\1", text)


def _token_value(param: SearchParam, raw: str) -> SearchValue:
    system, code = _split_token(raw)
    code = _normalise(param, _unescape(code))
    if not code:
        raise InvalidSearch(
            f"search parameter {_shown(param.name)} needs a code",
            hint="searching for any code of a system (system|) is not supported",
        )
    if system is None:
        return SearchValue(code)
    return SearchValue(f"{_unescape(system)}|{code}")


def _date_value(param: SearchParam, raw: str) -> SearchValue:
    prefix = "eq"
    if len(raw) > 2 and raw[:2].isalpha():
        prefix, raw = raw[:2], raw[2:]
        if prefix in _UNSUPPORTED_PREFIXES or prefix not in _DATE_PREFIXES:
            raise InvalidSearch(
                f"search parameter {_shown(param.name)} does not support the prefix {_shown(prefix)}",
                hint="use eq, ne, gt, lt, ge or le",
            )
    # A '+' in a query string decodes to a space: put back the zone offset's sign.
    if len(raw) > 6 and raw[-6] == " ":
        raw = f"{raw[:-6]}+{raw[-5:]}"
    bounds = date_range(raw)
    if bounds is None:
        raise InvalidSearch(
            f"search parameter {_shown(param.name)} needs a date",
            hint="YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss][zone], optionally prefixed",
        )
    if param.identifying:
        if prefix != "eq" or "T" in raw:
            raise InvalidSearch(
                f"search parameter {_shown(param.name)} only matches an exact date",
                hint="identifying values are blind-indexed, so ranges cannot be searched",
            )
        return SearchValue(raw)
    return SearchValue(raw, prefix, bounds[0], bounds[1])


def _reference_value(param: SearchParam, raw: str) -> SearchValue:
    text = _unescape(raw)
    target = reference_target(text)
    if target is None and _ID_RE.fullmatch(text) and len(param.targets) == 1:
        target = (param.targets[0], text)
    if target is None:
        raise InvalidSearch(
            f"search parameter {_shown(param.name)} needs a reference",
            hint="give Type/id (a bare id only where one type is possible)",
        )
    if param.targets and target[0] not in param.targets:
        raise InvalidSearch(
            f"search parameter {_shown(param.name)} cannot refer to {_shown(target[0])}",
            hint=f"it refers to {', '.join(param.targets)}",
        )
    return SearchValue(f"{target[0]}/{target[1]}")


def _search_value(param: SearchParam, raw: str) -> SearchValue:
    if not raw:
        raise InvalidSearch(f"search parameter {_shown(param.name)} has an empty value")
    if len(raw) > MAX_VALUE_LENGTH:
        raise InvalidSearch(f"search parameter {_shown(param.name)} has a value that is too long")
    if param.kind == ParamKind.TOKEN:
        return _token_value(param, raw)
    if param.kind == ParamKind.DATE:
        return _date_value(param, raw)
    if param.kind == ParamKind.REFERENCE:
        return _reference_value(param, raw)
    text = _normalise(param, _unescape(raw))
    if not text:
        raise InvalidSearch(f"search parameter {_shown(param.name)} has an empty value")
    return SearchValue(text)


def parse_search_query(resource_type: str, params: Mapping[str, Sequence[str]]) -> list[Criterion]:
    """Validate and normalise the search parameters of a query on ``resource_type``.

    Result parameters (:data:`RESULT_PARAMETERS`) are skipped for the caller to handle. Anything
    unknown, an unsupported modifier or prefix, or an unusable value raises :class:`InvalidSearch`.
    """
    if resource_type not in resource_types():
        raise InvalidSearch(f"{_shown(resource_type)} is not an R4 resource type")
    known = parameters_for(resource_type)
    criteria: list[Criterion] = []
    for key, raw_values in params.items():
        if key in RESULT_PARAMETERS:
            continue
        name, _, modifier = key.partition(":")
        param = known.get(name)
        if param is None:
            raise InvalidSearch(
                f"unknown search parameter {_shown(name)} for {resource_type}",
                hint=f"supported: {', '.join(sorted(known))}",
            )
        if modifier and not (modifier == "exact" and param.kind == ParamKind.STRING):
            raise InvalidSearch(
                f"search parameter {_shown(name)} does not support the modifier {_shown(modifier)}",
                hint="only string parameters take a modifier, and only :exact",
            )
        for raw in raw_values:
            pieces = _split_values(raw)
            if len(pieces) > MAX_VALUES_PER_PARAMETER:
                raise InvalidSearch(f"search parameter {_shown(name)} has too many values")
            values = tuple(_search_value(param, piece) for piece in pieces)
            criteria.append(
                Criterion(name, param.kind, param.identifying, values, modifier or None)
            )
            if len(criteria) > MAX_CRITERIA:
                raise InvalidSearch("the search has too many parameters")
    return criteria
