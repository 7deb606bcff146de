"""``medcollab keys``: key-encryption-key rotation, data-key rotation and key status.

Each command runs in one unit of work: a rotation that fails half-way is rolled back and every key
stays wrapped by the KEK version it had, which still exists. Every change is audited as the visibly
named system actor ``system:cli``, in the same transaction as the change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy.orm import Session

from medcollab.audit.events import AuditEvent, Entity, EventType, Outcome
from medcollab.audit.services import AuditLog
from medcollab.errors import InvalidInput
from medcollab.identity.services import operator_agent
from medcollab.kernel.clock import Clock
from medcollab.keys.models import OwnerKind
from medcollab.keys.services import KeyService

keys_app = typer.Typer(help="Encryption keys: rotation and status.", no_args_is_help=True)

out = Console()


@dataclass(frozen=True, slots=True)
class _Command:
    keys: KeyService
    session: Session
    clock: Clock

    def audit(self, event_type: EventType, *reasons: str, patient_id: str | None = None) -> None:
        """Record the change as the operator CLI, in the same transaction as the change itself."""
        AuditLog(self.session).append(
            AuditEvent(
                type=event_type,
                outcome=Outcome.SUCCESS,
                recorded_at=self.clock.now(),
                agent=operator_agent(),
                reasons=reasons,
                entity=Entity(patient_id=patient_id) if patient_id else None,
            )
        )


@contextmanager
def _command() -> Iterator[_Command]:
    # medcollab.cli.main registers this app, so importing it at the top would be circular.
    from medcollab.cli.main import _runtime  # noqa: PLC0415

    # The runtime owns the key provider and closes it (and its HSM session) when the command ends.
    with _runtime() as runtime, runtime.database.unit_of_work() as session:
        yield _Command(runtime.key_service(session), session, runtime.clock)


@keys_app.command("rotate")
def rotate(
    rewrap_only: Annotated[
        bool,
        typer.Option(
            "--rewrap-only",
            help="Do not create a KEK version; re-wrap keys not yet under the current one.",
        ),
    ] = False,
) -> None:
    """Create a new key-encryption-key version and re-wrap every data key; data is untouched."""
    with _command() as command, Progress(console=out, transient=True) as bar:
        task = bar.add_task("re-wrapping data keys", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = command.keys.rotate_kek(new_version=not rewrap_only, progress=progress)
        command.audit(
            EventType.KEYS_ROTATED, "kek", report.new_kek_id, f"rewrapped={report.rewrapped}"
        )
    out.print(f"key-encryption key  {report.new_kek_id}")
    out.print(f"data keys re-wrapped {report.rewrapped}")
    previous = ", ".join(report.previous_kek_ids) or "-"
    out.print(f"previous KEK versions {previous} (kept; they wrap no live key any more)")


@keys_app.command("rotate-patient")
def rotate_patient(
    patient: Annotated[str, typer.Option("--patient", help="The FHIR Patient id.")],
) -> None:
    """Give one patient a new data key; their older data stays readable with the retired key."""
    with _command() as command:
        key = command.keys.rotate_data_key(OwnerKind.PATIENT, patient)
        command.audit(EventType.KEYS_ROTATED, "data-key", str(key.id), patient_id=patient)
    out.print(f"new data key {key.id}")


@keys_app.command("status")
def status() -> None:
    """Show the KEK versions and how many data keys each wraps."""
    with _command() as command:
        report = command.keys.status()
    out.print(f"key provider  {report.provider}")
    out.print(f"current KEK   {report.current_kek_id}")
    keks = Table("KEK version", "live data keys", "state")
    for kek_id in report.kek_ids:
        state = (
            "current"
            if kek_id == report.current_kek_id
            else ("unused" if kek_id in report.unused_kek_ids else "in use")
        )
        keks.add_row(kek_id, str(report.keys_per_kek.get(kek_id, 0)), state)
    out.print(keks)
    kinds = Table("owner kind", "current", "retired", "destroyed")
    for kind, counts in sorted(report.keys_per_kind.items()):
        kinds.add_row(
            kind,
            str(counts.get("current", 0)),
            str(counts.get("retired", 0)),
            str(counts.get("destroyed", 0)),
        )
    out.print(kinds)
    out.print(f"shredded owners {report.shredded_owners}")


@keys_app.command("destroy-kek")
def destroy_kek(
    kek_id: Annotated[str, typer.Argument(help="The old KEK version, e.g. file:v1.")],
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: backups made under this KEK become unreadable.")
    ] = False,
) -> None:
    """Destroy an old KEK version that wraps no live data key (makes old backups unreadable)."""
    if not yes:
        raise InvalidInput(
            "destroying a KEK version is irreversible",
            hint="every backup of the keys made under it becomes unreadable; add --yes",
        )
    with _command() as command:
        command.keys.destroy_unused_kek(kek_id)
        command.audit(EventType.KEYS_ROTATED, "kek-destroyed", kek_id)
    out.print(f"destroyed {kek_id}")
