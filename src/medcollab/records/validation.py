"""FHIR R4 (4.0.1) validation of incoming resources, with no database and no network.

A resource is checked against a compact model of the R4 structure (``data/fhir-r4-model.json``,
derived from the official R4 JSON schema and StructureDefinitions; see ``data/README.md`` and
ADR 0003). The checks:

* ``resourceType`` names one of the 146 R4 resource types (nested resources too);
* every element is known for its type (``Patient.nmae`` is an error), ``_x`` primitive
  extensions only sit beside primitive elements and line up with repeating values;
* primitive values have their JSON type and R4 format: dates and instants (with real calendar
  days), ids, uris, codes, decimals, integer ranges, base64; no ``null`` and no empty strings,
  arrays or objects;
* cardinality: required elements are present, repeating elements are arrays and the others are not;
* choice types: at most one ``value[x]`` (and exactly one where the group is required);
* required bindings: codes of every required ``code`` binding in R4, plus the CodeableConcept
  bindings listed in :data:`REQUIRED_BINDINGS`, the one table of the bindings we guarantee;
* references: relative ``Type/id``, absolute URL, ``urn:uuid:``/``urn:oid:`` or a local ``#id``
  that names a contained resource; inside a Bundle every ``urn:`` reference names an entry's
  ``fullUrl`` (a dangling reference in a transaction is an error);
* the invariants that keep content safe to store and show: extensions have a value or nested
  extensions but not both (ext-1), contained resources contain nothing further (dom-2), and
  narrative XHTML carries no script, frame, form or event handler (txt-1, txt-2).

Failures raise :class:`InvalidResource`, carrying up to :data:`MAX_ISSUES` :class:`Issue` s, each
with a FHIRPath-like element path (``Patient.name[0].given[1]``) and a message that never echoes a
submitted value except a short code, so the OperationOutcome built from it cannot leak PHI.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import cache
from importlib import resources
from typing import Any, Final

from medcollab.errors import InvalidInput

#: Issues beyond this many are not collected: the client has enough to fix, and a hostile payload
#: cannot make the error response (or the validation work) grow without bound.
MAX_ISSUES: Final = 50
#: Objects and arrays nested deeper than this are refused before they exhaust the stack.
MAX_DEPTH: Final = 100
#: R4 limits a string to 1 MB; this is the limit in characters, a little above it in bytes.
MAX_STRING_LENGTH: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem: where (a FHIRPath-like element path) and what, safe to show to the client."""

    path: str
    message: str


class InvalidResource(InvalidInput):
    """The resource is not valid FHIR R4; ``issues`` name each element at fault."""

    code = "invalid_resource"

    def __init__(self, issues: Sequence[Issue]) -> None:
        if not issues:
            raise ValueError("InvalidResource needs at least one issue")
        self.issues: tuple[Issue, ...] = tuple(issues)
        first = self.issues[0]
        more = len(self.issues) - 1
        suffix = f" (and {more} more issue{'s' if more > 1 else ''})" if more else ""
        super().__init__(f"invalid FHIR resource: {first.path}: {first.message}{suffix}")

    def diagnostics(self) -> str:
        return "; ".join(f"{issue.path}: {issue.message}" for issue in self.issues)


@dataclass(frozen=True, slots=True)
class RequiredBinding:
    """The codes a required binding allows.

    ``system`` is set for CodeableConcept elements: at least one coding must come from that code
    system, and every coding from it must carry one of ``codes``.
    """

    value_set: str
    codes: frozenset[str]
    system: str | None = None


def _codes(text: str) -> frozenset[str]:
    return frozenset(text.split())


_GENDER = RequiredBinding("administrative-gender", _codes("male female other unknown"))
_REQUEST_STATUS = _codes("draft active on-hold revoked completed entered-in-error unknown")
_EVENT_STATUS = _codes(
    "preparation in-progress not-done on-hold stopped completed entered-in-error unknown"
)
_TERMINOLOGY = "http://terminology.hl7.org/CodeSystem/"

#: The required bindings this platform guarantees, by element path. The R4 model enforces the codes
#: of every other required ``code`` binding as well; this table adds the CodeableConcept bindings the
#: JSON form of R4 cannot express, and is checked against the model when it loads (a path that does
#: not exist, or codes that differ from R4's for a ``code`` element, fail the tests).
REQUIRED_BINDINGS: Final[Mapping[str, RequiredBinding]] = {
    "Patient.gender": _GENDER,
    "Patient.contact.gender": _GENDER,
    "Practitioner.gender": _GENDER,
    "RelatedPerson.gender": _GENDER,
    "Person.gender": _GENDER,
    "Observation.status": RequiredBinding(
        "observation-status",
        _codes("registered preliminary final amended corrected cancelled entered-in-error unknown"),
    ),
    "MedicationRequest.status": RequiredBinding(
        "medicationrequest-status",
        _codes("active on-hold cancelled completed entered-in-error stopped draft unknown"),
    ),
    "MedicationRequest.intent": RequiredBinding(
        "medicationrequest-intent",
        _codes(
            "proposal plan order original-order reflex-order filler-order instance-order option"
        ),
    ),
    "Condition.clinicalStatus": RequiredBinding(
        "condition-clinical",
        _codes("active recurrence relapse inactive remission resolved"),
        system=_TERMINOLOGY + "condition-clinical",
    ),
    "Condition.verificationStatus": RequiredBinding(
        "condition-ver-status",
        _codes("unconfirmed provisional differential confirmed refuted entered-in-error"),
        system=_TERMINOLOGY + "condition-ver-status",
    ),
    "AllergyIntolerance.clinicalStatus": RequiredBinding(
        "allergyintolerance-clinical",
        _codes("active inactive resolved"),
        system=_TERMINOLOGY + "allergyintolerance-clinical",
    ),
    "AllergyIntolerance.verificationStatus": RequiredBinding(
        "allergyintolerance-verification",
        _codes("unconfirmed confirmed refuted entered-in-error"),
        system=_TERMINOLOGY + "allergyintolerance-verification",
    ),
    "Encounter.status": RequiredBinding(
        "encounter-status",
        _codes(
            "planned arrived triaged in-progress onleave finished cancelled entered-in-error unknown"
        ),
    ),
    "Procedure.status": RequiredBinding("event-status", _EVENT_STATUS),
    "Immunization.status": RequiredBinding(
        "immunization-status", _codes("completed entered-in-error not-done")
    ),
    "DiagnosticReport.status": RequiredBinding(
        "diagnostic-report-status",
        _codes(
            "registered partial preliminary final amended corrected appended cancelled"
            " entered-in-error unknown"
        ),
    ),
    "DocumentReference.status": RequiredBinding(
        "document-reference-status", _codes("current superseded entered-in-error")
    ),
    "Consent.status": RequiredBinding(
        "consent-state-codes", _codes("draft proposed active rejected inactive entered-in-error")
    ),
    "CarePlan.status": RequiredBinding("request-status", _REQUEST_STATUS),
    "CarePlan.intent": RequiredBinding("care-plan-intent", _codes("proposal plan order option")),
    "Bundle.type": RequiredBinding(
        "bundle-type",
        _codes(
            "document message transaction transaction-response batch batch-response history"
            " searchset collection"
        ),
    ),
    "Narrative.status": RequiredBinding(
        "narrative-status", _codes("generated extensions additional empty")
    ),
    "ContactPoint.system": RequiredBinding(
        "contact-point-system", _codes("phone fax email pager url sms other")
    ),
    "ContactPoint.use": RequiredBinding("contact-point-use", _codes("home work temp old mobile")),
    "Identifier.use": RequiredBinding(
        "identifier-use", _codes("usual official temp secondary old")
    ),
    "HumanName.use": RequiredBinding(
        "name-use", _codes("usual official temp nickname anonymous old maiden")
    ),
    "Address.use": RequiredBinding("address-use", _codes("home work temp old billing")),
    "Address.type": RequiredBinding("address-type", _codes("postal physical both")),
}


# --- primitive types -----------------------------------------------------------------------------
# The regular expressions are the ones the R4 specification gives for each primitive type
# (datatypes.html), anchored with fullmatch. base64Binary is checked without the specification's
# nested-quantifier expression, which backtracks catastrophically on long invalid input.

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_DATE_RE = re.compile(rf"{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?")
_DATETIME_RE = re.compile(
    rf"{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(T{_TIME}{_ZONE})?)?)?"
)
_INSTANT_RE = re.compile(rf"{_YEAR}-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])T{_TIME}{_ZONE}")
_TIME_RE = re.compile(_TIME)
_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_CODE_RE = re.compile(r"[^\s]+(\s[^\s]+)*")
_URI_RE = re.compile(r"\S+")
_OID_RE = re.compile(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+")
_UUID_RE = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
# Control characters other than tab, line feed and carriage return are not FHIR string content.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1


def _text_problem(value: str) -> str | None:
    if not value:
        return "must not be an empty string"
    if len(value) > MAX_STRING_LENGTH:
        return "is longer than 1 MB"
    if _CONTROL_RE.search(value):
        return "contains control characters"
    return None


def _string(value: object) -> str | None:
    if not isinstance(value, str):
        return "must be a JSON string"
    return _text_problem(value)


def _pattern_check(pattern: re.Pattern[str], expected: str) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if not isinstance(value, str):
            return "must be a JSON string"
        problem = _text_problem(value)
        if problem is None and pattern.fullmatch(value) is None:
            problem = f"is not a valid {expected}"
        return problem

    return check


def _calendar_check(pattern: re.Pattern[str], expected: str) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if not isinstance(value, str):
            return "must be a JSON string"
        problem = _text_problem(value)
        if problem is None and pattern.fullmatch(value) is None:
            problem = f"is not a valid {expected}"
        if problem is None and len(value) >= 10:
            # The expression allows day 31 in every month; the calendar does not.
            try:
                date(int(value[0:4]), int(value[5:7]), int(value[8:10]))
            except ValueError:
                problem = "is not a valid date: there is no such calendar day"
        return problem

    return check


def _boolean(value: object) -> str | None:
    return None if isinstance(value, bool) else "must be a JSON boolean (true or false)"


def _integer_check(low: int, high: int, expected: str) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        # bool is a subclass of int in Python, but true/false are not FHIR integers.
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be a JSON number that is {expected}"
        if not low <= value <= high:
            return f"must be {expected}"
        return None

    return check


def _decimal(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value):
        return None
    return "must be a finite JSON number"


def _base64(value: object) -> str | None:
    if not isinstance(value, str):
        return "must be a JSON string"
    problem = _text_problem(value)
    if problem is None:
        # Most base64 has no line breaks; only the rest pays for removing whitespace.
        compact = value if _BASE64_RE.fullmatch(value) else "".join(value.split())
        if len(compact) % 4 or _BASE64_RE.fullmatch(compact) is None:
            problem = "is not valid base64"
    return problem


# Narrative is shown to people in browsers: anything that runs code or submits data is refused.
_XHTML_FORBIDDEN_RE = re.compile(
    r"<\s*/?\s*(script|iframe|frame|frameset|object|embed|applet|form|input|button|textarea|"
    r"select|base|link|meta|style)\b|\son[a-z]+\s*=|javascript\s*:",
    re.IGNORECASE,
)


def _xhtml(value: object) -> str | None:
    if not isinstance(value, str):
        return "must be a JSON string"
    problem = _text_problem(value)
    if problem is None and not value.lstrip().startswith("<div"):
        problem = "must be an XHTML <div> element"
    if problem is None and _XHTML_FORBIDDEN_RE.search(value):
        problem = "contains active content (script, frame, form, style or event handler)"
    return problem


_PRIMITIVE_CHECKS: Final[dict[str, Callable[[object], str | None]]] = {
    "boolean": _boolean,
    "integer": _integer_check(_INT32_MIN, _INT32_MAX, "a 32-bit integer"),
    "positiveInt": _integer_check(1, _INT32_MAX, "a positive 32-bit integer"),
    "unsignedInt": _integer_check(0, _INT32_MAX, "a non-negative 32-bit integer"),
    "decimal": _decimal,
    "string": _string,
    "markdown": _string,
    "code": _pattern_check(_CODE_RE, "code"),
    "id": _pattern_check(_ID_RE, "id (1-64 letters, digits, '-' or '.')"),
    "uri": _pattern_check(_URI_RE, "uri"),
    "url": _pattern_check(_URI_RE, "url"),
    "canonical": _pattern_check(_URI_RE, "canonical URL"),
    "oid": _pattern_check(_OID_RE, "oid (urn:oid:...)"),
    "uuid": _pattern_check(_UUID_RE, "uuid (urn:uuid:...)"),
    "date": _calendar_check(_DATE_RE, "date (YYYY, YYYY-MM or YYYY-MM-DD)"),
    "dateTime": _calendar_check(_DATETIME_RE, "dateTime (a date, or a time with a zone)"),
    "instant": _calendar_check(_INSTANT_RE, "instant (date, time to the second and zone)"),
    "time": _pattern_check(_TIME_RE, "time (hh:mm:ss)"),
    "base64Binary": _base64,
    "xhtml": _xhtml,
}


# --- the compiled R4 model -----------------------------------------------------------------------

_PRIMITIVE, _COMPLEX, _RESOURCE = 0, 1, 2


@dataclass(slots=True)
class _Element:
    type: str
    kind: int
    array: bool
    choice: str | None
    codes: frozenset[str] | None
    binding: RequiredBinding | None
    check: Callable[[object], str | None] | None
    definition: _Definition | None = None
    contained: bool = False


@dataclass(slots=True)
class _Definition:
    name: str
    path: str
    elements: dict[str, _Element] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    required_choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Model:
    resource_types: frozenset[str]
    definitions: dict[str, _Definition]


@cache
def _model() -> _Model:
    raw = json.loads(
        resources.files("medcollab.records")
        .joinpath("data/fhir-r4-model.json")
        .read_text(encoding="utf-8")
    )
    primitives = set(raw["primitiveTypes"])
    definitions = {
        name: _Definition(name=name, path=spec["path"]) for name, spec in raw["definitions"].items()
    }
    by_path = {d.path: d for d in definitions.values()}
    for name, spec in raw["definitions"].items():
        definition = definitions[name]
        required: list[str] = []
        for element_name, el in spec["elements"].items():
            type_name = el["type"]
            if type_name in primitives:
                kind = _PRIMITIVE
            elif type_name == "Resource":
                kind = _RESOURCE
            else:
                kind = _COMPLEX
            enum = el.get("enum")
            definition.elements[element_name] = _Element(
                type=type_name,
                kind=kind,
                array=bool(el.get("array")),
                choice=el.get("choice"),
                codes=frozenset(enum) if enum else None,
                binding=None,
                check=_PRIMITIVE_CHECKS[type_name] if kind == _PRIMITIVE else None,
                definition=definitions[type_name] if kind == _COMPLEX else None,
                contained=element_name == "contained",
            )
            if el.get("min"):
                required.append(element_name)
        definition.required = tuple(required)
        definition.required_choices = tuple(spec.get("requiredChoices", ()))
    for path, binding in REQUIRED_BINDINGS.items():
        owner_path, _, element_name = path.rpartition(".")
        owner = by_path.get(owner_path)
        element = owner.elements.get(element_name) if owner is not None else None
        if element is None:
            raise RuntimeError(f"REQUIRED_BINDINGS names {path}, which R4 does not define")
        if element.kind == _PRIMITIVE and element.codes != binding.codes:
            raise RuntimeError(f"REQUIRED_BINDINGS codes for {path} differ from R4's")
        element.binding = binding
    return _Model(resource_types=frozenset(raw["resourceTypes"]), definitions=definitions)


def resource_types() -> frozenset[str]:
    """The names of the R4 resource types."""
    return _model().resource_types


def element_type(resource_type: str, path: str) -> str | None:
    """The R4 type of the element at a dotted ``path`` below ``resource_type``, or None.

    ``element_type("Encounter", "participant.individual")`` is ``"Reference"``; choice elements
    are named with their type (``effectiveDateTime``).
    """
    definitions = _model().definitions
    definition = definitions.get(resource_type)
    element: _Element | None = None
    for step in path.split("."):
        if definition is None:
            return None
        element = definition.elements.get(step)
        if element is None:
            return None
        definition = element.definition
    return element.type if element is not None else None


# --- the walk ------------------------------------------------------------------------------------

_SAFE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SHOWABLE_CODE_RE = re.compile(r"[A-Za-z0-9._\-]{1,32}")
_RELATIVE_REF_RE = re.compile(
    r"(?P<type>[A-Z][A-Za-z]{1,63})/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?"
)
_CONDITIONAL_REF_RE = re.compile(r"(?P<type>[A-Z][A-Za-z]{1,63})\?\S+")
_ABSOLUTE_REF_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+")
_URN_UUID_REF_RE = re.compile(
    r"urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_MAX_LISTED_CODES = 12


def _name(key: object) -> str:
    """An element name fit for a path: client-chosen names that are not identifiers are hidden."""
    if isinstance(key, str) and _SAFE_NAME_RE.fullmatch(key):
        return key
    return "?"


def _show(value: object) -> str:
    """A submitted code quoted for a message, or a neutral phrase when it might be anything else."""
    if isinstance(value, str) and _SHOWABLE_CODE_RE.fullmatch(value):
        return f"'{value}'"
    return "the value"


class _TooManyIssues(Exception):
    """Raised inside the walk once MAX_ISSUES have been collected, to stop early."""


@dataclass(slots=True)
class _ResourceScope:
    """What one resource (with its contained resources) declares and refers to locally."""

    contained_ids: set[str] = field(default_factory=set)
    local_refs: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class _BundleScope:
    """What one Bundle declares (entry fullUrls) and what its entries refer to by URN."""

    bundle_type: object
    full_urls: set[str] = field(default_factory=set)
    urn_refs: list[tuple[str, str]] = field(default_factory=list)


def _reference_problem(
    ref: str, resource_types: frozenset[str], in_transaction: bool
) -> str | None:
    """What is wrong with the form of a literal reference that is not local or a URN, if anything."""
    relative = _RELATIVE_REF_RE.fullmatch(ref)
    if relative is not None:
        if relative["type"] not in resource_types:
            return "refers to a type that is not an R4 resource type"
        return None
    if _ABSOLUTE_REF_RE.fullmatch(ref) is not None:
        return None
    conditional = _CONDITIONAL_REF_RE.fullmatch(ref)
    if in_transaction and conditional is not None and conditional["type"] in resource_types:
        # A conditional reference is resolved by the server when the transaction runs.
        return None
    return (
        "is not a valid reference (expected Type/id, an absolute URL, urn:uuid:, urn:oid: or #id)"
    )


def _urn_problem(ref: str) -> str | None:
    if ref.startswith("urn:uuid:"):
        if _URN_UUID_REF_RE.fullmatch(ref) is None:
            return "is not a valid urn:uuid: reference"
    elif _OID_RE.fullmatch(ref) is None:
        return "is not a valid urn:uuid: or urn:oid: reference"
    return None


class _Walker:
    def __init__(self, model: _Model) -> None:
        self.model = model
        self.issues: list[Issue] = []
        self.resource_scopes: list[_ResourceScope] = []
        self.bundle_scopes: list[_BundleScope] = []

    def issue(self, path: str, message: str) -> None:
        self.issues.append(Issue(path, message))
        if len(self.issues) >= MAX_ISSUES:
            raise _TooManyIssues

    # Resources ----------------------------------------------------------------------------------

    def resource(self, value: object, path: str | None, depth: int, *, contained: bool) -> None:
        where = "Resource" if path is None else path
        if not isinstance(value, dict):
            self.issue(where, "a resource must be a JSON object")
            return
        resource_type = value.get("resourceType")
        if not isinstance(resource_type, str) or resource_type not in self.model.resource_types:
            message = (
                "is missing"
                if resource_type is None
                else f"{_show(resource_type)} is not an R4 resource type"
            )
            self.issue(f"{where}.resourceType", message)
            return
        definition = self.model.definitions[resource_type]
        base = resource_type if path is None else path
        if contained:
            self.contained_resource(value, definition, base, depth)
            return
        scope = _ResourceScope()
        self.resource_scopes.append(scope)
        bundle_scope = _BundleScope(value.get("type")) if resource_type == "Bundle" else None
        if bundle_scope is not None:
            self.bundle_scopes.append(bundle_scope)
        try:
            self.walk_object(value, definition, base, depth)
        finally:
            self.resource_scopes.pop()
            if bundle_scope is not None:
                self.bundle_scopes.pop()
        for ref_path, ref in scope.local_refs:
            if ref and ref not in scope.contained_ids:
                self.issue(ref_path, "refers to a contained resource that is not there")
        if bundle_scope is not None:
            self.bundle_end(value, bundle_scope)

    def contained_resource(
        self, value: dict[str, Any], definition: _Definition, path: str, depth: int
    ) -> None:
        if "contained" in value:
            self.issue(f"{path}.contained", "a contained resource cannot contain resources")
        resource_id = value.get("id")
        if isinstance(resource_id, str) and self.resource_scopes:
            self.resource_scopes[-1].contained_ids.add(resource_id)
        self.walk_object(value, definition, path, depth)

    def bundle_end(self, bundle: dict[str, Any], scope: _BundleScope) -> None:
        entries = bundle.get("entry")
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict) and isinstance(entry.get("fullUrl"), str):
                    scope.full_urls.add(entry["fullUrl"])
        for ref_path, ref in scope.urn_refs:
            if ref not in scope.full_urls:
                self.issue(
                    ref_path, "refers to a bundle entry (urn:) that the bundle does not have"
                )

    # Objects ------------------------------------------------------------------------------------

    def walk_object(
        self, value: dict[str, Any], definition: _Definition, path: str, depth: int
    ) -> None:
        if depth > MAX_DEPTH:
            self.issue(path, "is nested too deeply")
            return
        if not value:
            self.issue(path, "must not be an empty object")
            return
        elements = definition.elements
        choices: dict[str, str] = {}
        for key, item in value.items():
            element = elements.get(key)
            if element is None:
                self.unknown_key(value, key, definition, path, depth)
            elif element.choice is not None and not self.first_of_choice(
                choices, key, element, path
            ):
                continue
            elif element.array or isinstance(item, list):
                self.member(value, key, item, element, path=path, depth=depth)
            else:
                # The common case, a single value, is handled here to spare a call per element.
                self.value(item, element, f"{path}.{key}", depth + 1)
        for name in definition.required:
            if name not in value and (elements[name].kind != _PRIMITIVE or f"_{name}" not in value):
                self.issue(f"{path}.{name}", "is required")
        for choice in definition.required_choices:
            if choice not in choices:
                self.issue(f"{path}.{choice}[x]", "is required")
        if definition.name == "Extension" and ("value" in choices) == ("extension" in value):
            self.issue(path, "an extension must have either a value or extensions, not both")

    def unknown_key(
        self, owner: dict[str, Any], key: object, definition: _Definition, path: str, depth: int
    ) -> None:
        if key == "resourceType" and definition.name in self.model.resource_types:
            return
        if isinstance(key, str) and key.startswith("_"):
            self.primitive_extension(owner, key, definition.elements.get(key[1:]), path, depth)
        else:
            self.issue(f"{path}.{_name(key)}", "is not a known element")

    def first_of_choice(
        self, choices: dict[str, str], key: str, element: _Element, path: str
    ) -> bool:
        choice: str = element.choice  # type: ignore[assignment]  # the caller checked it is set
        other = choices.get(choice)
        if other is not None:
            self.issue(f"{path}.{key}", f"only one of {choice}[x] may be present ({other} is too)")
            return False
        choices[choice] = key
        return True

    def member(
        self,
        owner: dict[str, Any],
        key: str,
        item: object,
        element: _Element,
        *,
        path: str,
        depth: int,
    ) -> None:
        child = f"{path}.{key}"
        if not element.array:
            if isinstance(item, list):
                self.issue(child, "must be a single value, not an array")
            else:
                self.value(item, element, child, depth + 1)
            return
        if not isinstance(item, list):
            self.issue(child, "must be an array")
            return
        if not item:
            self.issue(child, "must not be an empty array")
            return
        extensions = owner.get(f"_{key}") if element.kind == _PRIMITIVE else None
        for index, member in enumerate(item):
            if member is None and self.null_is_extended(extensions, index):
                continue
            self.value(member, element, f"{child}[{index}]", depth + 1)

    @staticmethod
    def null_is_extended(extensions: object, index: int) -> bool:
        # A null in a repeating primitive only holds the place of a value given as an extension.
        return (
            isinstance(extensions, list)
            and index < len(extensions)
            and isinstance(extensions[index], dict)
        )

    def primitive_extension(
        self,
        owner: dict[str, Any],
        key: str,
        element: _Element | None,
        path: str,
        depth: int,
    ) -> None:
        child = f"{path}.{_name(key)}"
        if element is None or element.kind != _PRIMITIVE:
            self.issue(child, "is not a known element")
            return
        element_definition = self.model.definitions["Element"]
        item = owner[key]
        if not element.array:
            if isinstance(item, dict):
                self.walk_object(item, element_definition, child, depth + 1)
            else:
                self.issue(child, "must be a JSON object")
            return
        values = owner.get(key[1:])
        if not isinstance(item, list) or not item:
            self.issue(child, "must be a non-empty array")
            return
        if values is not None and (not isinstance(values, list) or len(values) != len(item)):
            self.issue(child, f"must have one entry per value of {key[1:]}")
            return
        for index, member in enumerate(item):
            if isinstance(member, dict):
                self.walk_object(member, element_definition, f"{child}[{index}]", depth + 1)
            elif member is not None:
                self.issue(f"{child}[{index}]", "must be a JSON object")
            elif not isinstance(values, list) or values[index] is None:
                self.issue(f"{child}[{index}]", "a value or an extension is required")

    # Values -------------------------------------------------------------------------------------

    def value(self, item: object, element: _Element, path: str, depth: int) -> None:
        if item is None:
            self.issue(path, "must not be null")
        elif element.check is not None:
            problem = element.check(item)
            if problem is not None:
                self.issue(path, problem)
            elif element.codes is not None and item not in element.codes:
                self.issue(path, self.code_message(item, element))
        elif element.definition is None:
            self.resource(item, path, depth, contained=element.contained)
        elif not isinstance(item, dict):
            self.issue(path, f"must be a JSON object ({element.type})")
        else:
            self.walk_object(item, element.definition, path, depth)
            if element.type == "Reference":
                self.reference(item, path)
            elif element.binding is not None and element.binding.system is not None:
                self.codeable_concept(item, element.binding, path)

    @staticmethod
    def code_message(item: object, element: _Element) -> str:
        binding = element.binding
        codes = element.codes or frozenset()
        name = f" {binding.value_set}" if binding is not None else ""
        message = f"code {_show(item)} is not in the required value set{name}"
        if len(codes) <= _MAX_LISTED_CODES:
            message += f" ({' | '.join(sorted(codes))})"
        return message

    def reference(self, item: dict[str, Any], path: str) -> None:
        ref = item.get("reference")
        if not isinstance(ref, str):
            return
        ref_path = f"{path}.reference"
        if ref.startswith("#"):
            if self.resource_scopes:
                self.resource_scopes[-1].local_refs.append((ref_path, ref[1:]))
            return
        if ref.startswith("urn:"):
            problem = _urn_problem(ref)
            if problem is None and self.bundle_scopes:
                self.bundle_scopes[-1].urn_refs.append((ref_path, ref))
        else:
            in_transaction = any(s.bundle_type == "transaction" for s in self.bundle_scopes)
            problem = _reference_problem(ref, self.model.resource_types, in_transaction)
        if problem is not None:
            self.issue(ref_path, problem)

    def codeable_concept(self, item: dict[str, Any], binding: RequiredBinding, path: str) -> None:
        codings = item.get("coding")
        found = False
        for index, coding in enumerate(codings if isinstance(codings, list) else ()):
            if not isinstance(coding, dict) or coding.get("system") != binding.system:
                continue
            found = True
            code = coding.get("code")
            if code not in binding.codes:
                message = (
                    f"code {_show(code)} is not in the required value set {binding.value_set}"
                    f" ({' | '.join(sorted(binding.codes))})"
                )
                self.issue(f"{path}.coding[{index}].code", message)
        if not found:
            self.issue(path, f"must have a coding from {binding.system} (required binding)")


def validate_resource(data: object) -> dict[str, object]:
    """Validate ``data`` (parsed JSON) as an R4 resource and return it, or raise InvalidResource."""
    walker = _Walker(_model())
    with contextlib.suppress(_TooManyIssues):
        walker.resource(data, None, 0, contained=False)
    if walker.issues:
        raise InvalidResource(walker.issues)
    if not isinstance(data, dict):  # pragma: no cover - the walk reports non-objects
        raise InvalidResource([Issue("Resource", "a resource must be a JSON object")])
    return data
