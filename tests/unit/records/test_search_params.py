"""Search parameters: extraction from real resources, the patient compartment, query parsing."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from medcollab.errors import InvalidInput
from medcollab.records.search_params import (
    COMMON_PARAMETERS,
    MAX_VALUES_PER_PARAMETER,
    PATIENT_COMPARTMENT,
    SEARCH_PARAMETERS,
    Criterion,
    IndexEntry,
    InvalidSearch,
    SearchValue,
    date_matches,
    date_range,
    extract,
    normalise_telecom,
    normalise_text,
    parse_search_query,
    patient_of,
    reference_target,
    supported_parameters,
)
from medcollab.records.validation import element_type, validate_resource
from tests.unit.records import example, synthea_bundle

ABDUL = "Abdul_Koepp_e925b0f3-8006-43f6-aa31-94bd215e55e7"
EURA = "Eura_Treutel_8a12e2bb-ecc5-43e9-8de2-bfd019911f7f"
ABDUL_ID = "018f428e-34f6-4707-8009-5ad742f901e7"

THE_18_TYPES = (
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Encounter",
    "Condition",
    "Observation",
    "MedicationRequest",
    "AllergyIntolerance",
    "Procedure",
    "Immunization",
    "DiagnosticReport",
    "DocumentReference",
    "ImagingStudy",
    "CarePlan",
    "CareTeam",
    "Consent",
    "Provenance",
)


def _resolve(node: Any, full_urls: dict[str, dict[str, Any]]) -> Any:
    """Rewrite urn:uuid references to Type/id, as the importer does before indexing."""
    if isinstance(node, list):
        return [_resolve(item, full_urls) for item in node]
    if not isinstance(node, dict):
        return node
    result = {key: _resolve(value, full_urls) for key, value in node.items()}
    target = full_urls.get(str(node.get("reference")))
    if target is not None:
        result["reference"] = f"{target['resourceType']}/{target['id']}"
    return result


def synthea_first(stem: str, resource_type: str) -> dict[str, Any]:
    bundle = synthea_bundle(stem)
    full_urls = {entry["fullUrl"]: entry["resource"] for entry in bundle["entry"]}
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == resource_type:
            resolved: dict[str, Any] = _resolve(entry["resource"], full_urls)
            return resolved
    raise AssertionError(f"no {resource_type} in {stem}")


def entries_of(resource: dict[str, Any], param: str) -> set[str]:
    return {entry.value for entry in extract(resource) if entry.param == param}


def entry(resource: dict[str, Any], param: str, value: str) -> IndexEntry:
    for candidate in extract(resource):
        if candidate.param == param and candidate.value == value:
            return candidate
    raise AssertionError(f"{param}={value} not extracted")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# --- the table -----------------------------------------------------------------------------------


def test_the_table_covers_the_18_types_and_every_path_exists_in_r4() -> None:
    assert set(THE_18_TYPES) <= set(SEARCH_PARAMETERS)
    allowed = {
        "token": {
            "code",
            "CodeableConcept",
            "Coding",
            "Identifier",
            "ContactPoint",
            "boolean",
            "id",
        },
        "string": {"string", "HumanName", "Address", "markdown"},
        "date": {"date", "dateTime", "instant", "Period"},
        "reference": {"Reference"},
        "uri": {"uri", "url", "canonical"},
    }
    for resource_type, params in SEARCH_PARAMETERS.items():
        names = [p.name for p in params]
        assert len(names) == len(set(names)), resource_type
        for param in (*COMMON_PARAMETERS, *params):
            for path in param.paths:
                assert element_type(resource_type, path) in allowed[param.kind], (
                    resource_type,
                    param.name,
                    path,
                )


def test_identifying_parameters_are_the_personal_ones() -> None:
    patient = {p.name: p.identifying for p in SEARCH_PARAMETERS["Patient"]}
    for name in ("identifier", "name", "family", "given", "telecom", "address", "birthdate"):
        assert patient[name] is True, name
    for name in ("gender", "active", "organization", "general-practitioner"):
        assert patient[name] is False, name
    clinical = {p.name: p.identifying for p in SEARCH_PARAMETERS["Observation"]}
    assert (
        clinical["code"] is clinical["status"] is clinical["date"] is clinical["patient"] is False
    )


def test_supported_parameters_lists_names_and_types() -> None:
    supported = supported_parameters()
    assert supported["Patient"]["birthdate"] == "date"
    assert supported["Observation"]["code"] == "token"
    assert supported["Encounter"]["patient"] == "reference"
    assert "_id" not in supported["Patient"]


# --- extraction on real resources ----------------------------------------------------------------


def test_patient_identifying_values_are_flagged_and_normalised() -> None:
    patient = synthea_first(ABDUL, "Patient")
    validate_resource(patient)
    found = extract(patient)
    assert IndexEntry("birthdate", "date", "1956-08-03", True) in found
    assert IndexEntry("family", "string", "koepp", True) in found
    assert IndexEntry("given", "string", "abdul", True) in found
    assert {"koepp", "abdul", "mr.", "abdul koepp"} <= entries_of(patient, "name")
    assert IndexEntry("telecom", "token", "5559784581", True) in found
    assert IndexEntry("telecom", "token", "phone|5559784581", True) in found
    assert IndexEntry(
        "identifier", "token", "http://hl7.org/fhir/sid/us-ssn|999-22-1962", True
    ) in (found)
    assert IndexEntry("address-city", "string", "peabody", True) in found
    assert IndexEntry("address-postalcode", "string", "01940", True) in found
    assert IndexEntry("gender", "token", "male", False) in found
    assert IndexEntry("_id", "token", ABDUL_ID, False) in found
    for item in found:
        if item.identifying:
            # A range would put an identifying date in the clear next to its blind index.
            assert item.low is None
            assert item.high is None
    identifying = {item.param for item in found if item.identifying}
    assert identifying == {
        "identifier",
        "name",
        "family",
        "given",
        "telecom",
        "address",
        "address-city",
        "address-state",
        "address-postalcode",
        "address-country",
        "birthdate",
    }


def test_practitioner_and_organization() -> None:
    practitioner = synthea_first(ABDUL, "Practitioner")
    assert entry(practitioner, "identifier", "http://hl7.org/fhir/sid/us-npi|160").identifying
    assert entry(practitioner, "family", "hilpert").identifying
    assert entries_of(practitioner, "gender") == {"female"}
    organization = synthea_first(ABDUL, "Organization")
    assert entry(organization, "name", "north shore medical center -").identifying is False
    assert entries_of(organization, "type") == {
        "prov",
        "http://terminology.hl7.org/CodeSystem/organization-type|prov",
    }
    assert entries_of(organization, "address-city") == {"salem"}


def test_practitioner_role() -> None:
    role = example("PractitionerRole-example")
    assert entries_of(role, "practitioner") == {"Practitioner/example"}
    assert entries_of(role, "organization") == {"Organization/f001"}
    assert entries_of(role, "role") == {"RP", "http://terminology.hl7.org/CodeSystem/v2-0286|RP"}
    assert entry(role, "telecom", "email|adam.southern@example.org").identifying
    period = entry(role, "date", "2012-01-01/2012-03-31")
    assert (period.low, period.high) == (utc(2012, 1, 1), utc(2012, 3, 31, 23, 59, 59, 999999))


def test_encounter() -> None:
    encounter = synthea_first(ABDUL, "Encounter")
    assert entries_of(encounter, "patient") == {f"Patient/{ABDUL_ID}"}
    assert entries_of(encounter, "subject") == {f"Patient/{ABDUL_ID}"}
    assert entries_of(encounter, "status") == {"finished"}
    assert entries_of(encounter, "class") == {
        "AMB",
        "http://terminology.hl7.org/CodeSystem/v3-ActCode|AMB",
    }
    assert "http://snomed.info/sct|185349003" in entries_of(encounter, "type")
    period = entry(encounter, "date", "1991-06-07T23:37:54+00:00/1991-06-07T23:52:54+00:00")
    assert period.low == utc(1991, 6, 7, 23, 37, 54)
    assert period.high == utc(1991, 6, 7, 23, 52, 54, 999999)
    assert period.identifying is False


def test_condition() -> None:
    condition = synthea_first(ABDUL, "Condition")
    assert entries_of(condition, "code") == {"162864005", "http://snomed.info/sct|162864005"}
    assert "active" in entries_of(condition, "clinical-status")
    assert "http://terminology.hl7.org/CodeSystem/condition-ver-status|confirmed" in entries_of(
        condition, "verification-status"
    )
    onset = entry(condition, "onset-date", "1991-06-07T23:37:54+00:00")
    assert onset.low == utc(1991, 6, 7, 23, 37, 54)
    assert entries_of(condition, "patient") == {f"Patient/{ABDUL_ID}"}


def test_observation() -> None:
    observation = synthea_first(ABDUL, "Observation")
    assert entries_of(observation, "code") == {"8302-2", "http://loinc.org|8302-2"}
    assert entries_of(observation, "status") == {"final"}
    assert "vital-signs" in entries_of(observation, "category")
    when = entry(observation, "date", "2011-10-14T23:37:54+00:00")
    assert (when.low, when.high) == (
        utc(2011, 10, 14, 23, 37, 54),
        utc(2011, 10, 14, 23, 37, 54, 999999),
    )
    assert entries_of(observation, "patient") == {f"Patient/{ABDUL_ID}"}
    assert len(entries_of(observation, "encounter")) == 1


def test_medication_request() -> None:
    request = synthea_first(ABDUL, "MedicationRequest")
    assert entries_of(request, "status") == {"stopped"}
    assert entries_of(request, "intent") == {"order"}
    assert entries_of(request, "code") == {
        "310965",
        "http://www.nlm.nih.gov/research/umls/rxnorm|310965",
    }
    assert entry(request, "authoredon", "2017-03-21T23:37:54+00:00").low == utc(
        2017, 3, 21, 23, 37, 54
    )
    assert entries_of(request, "requester") == {"Practitioner/6d705d81-8546-43b2-b336-31a282128f2d"}
    assert entries_of(request, "medication") == set()


def test_allergy_intolerance() -> None:
    allergy = synthea_first(EURA, "AllergyIntolerance")
    assert entries_of(allergy, "clinical-status") >= {"active"}
    assert entries_of(allergy, "verification-status") >= {"confirmed"}
    assert entries_of(allergy, "category") == {"food"}
    assert entries_of(allergy, "criticality") == {"low"}
    assert "http://snomed.info/sct|418689008" in entries_of(allergy, "code")
    assert entry(allergy, "date", "1936-04-25T06:12:43+00:00").low == utc(1936, 4, 25, 6, 12, 43)
    assert len(entries_of(allergy, "patient")) == 1


def test_procedure() -> None:
    procedure = synthea_first(ABDUL, "Procedure")
    assert entries_of(procedure, "code") == {"73761001", "http://snomed.info/sct|73761001"}
    assert entries_of(procedure, "status") == {"completed"}
    performed = entry(procedure, "date", "2012-11-25T23:37:54+00:00/2012-11-26T00:19:54+00:00")
    assert performed.high == utc(2012, 11, 26, 0, 19, 54, 999999)


def test_immunization() -> None:
    immunization = synthea_first(ABDUL, "Immunization")
    assert entries_of(immunization, "vaccine-code") == {"140", "http://hl7.org/fhir/sid/cvx|140"}
    assert entries_of(immunization, "status") == {"completed"}
    assert entries_of(immunization, "patient") == {f"Patient/{ABDUL_ID}"}
    assert entry(immunization, "date", "2011-10-14T23:37:54+00:00").identifying is False


def test_diagnostic_report() -> None:
    report = synthea_first(ABDUL, "DiagnosticReport")
    assert entries_of(report, "code") == {"57698-3", "http://loinc.org|57698-3"}
    assert entries_of(report, "category") == {
        "LAB",
        "http://terminology.hl7.org/CodeSystem/v2-0074|LAB",
    }
    issued = entry(report, "issued", "2012-10-19T23:37:54.530+00:00")
    assert (issued.low, issued.high) == (
        utc(2012, 10, 19, 23, 37, 54, 530000),
        utc(2012, 10, 19, 23, 37, 54, 530999),
    )
    assert len(entries_of(report, "result")) == len(report["result"]) == 4
    assert all(value.startswith("Observation/") for value in entries_of(report, "result"))


def test_document_reference() -> None:
    document = example("DocumentReference-example")
    assert entries_of(document, "patient") == {"Patient/xcda"}
    assert entries_of(document, "status") == {"current"}
    assert entries_of(document, "type") == {"34108-1", "http://loinc.org|34108-1"}
    assert entry(document, "identifier", "urn:oid:1.3.6.1.4.1.21367.2005.3.7").identifying
    assert entry(document, "description", "physical").identifying
    written = entry(document, "date", "2005-12-24T09:43:41+11:00")
    assert written.low == utc(2005, 12, 23, 22, 43, 41)


def test_imaging_study() -> None:
    study = synthea_first(ABDUL, "ImagingStudy")
    assert entries_of(study, "status") == {"available"}
    assert entries_of(study, "modality") == {
        "DX",
        "http://dicom.nema.org/resources/ontology/DCM|DX",
    }
    assert entry(study, "series", "1.2.840.99999999.1.82637698.1559319198567").identifying
    assert entry(study, "started", "2017-03-21T23:37:54+00:00").low == utc(2017, 3, 21, 23, 37, 54)
    assert entries_of(study, "patient") == {f"Patient/{ABDUL_ID}"}


def test_care_plan() -> None:
    plan = synthea_first(ABDUL, "CarePlan")
    assert entries_of(plan, "status") == {"completed"}
    assert entries_of(plan, "intent") == {"order"}
    assert "http://snomed.info/sct|91251008" in entries_of(plan, "category")
    assert entries_of(plan, "patient") == {f"Patient/{ABDUL_ID}"}


def test_care_team() -> None:
    team = example("CareTeam-example")
    assert entries_of(team, "patient") == {"Patient/example"}
    assert entries_of(team, "status") == {"active"}
    # An identifier without a system is indexed as "|value" too, for `identifier=|12345`.
    assert entries_of(team, "identifier") == {"12345", "|12345"}
    period = entry(team, "date", "/2013-01-01")
    assert period.low is None
    assert period.high == utc(2013, 1, 1, 23, 59, 59, 999999)


def test_consent() -> None:
    consent = example("Consent-consent-example-basic")
    assert entries_of(consent, "patient") == {"Patient/f001"}
    assert entries_of(consent, "status") == {"active"}
    assert "http://terminology.hl7.org/CodeSystem/consentscope|patient-privacy" in entries_of(
        consent, "scope"
    )
    assert entry(consent, "date", "2016-05-11").high == utc(2016, 5, 11, 23, 59, 59, 999999)


def test_provenance() -> None:
    provenance = example("Provenance-example")
    assert entries_of(provenance, "target") == {"Procedure/example"}
    assert entries_of(provenance, "patient") == set()
    assert entries_of(provenance, "agent") == {"Practitioner/xcda-author", "Device/software"}
    assert entry(provenance, "recorded", "2015-06-27T08:39:24+10:00").low == utc(
        2015, 6, 26, 22, 39, 24
    )


def test_unresolved_and_local_references_are_not_indexed() -> None:
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"},
        "performer": [{"reference": "#p1"}, {"reference": "https://x.org/fhir/Practitioner/7"}],
    }
    assert entries_of(observation, "subject") == set()
    assert entries_of(observation, "performer") == {"Practitioner/7"}


def test_every_type_gets_the_common_parameters() -> None:
    goal = {"resourceType": "Goal", "id": "g1", "meta": {"lastUpdated": "2024-02-29T12:00:00Z"}}
    found = extract(goal)
    assert IndexEntry("_id", "token", "g1", False) in found
    updated = entry(goal, "_lastUpdated", "2024-02-29T12:00:00Z")
    assert (updated.low, updated.high) == (
        utc(2024, 2, 29, 12, 0, 0),
        utc(2024, 2, 29, 12, 0, 0, 999999),
    )


def test_every_synthea_resource_extracts_without_error() -> None:
    bundle = synthea_bundle(ABDUL)
    full_urls = {item["fullUrl"]: item["resource"] for item in bundle["entry"]}
    count = 0
    for item in bundle["entry"]:
        resource = _resolve(item["resource"], full_urls)
        count += len(extract(resource))
        assert all(len(e.value) < 1024 for e in extract(resource))
    assert count > 1000


# --- the patient compartment ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "resource_type",
    [
        "Encounter",
        "Condition",
        "Observation",
        "MedicationRequest",
        "Procedure",
        "Immunization",
        "DiagnosticReport",
        "ImagingStudy",
        "CarePlan",
    ],
)
def test_patient_of_synthea_clinical_resources(resource_type: str) -> None:
    assert patient_of(synthea_first(ABDUL, resource_type)) == ABDUL_ID


def test_patient_of_each_remaining_type() -> None:
    assert patient_of(synthea_first(ABDUL, "Patient")) == ABDUL_ID
    assert (
        patient_of(synthea_first(EURA, "AllergyIntolerance"))
        == (synthea_first(EURA, "Patient")["id"])
    )
    assert patient_of(synthea_first(ABDUL, "Practitioner")) is None
    assert patient_of(synthea_first(ABDUL, "Organization")) is None
    assert patient_of(example("PractitionerRole-example")) is None
    assert patient_of(example("DocumentReference-example")) == "xcda"
    assert patient_of(example("CareTeam-example")) == "example"
    assert patient_of(example("Consent-consent-example-basic")) == "f001"
    # Provenance belongs to a patient only when it targets the Patient itself.
    assert patient_of(example("Provenance-example")) is None
    targeted = copy.deepcopy(example("Provenance-example"))
    targeted["target"].append({"reference": "Patient/p7"})
    assert patient_of(targeted) == "p7"
    assert set(PATIENT_COMPARTMENT) == set(THE_18_TYPES) - {"Patient"}


def test_patient_of_prefers_the_subject_and_falls_back_for_other_types() -> None:
    reported = {
        "resourceType": "Observation",
        "subject": {"reference": "Patient/subject"},
        "performer": [{"reference": "Patient/reporter"}],
    }
    assert patient_of(reported) == "subject"
    assert patient_of({**reported, "subject": {"reference": "Group/g"}}) == "reporter"
    assert patient_of(example("Claim-100150")) == "1"
    assert patient_of(example("Coverage-9876B1")) == "4"
    assert patient_of(
        {"resourceType": "Goal", "subject": {"reference": "Patient/5/_history/2"}}
    ) == ("5")
    assert patient_of({"resourceType": "Goal", "subject": {"reference": "urn:uuid:x"}}) is None
    assert patient_of({"resourceType": "Patient"}) is None
    assert patient_of({}) is None


def test_reference_targets() -> None:
    assert reference_target("Patient/1") == ("Patient", "1")
    assert reference_target({"reference": "https://h.org/fhir/R4/Encounter/e-1/_history/3"}) == (
        "Encounter",
        "e-1",
    )
    for other in ("#x", "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", "Nope/1", "Patient?a=b"):
        assert reference_target(other) is None


# --- normalisation and dates ---------------------------------------------------------------------


def test_normalisation() -> None:
    assert normalise_text("  José   ÁLVAREZ-Núñez ") == "jose alvarez-nunez"
    assert normalise_text("张 三") == "张 三"
    assert normalise_text("Ｍüller") == "muller"
    assert normalise_telecom("+1 (555) 978-4581") == "+15559784581"
    assert normalise_telecom(" Ann.Lee@Example.ORG ") == "ann.lee@example.org"
    assert normalise_telecom("http://example.org/Me") == "http://example.org/Me"


def test_date_ranges() -> None:
    assert date_range("2020") == (utc(2020, 1, 1), utc(2020, 12, 31, 23, 59, 59, 999999))
    assert date_range("2020-02") == (utc(2020, 2, 1), utc(2020, 2, 29, 23, 59, 59, 999999))
    assert date_range("2019-12-31") == (utc(2019, 12, 31), utc(2019, 12, 31, 23, 59, 59, 999999))
    assert date_range("2020-03-01T10:00:00+02:00") == (
        utc(2020, 3, 1, 8, 0, 0),
        utc(2020, 3, 1, 8, 0, 0, 999999),
    )
    assert date_range("2020-03-01T10:00Z") == (
        utc(2020, 3, 1, 10),
        utc(2020, 3, 1, 10, 0, 59, 999999),
    )
    assert date_range("2020-02-30") is None
    assert date_range("yesterday") is None


def test_date_matching_follows_the_r4_prefixes() -> None:
    day = SearchValue("2020-01-01", "eq", *date_range("2020-01-01") or (None, None))
    inside = date_range("2020-01-01T10:00:00Z")
    assert inside is not None
    assert date_matches(day, *inside)
    after = SearchValue("2020-01-01", "ge", day.low, day.high)
    later = date_range("2021-06-01")
    assert later is not None
    assert date_matches(after, *later)
    assert not date_matches(SearchValue("2020-01-01", "lt", day.low, day.high), *later)
    assert date_matches(SearchValue("2020-01-01", "gt", day.low, day.high), *later)
    assert date_matches(SearchValue("2020-01-01", "ne", day.low, day.high), *later)
    # A period with no end goes on: it is after any date.
    assert date_matches(
        SearchValue("2030", "gt", *date_range("2030") or (None, None)), utc(2019, 1, 1), None
    )
    assert not date_matches(
        SearchValue("2030", "eq", *date_range("2030") or (None, None)), utc(2019, 1, 1), None
    )


# --- query parsing -------------------------------------------------------------------------------


def test_string_search_is_normalised_and_blind_indexed() -> None:
    assert parse_search_query("Patient", {"name": ["  Koepp "]}) == [
        Criterion("name", "string", True, (SearchValue("koepp"),))
    ]
    exact = parse_search_query("Patient", {"family:exact": ["Koepp"]})
    assert exact == [Criterion("family", "string", True, (SearchValue("koepp"),), "exact")]


def test_the_query_value_matches_the_indexed_value() -> None:
    patient = synthea_first(ABDUL, "Patient")
    for key, raw in (
        ("telecom", "555-978-4581"),
        ("telecom", "phone|555 978 4581"),
        ("name", "ABDUL KOEPP"),
        ("identifier", "http://hl7.org/fhir/sid/us-ssn|999-22-1962"),
        ("birthdate", "1956-08-03"),
        ("address-city", "PEABODY"),
    ):
        [criterion] = parse_search_query("Patient", {key: [raw]})
        assert criterion.values[0].value in entries_of(patient, key), (key, raw)


def test_sql_metacharacters_are_just_characters() -> None:
    hostile = "O'Brien'); DROP TABLE fhir_resource;--"
    [criterion] = parse_search_query("Patient", {"family": [hostile]})
    assert criterion.values == (SearchValue("o'brien'); drop table fhir_resource;--"),)
    [token] = parse_search_query("Observation", {"code": ["1' OR '1'='1"]})
    assert token.values == (SearchValue("1' OR '1'='1"),)


def test_result_parameters_are_left_to_the_caller() -> None:
    params = {"_count": ["1000000000"], "_sort": ["-date"], "_offset": ["5"], "status": ["final"]}
    assert parse_search_query("Observation", params) == [
        Criterion("status", "token", False, (SearchValue("final"),))
    ]


def test_unknown_parameters_types_and_modifiers_are_refused() -> None:
    with pytest.raises(InvalidSearch, match="unknown search parameter 'colour' for Patient"):
        parse_search_query("Patient", {"colour": ["red"]})
    with pytest.raises(InvalidInput, match="cannot be shown"):
        parse_search_query("Patient", {"x'; DROP TABLE t;--": ["1"]})
    with pytest.raises(InvalidSearch, match="not an R4 resource type"):
        parse_search_query("Patientx", {})
    with pytest.raises(InvalidSearch, match="modifier 'contains'"):
        parse_search_query("Patient", {"name:contains": ["ab"]})
    with pytest.raises(InvalidSearch, match="modifier 'exact'"):
        parse_search_query("Patient", {"gender:exact": ["male"]})
    with pytest.raises(InvalidSearch, match="modifier 'missing'"):
        parse_search_query("Observation", {"code:missing": ["true"]})
    assert InvalidSearch.code == "invalid_search"


def test_any_r4_type_can_be_searched_by_the_common_parameters() -> None:
    assert parse_search_query("Goal", {"_id": ["g1"]}) == [
        Criterion("_id", "token", False, (SearchValue("g1"),))
    ]
    with pytest.raises(InvalidSearch):
        parse_search_query("Goal", {"lifecycle-status": ["active"]})


def test_tokens() -> None:
    [criterion] = parse_search_query(
        "Observation", {"code": ["http://loinc.org|8302-2,29463-7,|local"]}
    )
    assert criterion.values == (
        SearchValue("http://loinc.org|8302-2"),
        SearchValue("29463-7"),
        SearchValue("|local"),
    )
    [escaped] = parse_search_query("Observation", {"code": [r"a\,b"]})
    assert escaped.values == (SearchValue("a,b"),)
    with pytest.raises(InvalidSearch, match="needs a code"):
        parse_search_query("Observation", {"code": ["http://loinc.org|"]})
    with pytest.raises(InvalidSearch, match="empty value"):
        parse_search_query("Observation", {"code": [""]})


def test_repeated_parameters_are_joined_with_and() -> None:
    criteria = parse_search_query("Observation", {"date": ["ge2020-01-01", "lt2021-01-01"]})
    assert [(c.values[0].prefix, c.values[0].low) for c in criteria] == [
        ("ge", utc(2020, 1, 1)),
        ("lt", utc(2021, 1, 1)),
    ]


def test_dates() -> None:
    [criterion] = parse_search_query("Observation", {"date": ["ge2020-01-01"]})
    assert criterion == Criterion(
        "date",
        "date",
        False,
        (SearchValue("2020-01-01", "ge", utc(2020, 1, 1), utc(2020, 1, 1, 23, 59, 59, 999999)),),
    )
    # A '+' in the query string arrives as a space.
    [zoned] = parse_search_query("Observation", {"date": ["2020-03-01T10:00:00 02:00"]})
    assert zoned.values[0].low == utc(2020, 3, 1, 8)
    [updated] = parse_search_query("Patient", {"_lastUpdated": ["gt2024-02"]})
    assert updated.values[0].high == utc(2024, 2, 29, 23, 59, 59, 999999)
    for bad in ("sa2020", "ap2020", "xx2020", "2020-13-01", "ge2020-02-30", "soon"):
        with pytest.raises(InvalidSearch):
            parse_search_query("Observation", {"date": [bad]})


def test_identifying_dates_only_match_exactly() -> None:
    [criterion] = parse_search_query("Patient", {"birthdate": ["1956-08-03"]})
    assert criterion == Criterion("birthdate", "date", True, (SearchValue("1956-08-03"),))
    for ranged in ("ge1956-01-01", "lt1960", "1956-08-03T00:00:00Z"):
        with pytest.raises(InvalidSearch, match="only matches an exact date"):
            parse_search_query("Patient", {"birthdate": [ranged]})


def test_references() -> None:
    [typed] = parse_search_query("Observation", {"subject": ["Patient/123"]})
    assert typed.values == (SearchValue("Patient/123"),)
    [bare] = parse_search_query("Observation", {"patient": ["123"]})
    assert bare.values == (SearchValue("Patient/123"),)
    [absolute] = parse_search_query("Encounter", {"patient": ["https://h.org/fhir/Patient/9"]})
    assert absolute.values == (SearchValue("Patient/9"),)
    with pytest.raises(InvalidSearch, match="needs a reference"):
        parse_search_query("Observation", {"subject": ["123"]})
    with pytest.raises(InvalidSearch, match="cannot refer to 'Practitioner'"):
        parse_search_query("Observation", {"patient": ["Practitioner/1"]})


def test_hostile_sizes_are_refused() -> None:
    with pytest.raises(InvalidSearch, match="too long"):
        parse_search_query("Patient", {"name": ["a" * 5000]})
    with pytest.raises(InvalidSearch, match="too many values"):
        parse_search_query(
            "Observation", {"code": [",".join(["c"] * (MAX_VALUES_PER_PARAMETER + 1))]}
        )
    with pytest.raises(InvalidSearch, match="too many parameters"):
        parse_search_query("Observation", {"code": ["c"] * 40})
