"""``medcollab audit``: verify the log, export a checkpoint for witnesses, print inclusion proofs.

- ``verify [--against FILE...]`` recomputes every leaf and root from the stored events, checks every
  tree head's signature and that all heads (and the given outside checkpoints) describe one growing
  tree. It prints what it checked and how long it took; on damage it names the first damaged
  sequence number and the kind of damage, and exits non-zero.
- ``checkpoint --out FILE`` integrates waiting events, signs a fresh tree head and writes it, after
  it is committed, as a C2SP checkpoint for an outside witness.
- ``proof --event SEQ`` prints an inclusion proof of one event as JSON, which
  ``tools/verify_proof.py`` (standard library only) checks.
- ``archive --before YYYY-MM-DD --out FILE [--dry-run] [--max-events N]`` moves the oldest events recorded before the
  date (a prefix of the log) into a signed, compressed file and removes them from the database,
  after checking that the date is past the retention period and that the live log verifies.
- ``verify-archive FILE [--against-live] [--verifier-key KEY]`` checks an archive file on its own
  (with the deployment's log key, or a verifier key for someone who has only the file) and,
  optionally, that the live log still contains the tree it was cut from.

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
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy import Connection, create_engine, event
from sqlalchemy.orm import Session

from medcollab.audit.archive import (
    ArchiveReport,
    RetentionPolicy,
    archive_before,
    retention_policy,
    verify_archive,
)
from medcollab.audit.checkpoint import MAX_CHECKPOINT_BYTES, parse_verifier_key, verifier_key
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
from medcollab.identity.services import UserService
from medcollab.jurisdiction.profiles import effective_profile, get_profile
from medcollab.runtime import Runtime

audit_app = typer.Typer(
    help="The tamper-evident audit log: verify it, export checkpoints, prove events.",
    no_args_is_help=True,
)

out = Console(highlight=False, markup=False, soft_wrap=True)


# Collaborators ------------------------------------------------------------------------------------


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"MEDCOLLAB_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from None


@contextmanager
def _runtime() -> Iterator[Runtime]:
    # The pattern of medcollab.cli.main._runtime. It is not imported from there: the audit domain
    # must not depend on the front door that registers it (import-linter forbids audit -> cli).
    from medcollab.deployment import schema_is_current  # noqa: PLC0415 - keeps --help fast.

    settings = _settings()
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
    archived = f", {report.archived} of them archived" if report.archived else ""
    out.print(f"events       {report.events} ({report.integrated} in the tree{archived}{waiting})")
    for archive in report.archives:
        out.print(f"archived     {archive.describe()}")
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


# Retention and archives ---------------------------------------------------------------------------


def _cutoff(text: str) -> datetime:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        day = None
    if day is None or len(text) != 10:
        raise InvalidInput(f"--before {text[:32]!r} is not a date in the form YYYY-MM-DD")
    # Midnight UTC: events recorded on the given day itself stay live.
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _retention(runtime: Runtime, session: Session) -> RetentionPolicy:
    # Organisations may run under another jurisdiction than the deployment, and one tree holds
    # every organisation's events, so the strictest profile in use governs the whole log.
    deployment = runtime.settings.jurisdiction
    profiles = [get_profile(deployment)]
    for org in UserService(session=session, runtime=runtime).list_orgs():
        profiles.append(effective_profile(deployment, org.jurisdiction))
    return retention_policy(runtime.settings.audit_retention_days, profiles)


@audit_app.command("archive")
def archive(
    before: Annotated[
        str,
        typer.Option(
            "--before",
            metavar="YYYY-MM-DD",
            help="Archive the oldest events recorded before this day (00:00 UTC).",
        ),
    ],
    out_file: Annotated[
        Path, typer.Option("--out", metavar="FILE", help="The archive file to create.")
    ],
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check and report what would be archived; change nothing."),
    ] = False,
    max_events: Annotated[
        int | None,
        typer.Option(
            "--max-events",
            metavar="N",
            min=1,
            help="Archive at most N events (shorter locks); run again to continue.",
        ),
    ] = None,
) -> None:
    """Move events older than the retention period into a signed archive file."""
    cutoff = _cutoff(before)
    with _runtime() as runtime:
        with _snapshot(runtime) as session:
            retention = _retention(runtime, session)
        # Checked before the (long) verification, so a refused date costs nothing.
        retention.check_cutoff(cutoff, runtime.clock.now())
        signer = _signer(runtime)
        # The whole live log must verify first: archiving removes rows, and a damaged log must stay
        # as found for the investigation. This reads a snapshot, so writers are not blocked.
        with _snapshot(runtime) as session:
            checked = verify_log(session, public_key=signer.public_key_bytes())
        if not checked.ok:
            _print_report(checked)
            raise AuditLogDamaged(checked)
        with runtime.database.unit_of_work() as session:
            report = archive_before(
                session,
                cutoff=cutoff,
                out=out_file,
                signer=signer,
                clock=runtime.clock,
                retention=retention,
                dry_run=dry_run,
                max_events=max_events,
            )
    out.print(f"retention    {retention.period.days:,} days ({retention.source})")
    out.print(f"cutoff       {cutoff.isoformat()}")
    out.print(f"verified     the live log is intact ({checked.integrated} events in the tree)")
    if not report.events:
        out.print(
            f"result       nothing to archive: the live log starts at leaf {report.first_leaf}"
        )
        out.print("             with an event recorded on or after the cutoff")
        return
    _print_archive(report)
    out.print(f"result       {'would archive' if dry_run else 'archived'} {report.events} events")


@audit_app.command("verify-archive")
def verify_archive_file(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The archive file to check.")],
    against_live: Annotated[
        bool,
        typer.Option(
            "--against-live",
            help="Also check that the live log recorded this archive and still contains its tree.",
        ),
    ] = False,
    key: Annotated[
        str | None,
        typer.Option(
            "--verifier-key",
            metavar="KEY",
            help="The log's verifier key (NAME+ID+KEY, printed by `audit checkpoint`), for checking "
            "a file without the deployment.",
        ),
    ] = None,
) -> None:
    """Check an archive file's signature, every event's leaf hash and its signed root."""
    if key is not None:
        origin, public_key = parse_verifier_key(key)
    else:
        # Only the public half is needed, and verifying never creates a key.
        public_key = load_log_key(log_key_path(_settings().key_dir)).public_key_bytes()
        origin = default_origin(public_key)
    if against_live:
        with _runtime() as runtime, _snapshot(runtime) as session:
            report = verify_archive(file, public_key, origin=origin, live=session)
    else:
        report = verify_archive(file, public_key, origin=origin)
    out.print(f"signature    valid: signed by the log key {origin}")
    _print_archive(report)
    if report.live_size is not None:
        out.print(
            f"live log     recorded; consistent with the live signed head at size "
            f"{report.live_size}"
        )
    out.print("result       intact")


def _print_archive(report: ArchiveReport) -> None:
    if report.path is not None:
        out.print(f"archive      {report.describe()}")
    else:
        out.print(
            f"archive      {report.events} events (leaves {report.first_leaf}.."
            f"{report.end_leaf - 1}), not written (dry run)"
        )
    if report.first_seq is not None:
        out.print(f"sequence     seq {report.first_seq}..{report.last_seq}")
    if report.first_recorded is not None and report.last_recorded is not None:
        out.print(
            f"recorded     {report.first_recorded.isoformat()} .. "
            f"{report.last_recorded.isoformat()}"
        )
    if report.root_hash is not None:
        linked = (
            f"; linked to the signed head at size {report.linked_size}"
            if report.linked_size is not None
            else ""
        )
        out.print(
            f"checkpoint   size {report.end_leaf}, root "
            f"{base64.b64encode(report.root_hash).decode()}{linked}"
        )
    if report.file_sha256 is not None:
        out.print(f"sha256       {report.file_sha256.hex()}")
