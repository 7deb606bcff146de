"""Damage to the audit log's database is detected by ``medcollab audit verify``.

Each test gets its own committed database (a fresh SQLite file, or a PostgreSQL database on the run's
server), copied from a template that holds twelve events in three integrations, with signed tree
heads at sizes 5, 9 and 12. The damage is done the way an intruder with database access would do
it: SQL statements on a separate connection. The check runs the real command, through Typer, with
the deployment's configuration in the environment.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer
from sqlalchemy import Connection, Engine, Table, delete, insert, select, text, update
from typer.testing import CliRunner, Result

from medcollab import migrate
from medcollab.audit.checkpoint import Checkpoint, parse_checkpoint, sign_checkpoint
from medcollab.audit.cli import audit_app
from medcollab.audit.events import Agent, AuditEvent, Entity, EventType, Outcome
from medcollab.audit.merkle import CompactRange
from medcollab.audit.models import AuditEventRecord, AuditTreeHead, AuditTreeNode
from medcollab.audit.services import AuditLog, default_origin, event_leaf_hash
from medcollab.audit.verify import AuditLogDamaged, CheckpointRejected, Damage, DamageKind
from medcollab.cli import main as cli_main
from medcollab.config import Settings
from medcollab.crypto.signing import Ed25519Signer, log_key_path
from medcollab.db.session import make_engine
from medcollab.kernel.clock import FrozenClock
from medcollab.runtime import Runtime
from tests.conftest import DATABASES

pytestmark = pytest.mark.slow

EVENTS: Table = AuditEventRecord.__table__  # type: ignore[assignment]
NODES: Table = AuditTreeNode.__table__  # type: ignore[assignment]
HEADS: Table = AuditTreeHead.__table__  # type: ignore[assignment]
SECRET = secrets.token_urlsafe(32)
SEED = secrets.token_bytes(32)
START = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
BATCHES = (5, 4, 3)
ROOT = Path(__file__).resolve().parents[2]


# Deployments --------------------------------------------------------------------------------------


def _settings(url: str, data_dir: Path) -> Settings:
    return Settings(mode="dev", secret_key=SECRET, data_dir=data_dir, database_url=url, tls=False)


def _event(clock: FrozenClock, number: int) -> AuditEvent:
    clock.advance(timedelta(seconds=1))
    kinds = (EventType.LOGIN_SUCCESS, EventType.LOGIN_FAILURE, EventType.FHIR_READ)
    return AuditEvent(
        type=kinds[number % 3],
        outcome=Outcome.SUCCESS if number % 3 != 1 else Outcome.MINOR_FAILURE,
        recorded_at=clock.now(),
        agent=Agent(user_id=uuid.uuid4(), org_id=uuid.uuid4(), role="physician"),
        subject_user_id=uuid.uuid4() if number % 2 else None,
        reasons=(f"event {number}",),
        entity=Entity(patient_id=f"pt-{number}", resource_type="Observation")
        if number % 3 == 2
        else None,
        purpose="TREAT",
    )


def append_and_integrate(
    url: str, data_dir: Path, batches: tuple[int, ...], clock: FrozenClock, first: int = 1
) -> None:
    runtime = Runtime.from_settings(_settings(url, data_dir), clock=clock)
    signer = Ed25519Signer.from_seed(SEED)
    number = first
    try:
        for batch in batches:
            with runtime.database.unit_of_work() as session:
                log = AuditLog(session)
                for _ in range(batch):
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
        """Apply ``change`` on a connection of its own, as an intruder would, and commit it."""
        with self.engine.begin() as connection:
            change(connection)

    def append(self, count: int, first: int) -> None:
        clock = FrozenClock(START + timedelta(hours=1))
        append_and_integrate(self.url, self.data_dir, (count,), clock, first=first)


@pytest.fixture(scope="module", params=DATABASES)
def template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Template]:
    kind: str = request.param
    data_dir = tmp_path_factory.mktemp(f"audit-template-{kind}")
    if kind == "sqlite":
        url = f"sqlite:///{data_dir / 'template.db'}"
        name = ""
    else:
        server = request.getfixturevalue("postgres_server")
        name = f"audit_template_{secrets.token_hex(4)}"
        admin = make_engine(server.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = server.url(name)
    migrate.upgrade(url)
    append_and_integrate(url, data_dir, BATCHES, FrozenClock(START))
    if kind == "sqlite":
        # Fold the write-ahead log into the file, so that copying the file copies everything.
        with closing(sqlite3.connect(data_dir / "template.db")) as raw:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    yield Template(kind, url, name)
    if kind != "sqlite":
        admin = make_engine(
            request.getfixturevalue("postgres_server").url(), isolation_level="AUTOCOMMIT"
        )
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
    if template.kind == "sqlite":
        path = data_dir / "medcollab.db"
        shutil.copyfile(template.url.removeprefix("sqlite:///"), path)
        url = f"sqlite:///{path}"
    else:
        server = request.getfixturevalue("postgres_server")
        name = f"audit_{secrets.token_hex(6)}"
        admin = make_engine(server.url(), isolation_level="AUTOCOMMIT")
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
            admin = make_engine(
                request.getfixturevalue("postgres_server").url(), isolation_level="AUTOCOMMIT"
            )
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            admin.dispose()


# Running the command ------------------------------------------------------------------------------


def audit(*args: str) -> Result:
    return CliRunner().invoke(audit_app, list(args))


def first_damage(result: Result) -> Damage:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, AuditLogDamaged), repr(result.exception)
    assert "DAMAGED" in result.output
    damage = result.exception.report.first
    assert damage is not None
    assert damage.describe() in result.output
    return damage


def expect(
    result: Result, kind: DamageKind, *, seq: int | None = None, leaf: int | None = None
) -> Damage:
    damage = first_damage(result)
    assert damage.kind is kind, damage.describe()
    if seq is not None:
        assert damage.seq == seq, damage.describe()
    if leaf is not None:
        assert damage.leaf_index == leaf, damage.describe()
    return damage


def body_of(connection: Connection, seq: int) -> dict[str, Any]:
    body = connection.scalar(select(EVENTS.c.body).where(EVENTS.c.seq == seq))
    assert isinstance(body, dict)
    return body


def rebuild_tree(connection: Connection) -> None:
    """What a careful intruder does after editing events: recompute every stored tree node."""
    rows = connection.execute(
        select(EVENTS.c.seq, EVENTS.c.body)
        .where(EVENTS.c.leaf_index.is_not(None))
        .order_by(EVENTS.c.leaf_index)
    ).all()
    compact = CompactRange()
    nodes = []
    for seq, body in rows:
        for (level, idx), node in compact.append(event_leaf_hash(seq, body)):
            nodes.append({"level": level, "idx": idx, "hash": node})
    connection.execute(delete(NODES))
    connection.execute(insert(NODES), nodes)


def roll_back_to(connection: Connection, size: int) -> None:
    """Make the database look as it did at ``size`` events: a restored old backup."""
    connection.execute(delete(EVENTS).where(EVENTS.c.leaf_index >= size))
    for level, idx in connection.execute(select(NODES.c.level, NODES.c.idx)).all():
        if (idx + 1) << level > size:
            connection.execute(delete(NODES).where(NODES.c.level == level, NODES.c.idx == idx))
    connection.execute(delete(HEADS).where(HEADS.c.tree_size > size))


# The intact log -----------------------------------------------------------------------------------


def test_an_intact_log_verifies(deployment: Deployment, tmp_path: Path) -> None:
    result = audit("verify")
    assert result.exit_code == 0, result.output
    assert "events       12 (12 in the tree)" in result.output
    assert "tree heads   3 signed; the latest covers 12 events" in result.output
    assert "time " in result.output
    assert "result       intact" in result.output

    exported = tmp_path / "witness.checkpoint"
    result = audit("checkpoint", "--out", str(exported))
    assert result.exit_code == 0, result.output
    checkpoint = parse_checkpoint(exported.read_text(encoding="utf-8")).checkpoint
    assert checkpoint.size == 12
    assert checkpoint.origin == default_origin(Ed25519Signer.from_seed(SEED).public_key_bytes())
    assert "verifier key " + checkpoint.origin in result.output

    deployment.append(3, first=100)
    result = audit("verify", "--against", str(exported))
    assert result.exit_code == 0, result.output
    assert "checkpoints  1 outside checkpoint(s) checked" in result.output


# Damaged events -----------------------------------------------------------------------------------


def test_a_modified_field_in_the_body(deployment: Deployment) -> None:
    def change(connection: Connection) -> None:
        body = body_of(connection, 6)
        body["reasons"] = ["nothing happened"]
        connection.execute(update(EVENTS).where(EVENTS.c.seq == 6).values(body=body))

    deployment.tamper(change)
    expect(audit("verify"), DamageKind.MODIFIED, seq=6, leaf=5)


def test_a_modified_column(deployment: Deployment) -> None:
    deployment.tamper(
        lambda c: c.execute(update(EVENTS).where(EVENTS.c.seq == 3).values(outcome="8"))
    )
    damage = expect(audit("verify"), DamageKind.MODIFIED, seq=3, leaf=2)
    assert "outcome" in damage.detail


def test_a_modified_event_with_the_tree_recomputed_to_match(deployment: Deployment) -> None:
    def change(connection: Connection) -> None:
        body = body_of(connection, 6)
        body["agent"]["role"] = "auditor"
        connection.execute(update(EVENTS).where(EVENTS.c.seq == 6).values(body=body))
        rebuild_tree(connection)

    deployment.tamper(change)
    # Only the signed head at size 9 can tell now; the damage lies after the intact head at size 5,
    # whose first event is seq 6.
    damage = expect(audit("verify"), DamageKind.MODIFIED, seq=6, leaf=5)
    assert "signed tree head" in damage.detail


def test_a_deleted_row(deployment: Deployment) -> None:
    deployment.tamper(lambda c: c.execute(delete(EVENTS).where(EVENTS.c.seq == 7)))
    damage = expect(audit("verify"), DamageKind.MISSING, leaf=6)
    assert "after seq 6" in damage.detail


def test_a_deleted_row_with_the_rest_renumbered(deployment: Deployment) -> None:
    def change(connection: Connection) -> None:
        connection.execute(delete(EVENTS).where(EVENTS.c.seq == 7))
        for seq in range(8, 13):
            connection.execute(
                update(EVENTS).where(EVENTS.c.seq == seq).values(leaf_index=EVENTS.c.leaf_index - 1)
            )

    deployment.tamper(change)
    expect(audit("verify"), DamageKind.MISSING, leaf=6)


def _swap(connection: Connection, column: str, a: int, b: int) -> None:
    # Through a value nobody uses, since both columns are unique.
    col = EVENTS.c[column]
    connection.execute(update(EVENTS).where(EVENTS.c.seq == a).values({column: 1_000_000}))
    connection.execute(update(EVENTS).where(col == b).values({column: a}))
    connection.execute(update(EVENTS).where(col == 1_000_000).values({column: b}))


def test_two_rows_swapped_in_the_log_order(deployment: Deployment) -> None:
    def change(connection: Connection) -> None:
        connection.execute(update(EVENTS).where(EVENTS.c.seq == 4).values(leaf_index=1_000_000))
        connection.execute(update(EVENTS).where(EVENTS.c.seq == 5).values(leaf_index=3))
        connection.execute(update(EVENTS).where(EVENTS.c.seq == 4).values(leaf_index=4))

    deployment.tamper(change)
    expect(audit("verify"), DamageKind.REORDERED, seq=5, leaf=3)


def test_two_rows_swapped_sequence_numbers(deployment: Deployment) -> None:
    deployment.tamper(lambda c: _swap(c, "seq", 4, 5))
    expect(audit("verify"), DamageKind.REORDERED, leaf=3)


def test_two_rows_swapped_contents(deployment: Deployment) -> None:
    columns = ("recorded_at", "type", "action", "outcome", "agent_user_id", "agent_org_id")
    columns += ("subject_user_id", "body")

    def change(connection: Connection) -> None:
        rows = {
            seq: connection.execute(
                select(*(EVENTS.c[c] for c in columns)).where(EVENTS.c.seq == seq)
            ).one()
            for seq in (4, 5)
        }
        for seq, other in ((4, 5), (5, 4)):
            values = dict(zip(columns, rows[other], strict=True))
            connection.execute(update(EVENTS).where(EVENTS.c.seq == seq).values(values))

    deployment.tamper(change)
    expect(audit("verify"), DamageKind.REORDERED, seq=4, leaf=3)


def test_a_truncated_tail(deployment: Deployment) -> None:
    deployment.tamper(lambda c: c.execute(delete(EVENTS).where(EVENTS.c.seq >= 10)))
    damage = expect(audit("verify"), DamageKind.TRUNCATED, leaf=9)
    assert "last remaining event is seq 9" in damage.detail


def test_a_truncated_tail_with_the_tree_cut_to_match(deployment: Deployment) -> None:
    def change(connection: Connection) -> None:
        connection.execute(delete(EVENTS).where(EVENTS.c.seq >= 10))
        rebuild_tree(connection)

    deployment.tamper(change)
    damage = expect(audit("verify"), DamageKind.TRUNCATED, leaf=9)
    assert "covers 12 events but only 9 remain" in damage.detail


def _forged_values(
    connection: Connection, *, leaf_index: int | None, recorded_at: datetime
) -> dict[str, Any]:
    body = body_of(connection, 5)
    body["reasons"] = ["forged"]
    body["recorded"] = recorded_at.isoformat()
    row = connection.execute(select(EVENTS).where(EVENTS.c.seq == 5)).mappings().one()
    values = {k: v for k, v in row.items() if k != "seq"}
    values.update(body=body, leaf_index=leaf_index, recorded_at=recorded_at)
    return values


def test_a_forged_row_inserted_into_history(deployment: Deployment) -> None:
    def change(connection: Connection) -> None:
        for seq in range(12, 4, -1):  # Make room at leaf 4, from the end backwards.
            connection.execute(
                update(EVENTS).where(EVENTS.c.seq == seq).values(leaf_index=EVENTS.c.leaf_index + 1)
            )
        moment = START + timedelta(seconds=5)
        connection.execute(
            insert(EVENTS).values(_forged_values(connection, leaf_index=4, recorded_at=moment))
        )

    deployment.tamper(change)
    damage = expect(audit("verify"), DamageKind.FORGED, seq=13, leaf=4)
    assert "never logged" in damage.detail


def test_a_forged_row_appended_to_the_tree(deployment: Deployment) -> None:
    def change(connection: Connection) -> None:
        moment = START + timedelta(minutes=5)
        connection.execute(
            insert(EVENTS).values(_forged_values(connection, leaf_index=12, recorded_at=moment))
        )

    deployment.tamper(change)
    expect(audit("verify"), DamageKind.FORGED, seq=13, leaf=12)


def test_a_backdated_row_slipped_in_behind_the_integrator(deployment: Deployment) -> None:
    def change(connection: Connection) -> None:
        moment = START - timedelta(days=2)
        connection.execute(
            insert(EVENTS).values(_forged_values(connection, leaf_index=None, recorded_at=moment))
        )

    deployment.tamper(change)
    damage = expect(audit("verify"), DamageKind.FORGED, seq=13)
    assert "not in the tree" in damage.detail


# Damaged tree heads -------------------------------------------------------------------------------


def test_a_tree_head_re_signed_with_another_key(deployment: Deployment) -> None:
    # The intruder edits an event and re-signs the head over the new root with a key of their own.
    intruder = Ed25519Signer.generate()
    origin = default_origin(Ed25519Signer.from_seed(SEED).public_key_bytes())

    def change(connection: Connection) -> None:
        body = body_of(connection, 11)
        body["outcome"] = "0"
        connection.execute(update(EVENTS).where(EVENTS.c.seq == 11).values(body=body, outcome="0"))
        rebuild_tree(connection)
        rows = connection.execute(
            select(EVENTS.c.seq, EVENTS.c.body).order_by(EVENTS.c.leaf_index)
        ).all()
        compact = CompactRange()
        for seq, b in rows:
            compact.append(event_leaf_hash(seq, b))
        head = connection.execute(select(HEADS).where(HEADS.c.tree_size == 12)).mappings().one()
        forged = sign_checkpoint(
            Checkpoint(origin, 12, compact.root(), head["issued_at"]), intruder
        )
        connection.execute(
            update(HEADS)
            .where(HEADS.c.id == head["id"])
            .values(note=forged.note, root_hash=compact.root())
        )

    deployment.tamper(change)
    result = audit("verify")
    damage = expect(result, DamageKind.BAD_SIGNATURE)
    assert damage.head_id == 3
    assert "not signed by the log key" in damage.detail
    # The edited event lies after the last head that still verifies (size 9) and the stored tree
    # was rebuilt to match it, so the forged head is the evidence, and it is enough.
    assert isinstance(result.exception, AuditLogDamaged)
    assert [d.kind for d in result.exception.report.damages] == [DamageKind.BAD_SIGNATURE]


def test_tree_head_columns_changed_behind_its_signature(deployment: Deployment) -> None:
    deployment.tamper(
        lambda c: c.execute(update(HEADS).where(HEADS.c.tree_size == 9).values(tree_size=10))
    )
    damage = expect(audit("verify"), DamageKind.MODIFIED)
    assert damage.head_id == 2


# Rollback, caught against a checkpoint exported before -------------------------------------------


def test_a_log_rolled_back_to_an_earlier_state(deployment: Deployment, tmp_path: Path) -> None:
    exported = tmp_path / "witness.checkpoint"
    assert audit("checkpoint", "--out", str(exported)).exit_code == 0
    deployment.tamper(lambda c: roll_back_to(c, 9))

    # The database is consistent with itself: only a checkpoint kept elsewhere can tell.
    assert audit("verify").exit_code == 0
    damage = expect(audit("verify", "--against", str(exported)), DamageKind.INCONSISTENT, leaf=9)
    assert "covers 12 events but the log has only 9" in damage.detail
    assert str(exported) in damage.detail


def test_a_rolled_back_log_that_grew_again(deployment: Deployment, tmp_path: Path) -> None:
    exported = tmp_path / "witness.checkpoint"
    assert audit("checkpoint", "--out", str(exported)).exit_code == 0
    deployment.tamper(lambda c: roll_back_to(c, 9))
    deployment.append(5, first=200)  # A different history, now longer than the exported one.

    assert audit("verify").exit_code == 0
    damage = expect(audit("verify", "--against", str(exported)), DamageKind.INCONSISTENT)
    assert "do not hash to the root of checkpoint" in damage.detail


# Bad input and the entry point --------------------------------------------------------------------


@pytest.fixture
def medcollab(monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    """``medcollab`` as installed: the entry point, with ``audit`` registered as main.py will."""
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.add_typer(audit_app, name="audit")
    monkeypatch.setattr(cli_main, "app", app)
    return lambda *args: cli_main.main(list(args))


def test_damage_exits_non_zero_naming_the_event(
    deployment: Deployment, medcollab: Callable[..., int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert medcollab("audit", "verify") == 0
    deployment.tamper(lambda c: c.execute(delete(EVENTS).where(EVENTS.c.seq == 7)))
    capsys.readouterr()
    assert medcollab("audit", "verify") == 2
    captured = capsys.readouterr()
    assert "error: the audit log is damaged: missing at leaf 6" in captured.err
    assert "after seq 6" in captured.err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "is not a valid checkpoint: does not end with a newline"),
        (b"hello\nworld\n", "is not a valid checkpoint: no blank line"),
        (b"origin\n12\nAAAA\n\n\xe2\x80\x94 k AAAAAAAA\n", "root hash is 3 bytes"),
    ],
)
def test_a_malformed_checkpoint_file_is_a_clear_error(
    deployment: Deployment,
    medcollab: Callable[..., int],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    content: bytes | None,
    message: str,
) -> None:
    path = tmp_path / "given.checkpoint"
    if content is not None:
        path.write_bytes(content)
    assert medcollab("audit", "verify", "--against", str(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}")
    assert message in err
    assert isinstance(audit("verify", "--against", str(path)).exception, CheckpointRejected)


def test_a_checkpoint_signed_by_another_key_is_refused(
    deployment: Deployment,
    medcollab: Callable[..., int],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    origin = default_origin(Ed25519Signer.from_seed(SEED).public_key_bytes())
    forged = sign_checkpoint(Checkpoint(origin, 3, bytes(32)), Ed25519Signer.generate())
    path = tmp_path / "forged.checkpoint"
    path.write_text(forged.note, encoding="utf-8")
    assert medcollab("audit", "verify", "--against", str(path)) == 2
    assert "is not signed by this log's key" in capsys.readouterr().err


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "verify_proof", ROOT / "tools" / "verify_proof.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_proof_output_checks_with_the_standalone_tool(
    deployment: Deployment,
    medcollab: Callable[..., int],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    tool = _tool()
    exported = tmp_path / "witness.checkpoint"
    assert audit("checkpoint", "--out", str(exported)).exit_code == 0
    for seq in (1, 7, 12):
        result = audit("proof", "--event", str(seq))
        assert result.exit_code == 0, result.output
        document = json.loads(result.output)
        assert tool.check(document, exported.read_text(encoding="utf-8")).startswith(
            f"OK: seq {seq} is leaf {seq - 1} of the 12-event tree"
        )
        proof_file = tmp_path / f"proof-{seq}.json"
        proof_file.write_text(result.output, encoding="utf-8")
        assert tool.main([str(proof_file), "--checkpoint", str(exported)]) == 0
    capsys.readouterr()
    assert medcollab("audit", "proof", "--event", "999") == 2
    assert "no audit event with sequence number 999" in capsys.readouterr().err


# Ordering under concurrency -----------------------------------------------------------------------


def test_commits_out_of_sequence_order_still_give_gapless_leaves(deployment: Deployment) -> None:
    if deployment.kind != "postgresql":
        pytest.skip("SQLite serialises writers, so transactions cannot commit out of order")
    runtime = Runtime.from_settings(_settings(deployment.url, deployment.data_dir))
    signer = Ed25519Signer.from_seed(SEED)
    clock = FrozenClock(START + timedelta(hours=2))
    try:
        slow = runtime.database.session()
        early = AuditLog(slow).append(_event(clock, 13))  # Takes a sequence value, not committed.
        with runtime.database.unit_of_work() as session:
            late = AuditLog(session).append(_event(clock, 14))
        abandoned = runtime.database.session()
        AuditLog(abandoned).append(_event(clock, 15))
        abandoned.rollback()  # Its sequence value becomes a gap.
        abandoned.close()
        with runtime.database.unit_of_work() as session:
            assert AuditLog(session, signer=signer, clock=clock).integrate().integrated == 1
        slow.commit()
        slow.close()
        with runtime.database.unit_of_work() as session:
            assert AuditLog(session, signer=signer, clock=clock).integrate().integrated == 1
    finally:
        runtime.close()
    assert early.seq < late.seq
    with deployment.engine.connect() as connection:
        placed = dict(connection.execute(select(EVENTS.c.seq, EVENTS.c.leaf_index)).all())
    assert placed[late.seq] == 12  # Committed first, so placed first.
    assert placed[early.seq] == 13
    assert sorted(placed.values()) == list(range(14))
    assert audit("verify").exit_code == 0


def test_concurrent_integrators_agree_on_one_order(deployment: Deployment) -> None:
    runtime = Runtime.from_settings(_settings(deployment.url, deployment.data_dir))
    signer = Ed25519Signer.from_seed(SEED)
    clock = FrozenClock(START + timedelta(hours=3))
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for round_ in range(5):
                with runtime.database.unit_of_work() as session:
                    for i in range(4):
                        AuditLog(session).append(_event(clock, 1000 * worker + 10 * round_ + i))
                with runtime.database.unit_of_work() as session:
                    AuditLog(session, signer=signer, clock=clock).integrate()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread.
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runtime.close()
    assert errors == []
    with deployment.engine.connect() as connection:
        leaves = connection.scalars(select(EVENTS.c.leaf_index).order_by(EVENTS.c.leaf_index)).all()
    assert leaves == list(range(12 + 4 * 5 * 4))
    result = audit("verify")
    assert result.exit_code == 0, result.output
