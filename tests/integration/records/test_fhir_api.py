"""The FHIR REST API end to end: CRUD, versions, search, bundles, errors as OperationOutcome."""

from __future__ import annotations

from sqlalchemy import select

from medcollab.audit.models import AuditEventRecord
from tests.integration.records.conftest import World
from tests.support.factories import observation, patient_resource


def _audit_types(world: World) -> list[str]:
    with world.runtime.database.unit_of_work() as session:
        return list(session.scalars(select(AuditEventRecord.type).order_by(AuditEventRecord.seq)))


def test_metadata_describes_r4(world: World) -> None:
    response = world.client.get("/fhir/R4/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "CapabilityStatement"
    assert body["fhirVersion"] == "4.0.1"
    patient = next(r for r in body["rest"][0]["resource"] if r["type"] == "Patient")
    assert {p["name"] for p in patient["searchParam"]} >= {"identifier", "name", "birthdate"}


def test_create_read_update_vread_history_delete(world: World) -> None:
    c, h = world.client, world.as_doctor()
    created = c.post("/fhir/R4/Observation", json=observation(world.patient_id), headers=h)
    assert created.status_code == 201, created.text
    oid = created.json()["id"]
    assert created.headers["etag"] == 'W/"1"'
    assert created.headers["location"] == f"/fhir/R4/Observation/{oid}/_history/1"

    read = c.get(f"/fhir/R4/Observation/{oid}", headers=h)
    assert read.status_code == 200
    assert read.json()["valueQuantity"]["value"] == 72.0
    assert read.json()["meta"]["versionId"] == "1"

    changed = {**read.json(), "valueQuantity": {**read.json()["valueQuantity"], "value": 80.0}}
    updated = c.put(f"/fhir/R4/Observation/{oid}", json=changed, headers={**h, "If-Match": 'W/"1"'})
    assert updated.status_code == 200, updated.text
    assert updated.headers["etag"] == 'W/"2"'
    stale = c.put(f"/fhir/R4/Observation/{oid}", json=changed, headers={**h, "If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"

    v1 = c.get(f"/fhir/R4/Observation/{oid}/_history/1", headers=h)
    assert v1.json()["valueQuantity"]["value"] == 72.0
    history = c.get(f"/fhir/R4/Observation/{oid}/_history", headers=h).json()
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"2"', 'W/"1"']

    assert c.delete(f"/fhir/R4/Observation/{oid}", headers=h).status_code == 204
    assert c.get(f"/fhir/R4/Observation/{oid}", headers=h).status_code == 410
    assert c.get(f"/fhir/R4/Observation/{oid}/_history/2", headers=h).status_code == 200
    types = _audit_types(world)
    for expected in (
        "fhir:resource:create",
        "fhir:resource:read",
        "fhir:resource:update",
        "fhir:resource:vread",
        "fhir:resource:history",
        "fhir:resource:delete",
    ):
        assert expected in types


def test_invalid_resource_is_400_naming_the_path_and_stores_nothing(world: World) -> None:
    c, h = world.client, world.as_doctor()
    before = c.get("/fhir/R4/Observation", params={"patient": world.patient_id}, headers=h)
    bad = observation(world.patient_id)
    bad["status"] = "finished-ish"
    response = c.post("/fhir/R4/Observation", json=bad, headers=h)
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert any("Observation.status" in i.get("expression", [""])[0] for i in outcome["issue"])
    unknown = {**observation(world.patient_id), "colour": "blue"}
    response = c.post("/fhir/R4/Observation", json=unknown, headers=h)
    assert response.status_code == 400
    after = c.get("/fhir/R4/Observation", params={"patient": world.patient_id}, headers=h)
    assert after.json()["total"] == before.json()["total"]


def test_body_id_must_match_url(world: World) -> None:
    c, h = world.client, world.as_doctor()
    body = {**patient_resource(), "id": "someone-else"}
    response = c.put(f"/fhir/R4/Patient/{world.patient_id}", json=body, headers=h)
    assert response.status_code == 400
    assert "differs" in response.json()["issue"][0]["diagnostics"]


def test_purpose_codes(world: World) -> None:
    c = world.client
    url = f"/fhir/R4/Patient/{world.patient_id}"
    assert c.get(url, headers=world.as_doctor(purpose="NOPE")).status_code == 400
    assert c.get(url, headers=world.as_patient(purpose="TREAT")).status_code == 403
    assert c.get(url, headers=world.as_patient()).status_code == 200
    assert c.get(url, headers=world.as_doctor(purpose="TREAT")).status_code == 200


def test_search_patient_by_identifying_values_and_paging(world: World) -> None:
    c, h = world.client, world.as_doctor()
    for name in ("Li", "Wang", "Chen"):
        resource = patient_resource(family=name, identifier=f"ID-{name}")
        assert c.post("/fhir/R4/Patient", json=resource, headers=h).status_code == 201
    found = c.get("/fhir/R4/Patient", params={"family": "wang"}, headers=h).json()
    assert found["total"] == 1
    assert found["entry"][0]["resource"]["name"][0]["family"] == "Wang"
    by_id = c.get("/fhir/R4/Patient", params={"identifier": "ID-Chen"}, headers=h).json()
    assert by_id["total"] == 1
    page = c.get("/fhir/R4/Patient", params={"_count": 2}, headers=h).json()
    assert page["total"] == 4
    assert len(page["entry"]) == 2
    assert any(link["relation"] == "next" for link in page["link"])
    hostile = c.get(
        "/fhir/R4/Patient", params={"family": "x' OR '1'='1", "_count": 10**9}, headers=h
    )
    assert hostile.status_code == 200
    assert hostile.json()["total"] == 0
    deep = c.get("/fhir/R4/Patient", params={"_offset": 10**8}, headers=h)
    assert deep.status_code == 200
    assert deep.json()["entry"] == []


def test_transaction_is_all_or_nothing(world: World) -> None:
    c, h = world.client, world.as_doctor()
    good = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
                "resource": patient_resource(family="Tx", identifier="TX-1"),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222",
                "resource": {
                    **observation("x"),
                    "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    response = c.post("/fhir/R4", json=good, headers=h)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "transaction-response"
    patient_ref = body["entry"][0]["response"]["location"].split("/_history")[0]
    obs = body["entry"][1]["resource"]
    assert obs["subject"]["reference"] == patient_ref

    bad = {
        **good,
        "entry": [
            good["entry"][0],
            {**good["entry"][1], "resource": {**good["entry"][1]["resource"], "status": "bogus"}},
        ],
    }
    before = c.get("/fhir/R4/Patient", params={"family": "Tx"}, headers=h).json()["total"]
    failed = c.post("/fhir/R4", json=bad, headers=h)
    assert failed.status_code == 400
    after = c.get("/fhir/R4/Patient", params={"family": "Tx"}, headers=h).json()["total"]
    assert after == before  # The first entry was undone too.

    dangling = {**good, "entry": [good["entry"][1]]}
    response = c.post("/fhir/R4", json=dangling, headers=h)
    assert response.status_code == 400
    assert "urn:uuid" in response.json()["issue"][0]["diagnostics"]


def test_batch_entries_succeed_or_fail_alone(world: World) -> None:
    c, h = world.client, world.as_doctor()
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": observation(world.patient_id),
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "resource": {**observation(world.patient_id), "status": "nope"},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    response = c.post("/fhir/R4", json=batch, headers=h)
    assert response.status_code == 200
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert statuses[0].startswith("201")
    assert statuses[1] == "400"


def test_everything_returns_the_compartment(world: World) -> None:
    c, h = world.client, world.as_doctor()
    c.post("/fhir/R4/Observation", json=observation(world.patient_id), headers=h)
    bundle = c.get(f"/fhir/R4/Patient/{world.patient_id}/$everything", headers=h).json()
    types = sorted(e["resource"]["resourceType"] for e in bundle["entry"])
    assert types == ["Observation", "Patient"]
    assert "fhir:patient:everything" in _audit_types(world)


def test_bad_requests_are_clear_4xx(world: World) -> None:
    c, h = world.client, world.as_doctor()
    assert c.get("/fhir/R4/NotAType/1", headers=h).status_code == 400
    assert c.get("/fhir/R4/Patient/has space", headers=h).status_code == 400
    response = c.post("/fhir/R4/Patient", content=b"{not json", headers=h)
    assert response.status_code == 400
    response = c.post(
        "/fhir/R4/Patient", content=b"{}", headers={**h, "Content-Type": "text/plain"}
    )
    assert response.status_code == 415
    response = c.post("/fhir/R4/Observation", json=patient_resource(), headers=h)
    assert response.status_code == 400


def test_bundle_size_limits(world: World) -> None:
    c, h = world.client, world.as_doctor()
    # Larger than the general 1 MiB limit, within the Bundle limit: reaches the FHIR handler.
    padding = "x" * (2 * 1024 * 1024)
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [],
        "id": "b",
        "language": padding,
    }
    response = c.post("/fhir/R4", json=bundle, headers=h)
    assert response.status_code != 413
    limit = world.runtime.settings.fhir_max_bundle_bytes
    huge = b'{"resourceType":"Bundle","type":"batch","entry":[],"x":"' + b"y" * limit + b'"}'
    response = c.post("/fhir/R4", content=huge, headers=h)
    assert response.status_code == 413
    assert response.json()["resourceType"] == "OperationOutcome"
