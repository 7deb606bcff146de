"""FHIR R4 validation: the official examples, Synthea, and one hand-made resource per kind of error."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from medcollab.errors import InvalidInput
from medcollab.records.validation import (
    MAX_ISSUES,
    REQUIRED_BINDINGS,
    InvalidResource,
    Issue,
    element_type,
    resource_types,
    validate_resource,
)
from tests.unit.records import example, fhir_data, synthea_bundle

#: The HL7 R4 examples that are not valid R4, and the first element path each must be refused at.
#: Questionnaire "qs1" leaves out the required linkId of nested items (linkId is 1..1).
INVALID_EXAMPLES = {"Questionnaire-qs1": "Questionnaire.item[0].item[0].linkId"}

#: R4-only resource types (redefined or dropped in R4B) whose official examples must validate.
R4_ONLY_EXAMPLES = (
    "MedicinalProduct-example",
    "MedicinalProductAuthorization-example",
    "MedicinalProductContraindication-example",
    "MedicinalProductIndication-example",
    "MedicinalProductIngredient-example",
    "MedicinalProductInteraction-example",
    "MedicinalProductManufactured-example",
    "MedicinalProductPackaged-example",
    "MedicinalProductPharmaceutical-example",
    "MedicinalProductUndesirableEffect-example",
    "SubstanceSpecification-example",
    "EffectEvidenceSynthesis-example",
    "RiskEvidenceSynthesis-example",
    "Evidence-example",
)


def issues_of(data: object) -> list[Issue]:
    with pytest.raises(InvalidResource) as caught:
        validate_resource(data)
    return list(caught.value.issues)


def paths_of(data: object) -> list[str]:
    return [issue.path for issue in issues_of(data)]


# --- the official examples and Synthea -----------------------------------------------------------


def test_every_valid_hl7_example_passes_and_the_invalid_ones_fail_at_a_named_path() -> None:
    folder = fhir_data() / "hl7-r4-examples"
    files = sorted(p for p in folder.glob("*.json") if p.name != "package.json.orig")
    assert len(files) == 718
    refused: dict[str, str] = {}
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        try:
            assert validate_resource(data) is data
        except InvalidResource as exc:
            refused[path.stem] = exc.issues[0].path
    assert refused == INVALID_EXAMPLES


def test_the_invalid_questionnaire_names_every_item_without_link_id() -> None:
    issues = issues_of(example("Questionnaire-qs1"))
    assert {issue.message for issue in issues} == {"is required"}
    assert all(issue.path.endswith(".linkId") for issue in issues)
    assert "Questionnaire.item[0].item[1].item[0].linkId" in [issue.path for issue in issues]


@pytest.mark.parametrize("name", R4_ONLY_EXAMPLES)
def test_r4_only_resource_types_validate_as_r4(name: str) -> None:
    data = example(name)
    assert validate_resource(data)["resourceType"] == name.split("-", 1)[0]


def test_r4_shapes_are_enforced_for_types_that_r4b_redefined() -> None:
    # R4B renamed Evidence and dropped MedicinalProduct; R4's shapes are the ones that count.
    # R4's Evidence requires exposureBackground; R4B's has no such element but variableDefinition.
    assert paths_of({"resourceType": "Evidence", "status": "draft"}) == [
        "Evidence.exposureBackground"
    ]
    r4b_shape = {
        "resourceType": "Evidence",
        "status": "draft",
        "exposureBackground": {"reference": "EvidenceVariable/1"},
        "variableDefinition": [{"variableRole": {"text": "population"}}],
    }
    assert paths_of(r4b_shape) == ["Evidence.variableDefinition"]
    assert paths_of({"resourceType": "MedicinalProduct", "name": [{"part": []}]}) == [
        "MedicinalProduct.name[0].part",
        "MedicinalProduct.name[0].productName",
    ]
    # Types that exist only in R4B or R5 are not R4 resource types.
    for later in ("MedicinalProductDefinition", "SubscriptionTopic", "Ingredient"):
        assert paths_of({"resourceType": later}) == ["Resource.resourceType"]


def test_every_synthea_transaction_bundle_validates() -> None:
    files = sorted((fhir_data() / "synthea-r4").glob("*.json"))
    assert len(files) == 21
    entries = 0
    for path in files:
        bundle = json.loads(path.read_text(encoding="utf-8"))
        validate_resource(bundle)
        entries += len(bundle["entry"])
    assert entries == 6478


def test_resource_types_are_the_146_of_r4() -> None:
    types = resource_types()
    assert len(types) == 146
    assert {"Patient", "MedicinalProduct", "EffectEvidenceSynthesis", "Parameters"} <= types
    assert "Resource" not in types
    assert "DomainResource" not in types


# --- input that is not a resource ----------------------------------------------------------------


@pytest.mark.parametrize("data", [None, [], [{"resourceType": "Patient"}], "Patient", 42, True])
def test_non_objects_are_refused(data: object) -> None:
    assert issues_of(data) == [Issue("Resource", "a resource must be a JSON object")]


def test_unknown_and_missing_resource_types_are_refused() -> None:
    assert issues_of({"resourceType": "Patientx"}) == [
        Issue("Resource.resourceType", "'Patientx' is not an R4 resource type")
    ]
    assert issues_of({"id": "a"}) == [Issue("Resource.resourceType", "is missing")]
    assert issues_of({"resourceType": 7}) == [
        Issue("Resource.resourceType", "the value is not an R4 resource type")
    ]


def test_the_error_is_invalid_input_with_a_stable_code() -> None:
    with pytest.raises(InvalidResource) as caught:
        validate_resource({"resourceType": "Patient", "gender": "F", "nmae": []})
    exc = caught.value
    assert isinstance(exc, InvalidInput)
    assert exc.code == "invalid_resource"
    assert exc.message.startswith("invalid FHIR resource: Patient.gender: code 'F'")
    assert exc.message.endswith("(and 1 more issue)")
    assert "Patient.nmae: is not a known element" in exc.diagnostics()


# --- one hand-made resource per kind of error ----------------------------------------------------

_OBS: dict[str, Any] = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}


def _obs(**elements: object) -> dict[str, Any]:
    return {**_OBS, **elements}


CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown element", {"resourceType": "Patient", "nmae": []}, "Patient.nmae", "known element"),
    (
        "unknown nested element",
        {"resourceType": "Patient", "name": [{"famliy": "X"}]},
        "Patient.name[0].famliy",
        "known element",
    ),
    (
        "string instead of boolean",
        {"resourceType": "Patient", "active": "yes"},
        "Patient.active",
        "JSON boolean",
    ),
    (
        "number in a string array",
        {"resourceType": "Patient", "name": [{"given": ["Ann", 5]}]},
        "Patient.name[0].given[1]",
        "JSON string",
    ),
    (
        "date in the wrong format",
        {"resourceType": "Patient", "birthDate": "03/04/1970"},
        "Patient.birthDate",
        "not a valid date",
    ),
    (
        "date that is not a calendar day",
        {"resourceType": "Patient", "birthDate": "1970-02-30"},
        "Patient.birthDate",
        "no such calendar day",
    ),
    (
        "dateTime with a time but no zone",
        _obs(effectiveDateTime="2020-01-01T10:00:00"),
        "Observation.effectiveDateTime",
        "not a valid dateTime",
    ),
    (
        "instant without seconds",
        _obs(issued="2020-01-01T10:00Z"),
        "Observation.issued",
        "not a valid instant",
    ),
    (
        "id with a space",
        {"resourceType": "Patient", "id": "a b"},
        "Patient.id",
        "not a valid id",
    ),
    (
        "id longer than 64",
        {"resourceType": "Patient", "id": "a" * 65},
        "Patient.id",
        "not a valid id",
    ),
    (
        "uri with whitespace",
        {"resourceType": "Patient", "implicitRules": "http://a b"},
        "Patient.implicitRules",
        "not a valid uri",
    ),
    (
        "code with a double space",
        {"resourceType": "Patient", "language": "en  US"},
        "Patient.language",
        "not a valid code",
    ),
    (
        "decimal given as a string",
        _obs(valueQuantity={"value": "1.5"}),
        "Observation.valueQuantity.value",
        "finite JSON number",
    ),
    (
        "decimal that is not finite",
        _obs(valueQuantity={"value": float("nan")}),
        "Observation.valueQuantity.value",
        "finite JSON number",
    ),
    (
        "integer beyond 32 bits",
        {"resourceType": "Patient", "multipleBirthInteger": 2**31},
        "Patient.multipleBirthInteger",
        "32-bit integer",
    ),
    (
        "integer given as a fraction",
        {"resourceType": "Patient", "multipleBirthInteger": 2.0},
        "Patient.multipleBirthInteger",
        "32-bit integer",
    ),
    (
        "boolean as an integer",
        {"resourceType": "Patient", "multipleBirthInteger": True},
        "Patient.multipleBirthInteger",
        "32-bit integer",
    ),
    (
        "positiveInt of zero",
        _obs(valueSampledData={"origin": {"value": 1}, "period": 1, "dimensions": 0}),
        "Observation.valueSampledData.dimensions",
        "positive",
    ),
    (
        "unsignedInt below zero",
        {"resourceType": "Questionnaire", "status": "draft", "item": [
            {"linkId": "1", "type": "string", "maxLength": 1, "code": [{"code": "a"}]}
        ], "version": "1", "_version": {"extension": [
            {"url": "http://x", "valueUnsignedInt": -1}
        ]}},
        "Questionnaire._version.extension[0].valueUnsignedInt",
        "non-negative",
    ),
    (
        "base64 that is not base64",
        {"resourceType": "Binary", "contentType": "text/plain", "data": "not base64!"},
        "Binary.data",
        "not valid base64",
    ),
    (
        "required element missing",
        {"resourceType": "Observation", "code": {"text": "x"}},
        "Observation.status",
        "is required",
    ),
    (
        "required element of a data type missing",
        {"resourceType": "Patient", "extension": [{"valueString": "x"}]},
        "Patient.extension[0].url",
        "is required",
    ),
    (
        "singleton given as an array",
        {"resourceType": "Patient", "gender": ["male"]},
        "Patient.gender",
        "not an array",
    ),
    (
        "array given as a singleton",
        {"resourceType": "Patient", "name": {"family": "X"}},
        "Patient.name",
        "must be an array",
    ),
    (
        "empty array",
        {"resourceType": "Patient", "name": []},
        "Patient.name",
        "empty array",
    ),
    (
        "empty object",
        {"resourceType": "Patient", "name": [{}]},
        "Patient.name[0]",
        "empty object",
    ),
    (
        "empty string",
        {"resourceType": "Patient", "name": [{"family": ""}]},
        "Patient.name[0].family",
        "empty string",
    ),
    (
        "null",
        {"resourceType": "Patient", "gender": None},
        "Patient.gender",
        "must not be null",
    ),
    (
        "object where a string belongs",
        {"resourceType": "Patient", "name": [{"family": {"text": "X"}}]},
        "Patient.name[0].family",
        "JSON string",
    ),
    (
        "string where an object belongs",
        {"resourceType": "Patient", "maritalStatus": "M"},
        "Patient.maritalStatus",
        "JSON object (CodeableConcept)",
    ),
    (
        "two types of one choice",
        _obs(valueString="a", valueBoolean=True),
        "Observation.valueBoolean",
        "only one of value[x]",
    ),
    (
        "required choice missing",
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/1"},
        },
        "MedicationRequest.medication[x]",
        "is required",
    ),
    (
        "choice type that R4 does not allow",
        _obs(valueUri="http://example.org"),
        "Observation.valueUri",
        "known element",
    ),
    (
        "extension with a value and extensions",
        {
            "resourceType": "Patient",
            "extension": [
                {"url": "http://x", "valueString": "a", "extension": [{"url": "y", "valueCode": "b"}]}
            ],
        },
        "Patient.extension[0]",
        "not both",
    ),
    (
        "primitive extension that is not an object",
        {"resourceType": "Patient", "_birthDate": "x"},
        "Patient._birthDate",
        "JSON object",
    ),
    (
        "primitive extension beside a complex element",
        {"resourceType": "Patient", "_name": {"id": "a"}},
        "Patient._name",
        "known element",
    ),
    (
        "null in a repeating primitive without an extension",
        {"resourceType": "Patient", "name": [{"given": ["A", None]}]},
        "Patient.name[0].given[1]",
        "must not be null",
    ),
    (
        "primitive extensions that do not line up",
        {"resourceType": "Patient", "name": [{"given": ["A", "B"], "_given": [None]}]},
        "Patient.name[0]._given",
        "one entry per value",
    ),
    (
        "narrative with a script",
        {
            "resourceType": "Patient",
            "text": {
                "status": "generated",
                "div": '<div xmlns="http://www.w3.org/1999/xhtml"><script>x()</script></div>',
            },
        },
        "Patient.text.div",
        "active content",
    ),
    (
        "narrative with an event handler",
        {
            "resourceType": "Patient",
            "text": {
                "status": "generated",
                "div": '<div xmlns="http://www.w3.org/1999/xhtml"><img src="a" onerror="x()"/></div>',
            },
        },
        "Patient.text.div",
        "active content",
    ),
    (
        "narrative that is not a div",
        {"resourceType": "Patient", "text": {"status": "generated", "div": "<p>x</p>"}},
        "Patient.text.div",
        "<div>",
    ),
    (
        "string with control characters",
        {"resourceType": "Patient", "name": [{"family": "A\x00B"}]},
        "Patient.name[0].family",
        "control characters",
    ),
    (
        "code outside a required binding",
        {"resourceType": "Patient", "gender": "F"},
        "Patient.gender",
        "administrative-gender (female | male | other | unknown)",
    ),
    (
        "reference in no known form",
        _obs(subject={"reference": "not a reference"}),
        "Observation.subject.reference",
        "not a valid reference",
    ),
    (
        "reference to a type R4 does not have",
        _obs(subject={"reference": "Pateint/1"}),
        "Observation.subject.reference",
        "not an R4 resource type",
    ),
    (
        "malformed urn:uuid reference",
        _obs(subject={"reference": "urn:uuid:1234"}),
        "Observation.subject.reference",
        "urn:uuid:",
    ),
    (
        "local reference to a missing contained resource",
        _obs(subject={"reference": "#p1"}),
        "Observation.subject.reference",
        "contained resource that is not there",
    ),
    (
        "contained resource that contains resources",
        {
            "resourceType": "Patient",
            "contained": [{"resourceType": "Patient", "id": "a", "contained": [
                {"resourceType": "Patient", "id": "b"}
            ]}],
        },
        "Patient.contained[0].contained",
        "cannot contain resources",
    ),
    (
        "invalid resource inside a contained resource",
        {"resourceType": "Patient", "contained": [{"resourceType": "Observation", "id": "o"}]},
        "Patient.contained[0].status",
        "is required",
    ),
    (
        "unknown type of a contained resource",
        {"resourceType": "Patient", "contained": [{"resourceType": "Nope", "id": "o"}]},
        "Patient.contained[0].resourceType",
        "not an R4 resource type",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("resource", "path", "fragment"),
    [pytest.param(resource, path, fragment, id=name) for name, resource, path, fragment in CASES],
)
def test_each_kind_of_error_names_the_element(
    resource: dict[str, Any], path: str, fragment: str
) -> None:
    issues = issues_of(resource)
    assert issues[0].path == path, issues
    assert fragment in issues[0].message


def test_a_required_primitive_may_be_given_as_an_extension_only() -> None:
    resource = {
        "resourceType": "Observation",
        "_status": {"extension": [{"url": "http://example.org/why", "valueString": "masked"}]},
        "code": {"text": "x"},
    }
    assert validate_resource(resource) is resource


def test_repeating_primitives_may_hold_a_place_for_an_extension() -> None:
    resource = {
        "resourceType": "Patient",
        "name": [
            {
                "given": ["Ann", None],
                "_given": [None, {"extension": [{"url": "http://x", "valueCode": "masked"}]}],
            }
        ],
    }
    validate_resource(resource)


def test_valid_references_of_every_form_pass() -> None:
    resource = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "contained": [{"resourceType": "Device", "id": "d1"}],
        "subject": {"reference": "Patient/123/_history/2"},
        "encounter": {"reference": "https://fhir.example.org/R4/Encounter/9"},
        "device": {"reference": "#d1"},
        "focus": [
            {"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"},
            {"reference": "urn:oid:1.2.3.4"},
        ],
        "performer": [{"identifier": {"value": "logical only"}}],
    }
    validate_resource(resource)


def _transaction(reference: str, *, full_url: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": full_url,
                "resource": {"resourceType": "Patient", "gender": "female"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:5a1d2c3e-0000-4000-8000-000000000002",
                "resource": {**_OBS, "subject": {"reference": reference}},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }


def test_a_dangling_reference_in_a_transaction_is_refused() -> None:
    patient = "urn:uuid:5a1d2c3e-0000-4000-8000-000000000001"
    validate_resource(_transaction(patient, full_url=patient))
    dangling = _transaction("urn:uuid:5a1d2c3e-0000-4000-8000-00000000dead", full_url=patient)
    assert issues_of(dangling) == [
        Issue(
            "Bundle.entry[1].resource.subject.reference",
            "refers to a bundle entry (urn:) that the bundle does not have",
        )
    ]


def test_conditional_references_are_only_allowed_inside_a_transaction() -> None:
    conditional = "Patient?identifier=http://example.org/mrn|123"
    validate_resource(_transaction(conditional, full_url="urn:uuid:5a1d2c3e-0000-4000-8000-1"))
    assert paths_of(_obs(subject={"reference": conditional})) == ["Observation.subject.reference"]


def test_errors_inside_bundle_entries_carry_the_entry_path() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient"}},
            {"resource": {"resourceType": "Patient", "gender": "x", "birthDate": "1970-13-01"}},
        ],
    }
    assert paths_of(bundle) == [
        "Bundle.entry[1].resource.gender",
        "Bundle.entry[1].resource.birthDate",
    ]


# --- required bindings ---------------------------------------------------------------------------

_PATIENT_REF = {"reference": "Patient/1"}
#: A valid resource per binding and the element path where the bound code sits.
_BINDING_HOSTS: dict[str, tuple[dict[str, Any], str]] = {
    "Patient.gender": ({"resourceType": "Patient"}, "gender"),
    "Patient.contact.gender": ({"resourceType": "Patient", "contact": [{"name": {"text": "A"}}]}, "contact.0.gender"),
    "Practitioner.gender": ({"resourceType": "Practitioner"}, "gender"),
    "RelatedPerson.gender": ({"resourceType": "RelatedPerson", "patient": _PATIENT_REF}, "gender"),
    "Person.gender": ({"resourceType": "Person"}, "gender"),
    "Observation.status": (dict(_OBS), "status"),
    "MedicationRequest.status": (
        {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
         "medicationCodeableConcept": {"text": "x"}, "subject": _PATIENT_REF},
        "status",
    ),
    "MedicationRequest.intent": (
        {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
         "medicationCodeableConcept": {"text": "x"}, "subject": _PATIENT_REF},
        "intent",
    ),
    "Condition.clinicalStatus": ({"resourceType": "Condition", "subject": _PATIENT_REF}, "clinicalStatus"),
    "Condition.verificationStatus": ({"resourceType": "Condition", "subject": _PATIENT_REF}, "verificationStatus"),
    "AllergyIntolerance.clinicalStatus": ({"resourceType": "AllergyIntolerance", "patient": _PATIENT_REF}, "clinicalStatus"),
    "AllergyIntolerance.verificationStatus": ({"resourceType": "AllergyIntolerance", "patient": _PATIENT_REF}, "verificationStatus"),
    "Encounter.status": ({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}}, "status"),
    "Procedure.status": ({"resourceType": "Procedure", "status": "completed", "subject": _PATIENT_REF}, "status"),
    "Immunization.status": (
        {"resourceType": "Immunization", "status": "completed", "vaccineCode": {"text": "x"},
         "patient": _PATIENT_REF, "occurrenceDateTime": "2020"},
        "status",
    ),
    "DiagnosticReport.status": ({"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}}, "status"),
    "DocumentReference.status": (
        {"resourceType": "DocumentReference", "status": "current",
         "content": [{"attachment": {"url": "http://example.org/d"}}]},
        "status",
    ),
    "Consent.status": (
        {"resourceType": "Consent", "status": "active", "scope": {"text": "x"}, "category": [{"text": "x"}]},
        "status",
    ),
    "CarePlan.status": ({"resourceType": "CarePlan", "status": "active", "intent": "plan", "subject": _PATIENT_REF}, "status"),
    "CarePlan.intent": ({"resourceType": "CarePlan", "status": "active", "intent": "plan", "subject": _PATIENT_REF}, "intent"),
    "Bundle.type": ({"resourceType": "Bundle", "type": "collection"}, "type"),
    "Narrative.status": (
        {"resourceType": "Patient", "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'}},
        "text.status",
    ),
    "ContactPoint.system": ({"resourceType": "Patient", "telecom": [{"value": "1"}]}, "telecom.0.system"),
    "ContactPoint.use": ({"resourceType": "Patient", "telecom": [{"value": "1"}]}, "telecom.0.use"),
    "Identifier.use": ({"resourceType": "Patient", "identifier": [{"value": "1"}]}, "identifier.0.use"),
    "HumanName.use": ({"resourceType": "Patient", "name": [{"family": "A"}]}, "name.0.use"),
    "Address.use": ({"resourceType": "Patient", "address": [{"city": "A"}]}, "address.0.use"),
    "Address.type": ({"resourceType": "Patient", "address": [{"city": "A"}]}, "address.0.type"),
}  # fmt: skip


def _set(resource: dict[str, Any], dotted: str, value: object) -> tuple[dict[str, Any], str]:
    """A copy of ``resource`` with ``value`` at ``dotted`` (numbers index arrays), and its path."""
    result = copy.deepcopy(resource)
    node: Any = result
    steps = dotted.split(".")
    for step in steps[:-1]:
        node = node[int(step)] if step.isdigit() else node[step]
    node[steps[-1]] = value
    path = result["resourceType"]
    for step in steps:
        path += f"[{step}]" if step.isdigit() else f".{step}"
    return result, path


def test_the_binding_table_covers_what_the_issue_asks_for() -> None:
    assert set(_BINDING_HOSTS) == set(REQUIRED_BINDINGS)
    assert REQUIRED_BINDINGS["Patient.gender"].codes == {"male", "female", "other", "unknown"}
    assert REQUIRED_BINDINGS["Condition.clinicalStatus"].system == (
        "http://terminology.hl7.org/CodeSystem/condition-clinical"
    )


@pytest.mark.parametrize("binding_path", sorted(REQUIRED_BINDINGS))
def test_required_bindings_accept_their_codes_and_refuse_others(binding_path: str) -> None:
    binding = REQUIRED_BINDINGS[binding_path]
    host, where = _BINDING_HOSTS[binding_path]
    validate_resource(host)
    if binding.system is None:
        for code in binding.codes:
            validate_resource(_set(host, where, code)[0])
        bad, path = _set(host, where, "not-a-code")
        issues = issues_of(bad)
        assert issues[0].path == path
        assert f"code 'not-a-code' is not in the required value set {binding.value_set}" in (
            issues[0].message
        )
        return
    for code in binding.codes:
        good = {"coding": [{"system": binding.system, "code": code}]}
        validate_resource(_set(host, where, good)[0])
    bad, path = _set(host, where, {"coding": [{"system": binding.system, "code": "bogus"}]})
    assert paths_of(bad) == [f"{path}.coding[0].code"]
    elsewhere, path = _set(host, where, {"coding": [{"system": "http://x", "code": "active"}]})
    assert issues_of(elsewhere) == [
        Issue(path, f"must have a coding from {binding.system} (required binding)")
    ]


def test_required_bindings_beyond_the_table_come_from_r4() -> None:
    # Composition.confidentiality is bound (required) to v3 ConfidentialityClassification.
    resource = example("Composition-example")
    validate_resource(resource)
    assert paths_of({**resource, "confidentiality": "X"}) == ["Composition.confidentiality"]


# --- safety of the messages and of the walk ------------------------------------------------------


def test_messages_never_echo_submitted_values() -> None:
    secret = "Zhang San 1970-01-01 13800138000"
    resource = {
        "resourceType": "Patient",
        "birthDate": secret,
        "gender": secret,
        "name": [{"family": {"x": secret}}],
        secret: "x",
    }
    issues = issues_of(resource)
    assert len(issues) == 4
    for issue in issues:
        assert "Zhang" not in issue.path
        assert "Zhang" not in issue.message
        assert "13800138000" not in issue.message
    assert "Patient.?" in [issue.path for issue in issues]


def test_issues_are_capped() -> None:
    resource: dict[str, Any] = {"resourceType": "Patient"}
    resource.update({f"unknown{i}": i for i in range(500)})
    assert len(issues_of(resource)) == MAX_ISSUES


def test_deep_nesting_is_refused_without_exhausting_the_stack() -> None:
    extension: dict[str, Any] = {"url": "http://x", "valueString": "leaf"}
    for _ in range(2000):
        extension = {"url": "http://x", "extension": [extension]}
    issues = issues_of({"resourceType": "Patient", "extension": [extension]})
    assert issues[-1].message == "is nested too deeply"


def test_element_types_follow_the_r4_model() -> None:
    assert element_type("Encounter", "participant.individual") == "Reference"
    assert element_type("Observation", "effectiveDateTime") == "dateTime"
    assert element_type("Patient", "name.given") == "string"
    assert element_type("Patient", "nmae") is None
    assert element_type("Nope", "id") is None


def test_synthea_entries_validate_one_by_one() -> None:
    bundle = synthea_bundle("Abdul_Koepp_e925b0f3-8006-43f6-aa31-94bd215e55e7")
    types = set()
    for entry in bundle["entry"]:
        types.add(validate_resource(entry["resource"])["resourceType"])
    assert {"Patient", "Observation", "Encounter", "Condition", "ImagingStudy"} <= types
