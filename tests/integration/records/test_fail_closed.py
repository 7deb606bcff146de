"""Fail closed: if the audit event cannot be written, no PHI leaves (503)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.integration.records.conftest import World
from tests.support.factories import observation

_SQLITE_TRIGGER = """
CREATE TRIGGER audit_unwritable BEFORE INSERT ON audit_event
BEGIN SELECT RAISE(ABORT, 'audit store is unwritable'); END
"""
_PG_FUNCTION = """
CREATE FUNCTION audit_unwritable() RETURNS trigger AS $$
BEGIN RAISE EXCEPTION 'audit store is unwritable'; END $$ LANGUAGE plpgsql
"""
_PG_TRIGGER = """
CREATE TRIGGER audit_unwritable BEFORE INSERT ON audit_event
FOR EACH ROW EXECUTE FUNCTION audit_unwritable()
"""


def _break_audit_store(world: World) -> None:
    with world.runtime.database.unit_of_work() as session:
        if session.get_bind().dialect.name == "sqlite":
            session.execute(text(_SQLITE_TRIGGER))
        else:
            session.execute(text(_PG_FUNCTION))
            session.execute(text(_PG_TRIGGER))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/fhir/R4/Observation/{oid}"),
        ("GET", "/fhir/R4/Observation?patient={pid}"),
        ("GET", "/fhir/R4/Patient/{pid}/$everything"),
        ("GET", "/fhir/R4/Observation/{oid}/_history"),
    ],
)
def test_phi_read_answers_503_without_data_when_audit_cannot_be_written(
    world: World, method: str, path: str
) -> None:
    created = world.client.post(
        "/fhir/R4/Observation",
        json=observation(world.patient_id, value=123.25),
        headers=world.as_doctor(),
    )
    oid = created.json()["id"]
    _break_audit_store(world)
    response = world.client.request(
        method, path.format(oid=oid, pid=world.patient_id), headers=world.as_doctor()
    )
    assert response.status_code == 503, response.text
    assert "123.25" not in response.text
    assert "Zhang" not in response.text
    assert response.json()["resourceType"] == "OperationOutcome"
