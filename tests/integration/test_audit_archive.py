"""Retention and archives through the real ``medcollab audit`` commands, on committed databases.

Each test gets its own committed database (a SQLite file, or a PostgreSQL database on the run's
server) copied from a template of twelve events: five recorded in 2014 (head at size 5), four in
2015 (head at 9) and three yesterday (head at 12). The commands run with the wall clock, so the 2014
and 2015 events are past the six-year retention and yesterday's are not. Damage is done as in
tests/integration/test_audit_tamper.py: SQL on a connection of its own, committed, after an archive.
"""

from __future__ import annotations

import base64
import re
import secrets
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import Connection, Engine, Table, delete, insert, select, text, update
from typer.testing import CliRunner, Result

from medcollab import migrate
from medcollab.audit.archive import ArchiveSignatureInvalid, RetentionNotElapsed
from medcollab.audit.checkpoint import key_id
from medcollab.audit.cli import audit_app
from medcollab.audit.events import Agent, AuditEvent, Entity, EventType, Outcome
from medcollab.audit.models import AuditArchive, AuditEventRecord, AuditTreeNode
from medcollab.audit.services import AuditLog, default_origin
from medcollab.audit.verify import AuditLogDamaged, Damage, DamageKind
from medcollab.cli import main as cli_main
from medcollab.config import Settings
from medcollab.crypto.signing import Ed25519Signer, log_key_path
from medcollab.db.session import make_engine
from medcollab.identity.models import OrgKind
from medcollab.identity.services import UserService, operator_agent
from medcollab.kernel.clock import FrozenClock
from medcollab.runtime import Runtime
from tests.conftest import DATABASES

pytestmark = pytest.mark.slow

EVENTS: Table = AuditEventRecord.__table__  # type: ignore[assignment]
NODES: Table = AuditTreeNode.__table__  # type: ignore[assignment]
ARCHIVES: Table = AuditArchive.__table__  # type: ignore[assignment]
SECRET = secrets.token_urlsafe(32)
SEED = secrets.token_bytes(32)
ORIGIN = default_origin(Ed25519Signer.from_seed(SEED).public_key_bytes())
BATCHES = (
    (datetime(2014, 3, 1, 8, 0, tzinfo=UTC), 5),
    (datetime(2015, 3, 1, 8, 0, tzinfo=UTC), 4),
    (datetime.now(UTC) - timedelta(days=1), 3),
)


def _settings(url: str, data_dir: Path) -> Settings:
    return Settings(mode="dev", secret_key=SECRET, data_dir=data_dir, database_url=url, tls=False)


def _event(clock: FrozenClock, number: int) -> AuditEvent:
    clock.advance(timedelta(seconds=1))
    return AuditEvent(
        type=(EventType.LOGIN_SUCCESS, EventType.LOGIN_FAILURE, EventType.FHIR_READ)[number % 3],
        outcome=Outcome.SUCCESS if number % 3 != 1 else Outcome.MINOR_FAILURE,
        recorded_at=clock.now(),
        agent=Agent(user_id=uuid.uuid4(), org_id=uuid.uuid4(), role="physician"),
        subject_user_id=uuid.uuid4() if number % 2 else None,
        reasons=(f"event {number}",),
        entity=Entity(patient_id=f"pt-{number}", resource_type="Observation")
        if number % 3 == 2
        else None,
    )


def _populate(url: str, data_dir: Path) -> None:
    signer = Ed25519Signer.from_seed(SEED)
    runtime = Runtime.from_settings(_settings(url, data_dir))
    number = 1
    try:
        for start, count in BATCHES:
            clock = FrozenClock(start)
            with runtime.database.unit_of_work() as session:
                log = AuditLog(session)
                for _ in range(count):
                    log.append(_event(clock, number))
                    number += 1
            with runtime.database.unit_of_work() as session:
                AuditLog(session, signer=signer, clock=clock).integrate()
    finally:
        runtime.close()


@dataclass
class Template:
    kind: str
    url: str
    name: str


@dataclass
class Deployment:
    kind: str
    url: str
    data_dir: Path
    engine: Engine

    def tamper(self, change: Callable[[Connection], None]) -> None:
        with self.engine.begin() as connection:
            change(connection)

    def leaves(self) -> list[int]:
        with self.engine.connect() as connection:
            return list(
                connection.scalars(
                    select(EVENTS.c.leaf_index)
                    .where(EVENTS.c.leaf_index.is_not(None))
                    .order_by(EVENTS.c.leaf_index)
                )
            )


def _admin(server_url: str) -> Engine:
    return make_engine(server_url, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="module", params=DATABASES)
def template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Template]:
    kind: str = request.param
    data_dir = tmp_path_factory.mktemp(f"archive-template-{kind}")
    if kind == "sqlite":
        url, name = f"sqlite:///{data_dir / 'template.db'}", ""
    else:
        server = request.getfixturevalue("postgres_server")
        name = f"archive_template_{secrets.token_hex(4)}"
        admin = _admin(server.url())
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = server.url(name)
    migrate.upgrade(url)
    _populate(url, data_dir)
    if kind == "sqlite":
        # Fold the write-ahead log into the file, so that copying the file copies everything.
        with closing(sqlite3.connect(data_dir / "template.db")) as raw:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    yield Template(kind, url, name)
    if kind != "sqlite":
        admin = _admin(request.getfixturevalue("postgres_server").url())
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def deployment(
    template: Template,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Iterator[Deployment]:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o700)
    name = ""
    if template.kind == "sqlite":
        path = data_dir / "medcollab.db"
        shutil.copyfile(template.url.removeprefix("sqlite:///"), path)
        url = f"sqlite:///{path}"
    else:
        server = request.getfixturevalue("postgres_server")
        name = f"archive_{secrets.token_hex(6)}"
        admin = _admin(server.url())
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template.name}"'))
        admin.dispose()
        url = server.url(name)
    key = log_key_path(data_dir / "keys")
    key.parent.mkdir(mode=0o700)
    key.write_bytes(SEED)
    key.chmod(0o600)
    for variable in (
        "MEDCOLLAB_DATABASE_URL",
        "MEDCOLLAB_SECRET_KEY_FILE",
        "MEDCOLLAB_KEY_PROVIDER",
        "MEDCOLLAB_AUDIT_RETENTION_DAYS",
        "MEDCOLLAB_JURISDICTION",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MEDCOLLAB_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("MEDCOLLAB_MODE", "dev")
    monkeypatch.setenv("MEDCOLLAB_TLS", "false")
    monkeypatch.setenv("MEDCOLLAB_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MEDCOLLAB_SECRET_KEY", SECRET)
    monkeypatch.setenv("MEDCOLLAB_DATABASE_URL", url)
    engine = make_engine(url)
    try:
        yield Deployment(template.kind, url, data_dir, engine)
    finally:
        engine.dispose()
        if template.kind != "sqlite":
            admin = _admin(request.getfixturevalue("postgres_server").url())
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            admin.dispose()


@pytest.fixture
def medcollab(monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    """``medcollab`` as installed: the entry point, with ``audit`` registered."""
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.add_typer(audit_app, name="audit")
    monkeypatch.setattr(cli_main, "app", app)
    return lambda *args: cli_main.main(list(args))


def audit(*args: str) -> Result:
    return CliRunner().invoke(audit_app, list(args))


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def expect(result: Result, kind: DamageKind) -> Damage:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, AuditLogDamaged), repr(result.exception)
    damage = result.exception.report.first
    assert damage is not None
    assert damage.kind is kind, damage.describe()
    assert damage.describe() in result.output
    return damage


@pytest.fixture
def archived(deployment: Deployment, tmp_path: Path) -> Path:
    """The 2014 events archived: leaves 0..4."""
    out = tmp_path / "audit-2014.mcaudit.gz"
    output = ok(audit("archive", "--before", "2015-01-01", "--out", str(out)))
    assert "archived 5 events" in output
    return out


# Archiving and verifying --------------------------------------------------------------------------


def test_archive_a_prefix_and_verify_both_parts(
    deployment: Deployment, archived: Path, tmp_path: Path
) -> None:
    assert archived.stat().st_mode & 0o777 == 0o600
    # The archived events' rows are gone from the live database; their leaves are not.
    assert deployment.leaves() == list(range(5, 12))
    with deployment.engine.connect() as connection:
        assert connection.scalar(select(EVENTS.c.body).where(EVENTS.c.seq <= 5)) is None
        leaves = connection.scalars(select(NODES.c.idx).where(NODES.c.level == 0)).all()
        assert sorted(leaves) == list(range(12))
        record = connection.execute(select(ARCHIVES)).mappings().one()
    assert (record["first_leaf"], record["end_leaf"]) == (0, 5)

    output = ok(audit("verify"))
    assert "events       12 (12 in the tree, 5 of them archived)" in output
    assert "archived     5 events archived (leaves 0..4) in audit-2014.mcaudit.gz" in output
    assert "result       intact" in output

    output = ok(audit("verify-archive", str(archived)))
    assert f"signature    valid: signed by the log key {ORIGIN}" in output
    assert "archive      5 events archived (leaves 0..4) in audit-2014.mcaudit.gz" in output
    assert "sequence     seq 1..5" in output
    assert "recorded     2014-03-01T08:00:01+00:00 .. 2014-03-01T08:00:05+00:00" in output
    assert f"sha256       {record['file_sha256'].hex()}" in output
    output = ok(audit("verify-archive", str(archived), "--against-live"))
    assert "live log     recorded; consistent with the live signed head at size 12" in output

    # Someone with only the file and the log's verifier key can check it too.
    exported = tmp_path / "witness.cp"
    printed = ok(audit("checkpoint", "--out", str(exported)))
    found = re.search(r"verifier key (\S+)", printed)
    assert found is not None
    output = ok(audit("verify-archive", str(archived), "--verifier-key", found.group(1)))
    assert "result       intact" in output


def test_archiving_twice_continues_from_the_previous_archive(
    deployment: Deployment, archived: Path, tmp_path: Path
) -> None:
    second = tmp_path / "audit-2015.mcaudit.gz"
    output = ok(audit("archive", "--before", "2016-01-01", "--out", str(second)))
    assert "5..8" in output
    assert deployment.leaves() == list(range(9, 12))
    output = ok(audit("verify"))
    assert "archived     5 events archived (leaves 0..4) in audit-2014.mcaudit.gz" in output
    assert "archived     4 events archived (leaves 5..8) in audit-2015.mcaudit.gz" in output
    assert "consistent with the live signed head at size 12" in ok(
        audit("verify-archive", str(second), "--against-live")
    )
    # Nothing old is left: the command says so and succeeds, writing nothing.
    third = tmp_path / "audit-2016.mcaudit.gz"
    output = ok(audit("archive", "--before", "2016-06-01", "--out", str(third)))
    assert "nothing to archive: the live log starts at leaf 9" in output
    assert not third.exists()


def test_archiving_in_bounded_steps(deployment: Deployment, tmp_path: Path) -> None:
    for step, expected in enumerate(("leaves 0..3", "leaves 4..7", "leaves 8..8")):
        out = tmp_path / f"step-{step}.gz"
        output = ok(
            audit("archive", "--before", "2016-01-01", "--out", str(out), "--max-events", "4")
        )
        assert expected in output
    assert deployment.leaves() == list(range(9, 12))
    assert "9 of them archived" in ok(audit("verify"))


def test_a_dry_run(deployment: Deployment, tmp_path: Path) -> None:
    out = tmp_path / "dry.gz"
    output = ok(audit("archive", "--before", "2016-01-01", "--out", str(out), "--dry-run"))
    assert "9 events (leaves 0..8), not written (dry run)" in output
    assert "would archive 9 events" in output
    assert not out.exists()
    assert deployment.leaves() == list(range(12))


def test_a_flipped_byte_in_the_archive(
    archived: Path, medcollab: Callable[..., int], capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(archived.read_bytes())
    data[len(data) // 2] ^= 0x40
    archived.write_bytes(bytes(data))
    capsys.readouterr()
    assert medcollab("audit", "verify-archive", str(archived)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {archived.name}: the archive's signature does not cover")
    assert "changed after it was signed" in err
    assert err.count("\n") == 1
    assert isinstance(audit("verify-archive", str(archived)).exception, ArchiveSignatureInvalid)


# Retention ----------------------------------------------------------------------------------------


def test_a_cutoff_inside_the_retention_period_is_refused(
    deployment: Deployment,
    medcollab: Callable[..., int],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    out = tmp_path / "too-soon.gz"
    too_soon = (datetime.now(UTC) - timedelta(days=365)).date().isoformat()
    assert medcollab("audit", "archive", "--before", too_soon, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: refusing to archive events recorded before {too_soon}")
    assert "2,192 days" in err
    assert "PIPL Art. 56; Cybersecurity Law Art. 21(3)" in err
    assert not out.exists()
    assert deployment.leaves() == list(range(12))
    assert isinstance(
        audit("archive", "--before", too_soon, "--out", str(out)).exception, RetentionNotElapsed
    )


@pytest.mark.parametrize(
    ("jurisdiction", "source"),
    [
        ("PIPL", "PIPL: PIPL Art. 56; Cybersecurity Law Art. 21(3)"),
        ("HIPAA", "HIPAA: 45 CFR 164.316(b)(2)(i); 45 CFR 164.530(j)(2)"),
    ],
)
def test_a_retention_setting_below_the_legal_minimum_is_refused(
    deployment: Deployment,
    medcollab: Callable[..., int],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    jurisdiction: str,
    source: str,
) -> None:
    monkeypatch.setenv("MEDCOLLAB_JURISDICTION", jurisdiction)
    monkeypatch.setenv("MEDCOLLAB_AUDIT_RETENTION_DAYS", "400")
    out = tmp_path / "a.gz"
    assert medcollab("audit", "archive", "--before", "2015-01-01", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: audit_retention_days = 400 is below the legal minimum")
    assert source in err
    assert "MEDCOLLAB_AUDIT_RETENTION_DAYS" in err
    assert not out.exists()


def test_an_organisation_under_a_stricter_profile_governs_the_log(
    deployment: Deployment,
    medcollab: Callable[..., int],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # PIPL allows three years; a HIPAA organisation in the same deployment needs six.
    monkeypatch.setenv("MEDCOLLAB_AUDIT_RETENTION_DAYS", str(4 * 366))
    out = tmp_path / "a.gz"
    assert "would archive 5 events" in ok(
        audit("archive", "--before", "2015-01-01", "--out", str(out), "--dry-run")
    )
    runtime = Runtime.from_settings(_settings(deployment.url, deployment.data_dir))
    try:
        with runtime.database.unit_of_work() as session:
            UserService(session=session, runtime=runtime).create_org(
                code="US-1",
                name="A US hospital",
                kind=OrgKind.HOSPITAL,
                region="US",
                jurisdiction="HIPAA",
                agent=operator_agent(),
            )
    finally:
        runtime.close()
    assert medcollab("audit", "archive", "--before", "2015-01-01", "--out", str(out)) == 2
    assert "HIPAA: 45 CFR 164.316(b)(2)(i)" in capsys.readouterr().err


# The live log after an archive, under attack ------------------------------------------------------


def _body(connection: Connection, seq: int) -> dict[str, Any]:
    body = connection.scalar(select(EVENTS.c.body).where(EVENTS.c.seq == seq))
    assert isinstance(body, dict)
    return body


def _copy_of(connection: Connection, seq: int, **changes: Any) -> dict[str, Any]:
    row = connection.execute(select(EVENTS).where(EVENTS.c.seq == seq)).mappings().one()
    values = {k: v for k, v in row.items() if k != "seq"}
    body = {**row["body"], "reasons": ["forged"]}
    values.update(body=body, **changes)
    return values


def _modify(connection: Connection) -> None:
    body = _body(connection, 7)
    body["reasons"] = ["nothing happened"]
    connection.execute(update(EVENTS).where(EVENTS.c.seq == 7).values(body=body))


def _modify_column(connection: Connection) -> None:
    connection.execute(update(EVENTS).where(EVENTS.c.seq == 8).values(outcome="8"))


def _delete(connection: Connection) -> None:
    connection.execute(delete(EVENTS).where(EVENTS.c.seq == 8))


def _delete_first_live(connection: Connection) -> None:
    connection.execute(delete(EVENTS).where(EVENTS.c.seq == 6))


def _swap(connection: Connection) -> None:
    connection.execute(update(EVENTS).where(EVENTS.c.seq == 7).values(leaf_index=1_000_000))
    connection.execute(update(EVENTS).where(EVENTS.c.seq == 8).values(leaf_index=6))
    connection.execute(update(EVENTS).where(EVENTS.c.seq == 7).values(leaf_index=7))


def _truncate(connection: Connection) -> None:
    connection.execute(delete(EVENTS).where(EVENTS.c.seq >= 11))


def _forge_into_history(connection: Connection) -> None:
    for seq in range(12, 7, -1):  # Make room at leaf 7, from the end backwards.
        connection.execute(
            update(EVENTS).where(EVENTS.c.seq == seq).values(leaf_index=EVENTS.c.leaf_index + 1)
        )
    connection.execute(insert(EVENTS).values(_copy_of(connection, 7, leaf_index=7)))


def _forge_at_the_end(connection: Connection) -> None:
    connection.execute(insert(EVENTS).values(_copy_of(connection, 7, leaf_index=12)))


def _forge_behind_the_integrator(connection: Connection) -> None:
    moment = datetime(2015, 3, 2, tzinfo=UTC)
    values = _copy_of(connection, 7, leaf_index=None, recorded_at=moment)
    values["body"]["recorded"] = moment.isoformat()
    connection.execute(insert(EVENTS).values(values))


@pytest.mark.parametrize(
    ("change", "kind", "where"),
    [
        (_modify, DamageKind.MODIFIED, "at seq 7 (leaf 6)"),
        (_modify_column, DamageKind.MODIFIED, "at seq 8 (leaf 7)"),
        (_delete, DamageKind.MISSING, "at leaf 7"),
        (_delete_first_live, DamageKind.MISSING, "the live log starts at leaf 6, not 5"),
        (_swap, DamageKind.REORDERED, "at seq 8 (leaf 6)"),
        (_truncate, DamageKind.TRUNCATED, "at leaf 10"),
        (_forge_into_history, DamageKind.FORGED, "(leaf 7)"),
        (_forge_at_the_end, DamageKind.FORGED, "(leaf 12)"),
        (_forge_behind_the_integrator, DamageKind.FORGED, "not in the tree"),
    ],
)
def test_tampering_with_the_live_part_after_an_archive(
    deployment: Deployment,
    archived: Path,
    change: Callable[[Connection], None],
    kind: DamageKind,
    where: str,
) -> None:
    deployment.tamper(change)
    damage = expect(audit("verify"), kind)
    assert where in damage.describe()


def test_a_deleted_archive_record(deployment: Deployment, archived: Path) -> None:
    deployment.tamper(lambda c: c.execute(delete(ARCHIVES)))
    damage = expect(audit("verify"), DamageKind.MISSING)
    assert "the live log starts at leaf 5, not 0: 5 event(s) were removed" in damage.detail


def test_a_claimed_archive_that_does_not_exist(deployment: Deployment, archived: Path) -> None:
    # Events 6 to 8 are deleted and a fake archive record claims them, signed by the intruder.
    intruder = Ed25519Signer.generate()

    def change(connection: Connection) -> None:
        connection.execute(delete(EVENTS).where(EVENTS.c.seq.in_([6, 7, 8])))
        real = connection.execute(select(ARCHIVES)).mappings().one()
        statement = real["statement"]
        text_ = statement[: statement.rindex("\n\n") + 1].replace("leaves 0 5", "leaves 5 8")
        blob = key_id(ORIGIN, intruder.public_key_bytes()) + intruder.sign(text_.encode())
        connection.execute(
            insert(ARCHIVES).values(
                first_leaf=5,
                end_leaf=8,
                file_name="nowhere.gz",
                file_sha256=bytes(32),
                created_at=real["created_at"],
                checkpoint=real["checkpoint"],
                statement=f"{text_}\n\u2014 {ORIGIN} {base64.b64encode(blob).decode()}\n",
            )
        )

    deployment.tamper(change)
    result = audit("verify")
    damage = expect(result, DamageKind.FORGED)
    assert damage.archive_id is not None
    assert "nowhere.gz) is not signed by the log key: the log never made it" in damage.detail
    assert isinstance(result.exception, AuditLogDamaged)
    assert DamageKind.MISSING in {d.kind for d in result.exception.report.damages}


def test_deleted_tree_nodes_of_the_archived_range(deployment: Deployment, archived: Path) -> None:
    deployment.tamper(lambda c: c.execute(delete(NODES).where(NODES.c.level == 0, NODES.c.idx < 5)))
    damage = expect(audit("verify"), DamageKind.MISSING)
    assert "stored leaf hash of archived leaf 0 was removed" in damage.detail


def test_a_damaged_log_is_not_archived(
    deployment: Deployment,
    medcollab: Callable[..., int],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    deployment.tamper(_modify)
    out = tmp_path / "a.gz"
    capsys.readouterr()
    assert medcollab("audit", "archive", "--before", "2016-01-01", "--out", str(out)) == 2
    assert "error: the audit log is damaged: modified at seq 7 (leaf 6)" in capsys.readouterr().err
    assert not out.exists()
    assert deployment.leaves() == list(range(12))


def test_an_archive_of_another_log_state_is_not_linked(
    deployment: Deployment, archived: Path, tmp_path: Path
) -> None:
    # The archive record is dropped from the live log (as by a restored backup): the file still
    # verifies on its own, but not against the live log.
    deployment.tamper(lambda c: c.execute(delete(ARCHIVES)))
    assert "result       intact" in ok(audit("verify-archive", str(archived)))
    result = audit("verify-archive", str(archived), "--against-live")
    assert result.exit_code != 0
    assert "the live log has no record of an archive of leaves 0..4" in str(result.exception)
