"""``medcollab audit``: verify the log, export a checkpoint for witnesses, print inclusion proofs.

- ``verify [--against FILE...]`` recomputes every leaf and root from the stored events, checks every
  tree head's signature and that all heads (and the given outside checkpoints) describe one growing
  tree. It prints what it checked and how long it took; on damage it names the first damaged
  sequence number and the kind of damage, and exits non-zero.
- ``checkpoint --out FILE`` integrates waiting events, signs a fresh tree head and writes it, after
  it is committed, as a C2SP checkpoint for an outside witness.
- ``proof --event SEQ`` prints an inclusion proof of one event as JSON, which
  ``tools/verify_proof.py`` (standard library only) checks.

Verification reads one consistent snapshot without taking the write lock, so it can run beside a
serving deployment: a REPEATABLE READ transaction on PostgreSQL, a deferred read transaction on a
query-only connection on SQLite (in WAL mode, readers never block writers).

Errors are :class:`~medcollab.errors.MedcollabError` subclasses, which ``medcollab``'s entry point
prints as one line and turns into exit status 2.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy import Connection, create_engine, event
from sqlalchemy.orm import Session

from medcollab.audit.checkpoint import MAX_CHECKPOINT_BYTES, verifier_key
from medcollab.audit.services import AuditLog, default_origin
from medcollab.audit.verify import (
    AuditLogDamaged,
    CheckpointRejected,
    OutsideCheckpoint,
    VerificationReport,
    read_checkpoint,
    verify_log,
)
from medcollab.config import Settings
from medcollab.crypto.signing import (
    Ed25519Signer,
    load_log_key,
    load_or_create_log_key,
    log_key_path,
)
from medcollab.db.session import SQLITE_BUSY_TIMEOUT_MS
from medcollab.errors import ConfigurationError, InvalidInput
from medcollab.runtime import Runtime

audit_app = typer.Typer(
    help="The tamper-evident audit log: verify it, export checkpoints, prove events.",
    no_args_is_help=True,
)

out = Console(highlight=False, markup=False, soft_wrap=True)


# Collaborators ------------------------------------------------------------------------------------


@contextmanager
def _runtime() -> Iterator[Runtime]:
    # The pattern of medcollab.cli.main._runtime. It is not imported from there: the audit domain
    # must not depend on the front door that registers it (import-linter forbids audit -> cli).
    from medcollab.deployment import schema_is_current  # noqa: PLC0415 - keeps --help fast.

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"MEDCOLLAB_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from None
    if not schema_is_current(settings):
        raise ConfigurationError(
            "the database is not initialised or its schema is out of date",
            hint="run `medcollab init`",
        )
    runtime = Runtime.from_settings(settings)
    try:
        yield runtime
    finally:
        runtime.close()


def _signer(runtime: Runtime) -> Ed25519Signer:
    return load_or_create_log_key(log_key_path(runtime.settings.key_dir))


def _public_key(runtime: Runtime) -> bytes | None:
    path = log_key_path(runtime.settings.key_dir)
    # No key yet means no head was ever signed here; verify_log refuses if heads exist anyway.
    return load_log_key(path).public_key_bytes() if path.exists() else None


@contextmanager
def _snapshot(runtime: Runtime) -> Iterator[Session]:
    """A read-only session on one consistent snapshot that does not block writers."""
    if runtime.database.dialect == "postgresql":
        session = runtime.database.session()
        try:
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            yield session
        finally:
            session.rollback()
            session.close()
        return
    engine = create_engine(
        runtime.settings.sqlalchemy_url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA query_only=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Deferred: the snapshot starts at the first read and holds no write lock.
        connection.exec_driver_sql("BEGIN")

    session = Session(bind=engine)
    try:
        yield session
    finally:
        session.rollback()
        session.close()
        engine.dispose()


def _read_checkpoint_file(path: Path) -> OutsideCheckpoint:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CHECKPOINT_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointRejected(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointRejected(f"{path}: cannot be read ({exc.strerror})") from None
    return read_checkpoint(str(path), data)


def _write_file(path: Path, content: str) -> None:
    # Written beside the target and renamed, so a witness never picks up half a checkpoint.
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("w", encoding="utf-8", newline="\n") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise InvalidInput(f"cannot write {path}: {exc.strerror}") from None


# Commands -----------------------------------------------------------------------------------------


@audit_app.command("verify")
def verify(
    against: Annotated[
        list[Path] | None,
        typer.Option(
            "--against",
            metavar="FILE",
            help="A checkpoint kept elsewhere (repeatable): the log must still contain it.",
        ),
    ] = None,
) -> None:
    """Recompute every leaf and root; check every signed head and outside checkpoint."""
    outside = [_read_checkpoint_file(path) for path in against or []]
    with _runtime() as runtime:
        public_key = _public_key(runtime)
        with _snapshot(runtime) as session:
            report = verify_log(session, public_key=public_key, checkpoints=outside)
    _print_report(report)
    if not report.ok:
        raise AuditLogDamaged(report)


@audit_app.command("checkpoint")
def checkpoint(
    out_file: Annotated[
        Path, typer.Option("--out", metavar="FILE", help="Where to write the checkpoint.")
    ],
) -> None:
    """Sign a fresh tree head and export it as a C2SP checkpoint for an outside witness."""
    with _runtime() as runtime:
        signer = _signer(runtime)
        with runtime.database.unit_of_work() as session:
            log = AuditLog(session, signer=signer, clock=runtime.clock)
            log.integrate(issue_head=False)
            head = log.issue_tree_head()
    # Exported only after the head is committed, so no witness holds a head the log rolled back.
    _write_file(out_file, head.note)
    origin = default_origin(signer.public_key_bytes())
    out.print(f"checkpoint   {head.size} events, issued {head.issued_at.isoformat()}")
    out.print(f"written to   {out_file}")
    out.print(f"verifier key {verifier_key(origin, signer.public_key_bytes())}", soft_wrap=True)


@audit_app.command("proof")
def proof(
    event_seq: Annotated[
        int, typer.Option("--event", metavar="SEQ", help="Sequence number of the event.")
    ],
) -> None:
    """Print an inclusion proof of one event as JSON (check it with tools/verify_proof.py)."""
    with _runtime() as runtime:
        signer = _signer(runtime)
        with runtime.database.unit_of_work() as session:
            log = AuditLog(session, signer=signer, clock=runtime.clock)
            log.integrate()
            result = log.event_proof(event_seq)
    typer.echo(result.dumps())


def _print_report(report: VerificationReport) -> None:
    waiting = f", {report.pending} waiting to be integrated" if report.pending else ""
    out.print(f"events       {report.events} ({report.integrated} in the tree{waiting})")
    if report.latest_head_size is not None and report.latest_head_time is not None:
        out.print(
            f"tree heads   {report.tree_heads} signed; the latest covers "
            f"{report.latest_head_size} events, issued {report.latest_head_time.isoformat()}"
        )
    else:
        out.print(f"tree heads   {report.tree_heads}")
    out.print(f"checkpoints  {report.checkpoints} outside checkpoint(s) checked")
    out.print(
        f"root         {base64.b64encode(report.root_hash).decode()} (size {report.integrated})"
    )
    out.print(f"time         {report.seconds:.3f} s")
    if report.ok:
        out.print("result       intact")
        return
    out.print(f"result       DAMAGED ({len(report.damages)} problem(s))")
    for number, damage in enumerate(report.damages, start=1):
        out.print(f"  {number}. {damage.describe()}", markup=False, soft_wrap=True)
