"""Test fixtures: every database-backed test runs against SQLite *and* a real PostgreSQL server.

The PostgreSQL server is started once per run (tests/support/postgres.py). Each test runs inside one
outer transaction that is rolled back afterwards; the application's own commits become savepoint
releases, so tests never see each other's rows. ``MEDCOLLAB_TEST_DATABASES=sqlite`` narrows a local run;
``make test`` always runs both, and the summary says which databases were exercised.
"""

from __future__ import annotations

import os
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from medcollab import migrate
from medcollab.app import create_app
from medcollab.config import Settings
from medcollab.crypto.keys import KeyRing
from medcollab.crypto.passwords import PasswordHasher
from medcollab.db.session import Database, make_engine
from medcollab.kernel.clock import FrozenClock
from medcollab.runtime import Runtime
from tests.support import postgres

ALL_DATABASES = ("sqlite", "postgresql")
DATABASES = tuple(
    d.strip()
    for d in os.environ.get("MEDCOLLAB_TEST_DATABASES", ",".join(ALL_DATABASES)).split(",")
    if d.strip()
)
_unknown = set(DATABASES) - set(ALL_DATABASES)
if _unknown:
    raise pytest.UsageError(f"MEDCOLLAB_TEST_DATABASES names unknown databases: {sorted(_unknown)}")

_exercised: Counter[str] = Counter()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    try:
        server = postgres.start()
    except postgres.PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL could not be started: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def _postgres_engine(server: postgres.PostgresServer, name: str) -> Engine:
    admin = make_engine(server.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_engine(server.url(name))


@pytest.fixture(scope="session")
def engines(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, Engine]]:
    """One migrated engine per database kind, created lazily so SQLite-only runs need no server."""
    made: dict[str, Engine] = {}

    class _Lazy(dict[str, Engine]):
        def __missing__(self, kind: str) -> Engine:
            if kind == "sqlite":
                path = tmp_path_factory.mktemp("sqlite") / "medcollab.db"
                engine = make_engine(f"sqlite:///{path}")
            else:
                server = request.getfixturevalue("postgres_server")
                engine = _postgres_engine(server, "medcollab_test")
            with engine.begin() as conn:
                migrate.upgrade(connection=conn)
            made[kind] = engine
            self[kind] = engine
            return engine

    yield _Lazy()
    for engine in made.values():
        engine.dispose()


@pytest.fixture(params=DATABASES)
def db_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def database(engines: dict[str, Engine], db_kind: str) -> Iterator[Database]:
    engine = engines[db_kind]
    connection = engine.connect()
    outer = connection.begin()
    try:
        yield Database(engine, bind=connection)
    finally:
        outer.rollback()
        connection.close()


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture(scope="session")
def hasher() -> PasswordHasher:
    # The production parameters: the tests exercise exactly what deployments run.
    return PasswordHasher()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # No background integrator: it would share the test's single connection from another thread.
    # Tests integrate explicitly.
    return Settings(
        mode="dev",
        secret_key=secrets.token_urlsafe(32),
        data_dir=tmp_path,
        audit_integrate_seconds=0,
    )


@pytest.fixture
def runtime(
    settings: Settings, database: Database, clock: FrozenClock, hasher: PasswordHasher
) -> Runtime:
    return Runtime(
        settings=settings,
        database=database,
        keyring=KeyRing(settings.app_secret()),
        clock=clock,
        hasher=hasher,
    )


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(
        create_app(runtime), base_url="https://testserver", raise_server_exceptions=False
    ) as test_client:
        yield test_client


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        for kind in ALL_DATABASES:
            if (
                f"[{kind}" in report.nodeid
                or f"-{kind}]" in report.nodeid
                or (f"-{kind}-" in report.nodeid)
            ):
                _exercised[kind] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    parts = [f"{kind}: {_exercised.get(kind, 0)} tests passed" for kind in ALL_DATABASES]
    terminalreporter.write_sep("=", "databases exercised: " + ", ".join(parts))
    missing = [k for k in ALL_DATABASES if k not in DATABASES]
    if missing:
        terminalreporter.write_line(
            f"NOTE: {', '.join(missing)} excluded by MEDCOLLAB_TEST_DATABASES", yellow=True
        )
