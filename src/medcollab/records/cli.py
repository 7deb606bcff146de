"""``medcollab import`` and ``medcollab export``: bulk FHIR in and out, as named system contexts."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medcollab.access.context import AccessContext
from medcollab.identity.services import UserService
from medcollab.jurisdiction.profiles import effective_profile
from medcollab.records.importer import FileResult, Importer, collect
from medcollab.records.repository import RecordRepository
from medcollab.runtime import Runtime

EXIT_PARTIAL = 3


def repository(runtime: Runtime, session: object, ctx: AccessContext) -> RecordRepository:
    from sqlalchemy.orm import Session  # noqa: PLC0415

    assert isinstance(session, Session)  # noqa: S101 - typed narrowing for the factory.
    return RecordRepository(
        session=session,
        ctx=ctx,
        keys=runtime.key_service(session),
        keyring=runtime.keyring,
        clock=runtime.clock,
        settings=runtime.settings,
        profile=effective_profile(runtime.settings.jurisdiction, None),
    )


def import_command(runtime: Runtime, paths: list[Path], org_code: str, console: Console) -> int:
    with runtime.database.unit_of_work() as session:
        org = UserService(session=session, runtime=runtime).org_by_code(org_code)
        org_id = org.id
    ctx = AccessContext.system("import", org_id)

    @contextmanager
    def scope() -> Iterator[RecordRepository]:
        with runtime.database.unit_of_work() as session:
            yield repository(runtime, session, ctx)

    files = collect(paths)
    importer = Importer(repo_scope=scope, keyring=runtime.keyring, org_id=org_id)
    failures: list[FileResult] = []
    with Progress(
        TextColumn("[bold]importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("files", total=len(files))

        def advance(result: FileResult) -> None:
            if result.error:
                failures.append(result)
                progress.console.print(
                    f"[red]failed[/red] {result.path.name}: {result.error}",
                    markup=True,
                    highlight=False,
                )
            progress.advance(task)

        report = importer.run(files, on_file=advance)
    console.print(
        f"{len(files)} files: {report.created} resources created, {report.unchanged} already "
        f"present, {len(report.failed)} files failed; {report.rate:.0f} resources/s"
    )
    return EXIT_PARTIAL if failures else 0


def export_command(runtime: Runtime, patient_id: str, out: Path | None, console: Console) -> None:
    ctx = AccessContext.system("export")
    with runtime.database.unit_of_work() as session:
        repo = repository(runtime, session, ctx)
        from medcollab.access.policy import Action  # noqa: PLC0415
        from medcollab.records.bundles import searchset  # noqa: PLC0415

        resources = repo.everything(patient_id, action=Action.EXPORT)
        bundle = searchset(resources, total=len(resources))
    text = json.dumps(bundle, ensure_ascii=False, indent=1)
    if out is None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    console.print(f"wrote {len(resources)} resources to {out} (mode 0600)")


PathsArg = Annotated[list[Path], typer.Argument(help="Files or folders of FHIR JSON.")]
