"""Data at rest: nothing identifying in clear in the raw database, ciphertexts bound to their rows,
KEK rotation keeps everything readable, crypto-shredding makes a patient unreadable.

These tests commit for real (a fresh SQLite file, a fresh PostgreSQL database), because the
question is what an attacker holding the database file or a dump would see.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text, update

from medcollab import migrate
from medcollab.app import create_app
from medcollab.config import Settings
from medcollab.crypto.keys import KeyRing
from medcollab.crypto.passwords import PasswordHasher
from medcollab.db.session import Database, make_engine
from medcollab.kernel.clock import FrozenClock
from medcollab.kernel.permissions import Role
from medcollab.records.models import FhirResourceVersion
from medcollab.runtime import Runtime
from tests.support import postgres
from tests.support.factories import fhir_headers, make_org, make_user, observation, sign_in

# Twenty identifying strings: names in Chinese and English, phones, resident ID numbers, addresses.
SEEDS = [
    ("欧阳", "娜娜", "+86 139 1234 5678", "310101198805120027", "北京市朝阳区建国路88号"),
    ("司马", "光明", "+86 135 8765 4321", "440301197612310018", "广州市天河区体育西路191号"),
    ("Featherstonehaugh", "Ottoline", "+44 20 7946 0958", "QQ123456C", "221B Baker Street"),
    ("Wojciechowski", "Bartholomew", "+1 415 555 0199", "078-05-1120", "1600 Amphitheatre Parkway"),
]
SECRETS = [value for seed in SEEDS for value in seed]


@dataclass
class Committed:
    kind: str
    engine: Engine
    runtime: Runtime
    client: TestClient
    token: str
    url: str
    data_dir: Path


@pytest.fixture(params=["sqlite", "postgresql"])
def committed(
    request: pytest.FixtureRequest, tmp_path: Path, hasher: PasswordHasher
) -> Iterator[Committed]:
    kind: str = request.param
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'raw.db'}"
    else:
        server: postgres.PostgresServer = request.getfixturevalue("postgres_server")
        name = f"raw_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}"
        admin = make_engine(server.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = server.url(name)
    engine = make_engine(url)
    with engine.begin() as connection:
        migrate.upgrade(connection=connection)
    # No background integrator: these tests read the raw database, and a worker thread holding a
    # connection past the client's shutdown would outlive the engine's disposal.
    settings = Settings(
        mode="dev", secret_key="s" * 48, data_dir=tmp_path / "data", audit_integrate_seconds=0
    )
    clock = FrozenClock()
    runtime = Runtime(
        settings=settings,
        database=Database(engine),
        keyring=KeyRing(settings.app_secret()),
        clock=clock,
        hasher=hasher,
    )
    make_org(runtime, "H1")
    doctor = make_user(runtime, "dr.raw", [("H1", Role.PHYSICIAN)])
    with TestClient(create_app(runtime), base_url="https://testserver") as client:
        token = sign_in(client, doctor, clock)
        yield Committed(kind, engine, runtime, client, token, url, tmp_path)
    runtime.close()
    if kind == "postgresql":
        admin = make_engine(server.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _seed(world: Committed) -> list[str]:
    ids = []
    for family, given, phone, identifier, address in SEEDS:
        patient = {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:example:id", "value": identifier}],
            "name": [{"family": family, "given": [given], "text": f"{given} {family}"}],
            "telecom": [{"system": "phone", "value": phone}],
            "address": [{"line": [address]}],
            "birthDate": "1980-01-01",
        }
        response = world.client.post(
            "/fhir/R4/Patient", json=patient, headers=fhir_headers(world.token)
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def _raw_bytes(world: Committed) -> bytes:
    if world.kind == "sqlite":
        world.engine.dispose()
        path = Path(world.url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
    dump = subprocess.run(
        ["pg_dump", "--data-only", "--dbname", world.url.replace("+psycopg", "")],
        capture_output=True,
        check=True,
        timeout=120,
    )
    return dump.stdout


def test_no_identifying_string_in_the_raw_database(committed: Committed) -> None:
    _seed(committed)
    # The search still finds them (blind indexes), so the data is really there.
    found = committed.client.get(
        "/fhir/R4/Patient",
        params={"family": "Wojciechowski"},
        headers=fhir_headers(committed.token),
    ).json()
    assert found["total"] == 1
    raw = _raw_bytes(committed)
    assert len(raw) > 10_000
    leaks = [s for s in SECRETS if s.encode("utf-8") in raw or s.lower().encode("utf-8") in raw]
    assert leaks == []


def test_swapped_ciphertexts_fail_closed(committed: Committed) -> None:
    first, second = _seed(committed)[:2]
    with committed.engine.begin() as conn:
        rows = {
            r.resource_id: r.ciphertext
            for r in conn.execute(
                select(FhirResourceVersion.resource_id, FhirResourceVersion.ciphertext).where(
                    FhirResourceVersion.resource_id.in_([first, second])
                )
            )
        }
        for rid, other in ((first, second), (second, first)):
            conn.execute(
                update(FhirResourceVersion)
                .where(FhirResourceVersion.resource_id == rid)
                .values(ciphertext=rows[other])
            )
    for rid in (first, second):
        response = committed.client.get(
            f"/fhir/R4/Patient/{rid}", headers=fhir_headers(committed.token)
        )
        assert response.status_code == 500
        body = response.json()
        assert body["resourceType"] == "OperationOutcome"
        assert "integrity" in body["issue"][0]["diagnostics"]
        for secret in SECRETS:
            assert secret not in response.text
    with committed.engine.connect() as conn:
        failures = conn.execute(
            text("SELECT count(*) FROM audit_event WHERE type = 'fhir:resource:integrity-failure'")
        ).scalar_one()
    assert failures == 2


def test_kek_rotation_keeps_records_readable(committed: Committed) -> None:
    ids = _seed(committed)
    obs = committed.client.post(
        "/fhir/R4/Observation", json=observation(ids[0]), headers=fhir_headers(committed.token)
    ).json()["id"]
    with committed.runtime.database.unit_of_work() as session:
        report = committed.runtime.key_service(session).rotate_kek()
    assert report.rewrapped >= len(ids)
    for rid in ids:
        assert (
            committed.client.get(
                f"/fhir/R4/Patient/{rid}", headers=fhir_headers(committed.token)
            ).status_code
            == 200
        )
    assert (
        committed.client.get(
            f"/fhir/R4/Observation/{obs}", headers=fhir_headers(committed.token)
        ).status_code
        == 200
    )


def test_crypto_shredding_makes_a_patient_unreadable(committed: Committed) -> None:
    ids = _seed(committed)
    victim, survivor = ids[0], ids[1]
    h = fhir_headers(committed.token)
    obs = committed.client.post("/fhir/R4/Observation", json=observation(victim), headers=h).json()[
        "id"
    ]
    with committed.runtime.database.unit_of_work() as session:
        destroyed = committed.runtime.key_service(session).shred("patient", victim)
    assert destroyed >= 1
    for url in (
        f"/fhir/R4/Patient/{victim}",
        f"/fhir/R4/Observation/{obs}",
        f"/fhir/R4/Patient/{victim}/_history/1",
    ):
        response = committed.client.get(url, headers=h)
        assert response.status_code == 410, (url, response.text)
    assert committed.client.get(f"/fhir/R4/Patient/{survivor}", headers=h).status_code == 200
    # On the raw database: the victim's wrapped keys are gone.
    with committed.engine.connect() as conn:
        remaining = conn.execute(
            text("SELECT count(*) FROM data_key WHERE owner_id = :o AND wrapped IS NOT NULL"),
            {"o": victim},
        ).scalar_one()
    assert remaining == 0
