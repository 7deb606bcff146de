"""Import throughput: the Synthea R4 bundles into a fresh SQLite deployment, against a plain insert.

* **medcollab**: :class:`medcollab.records.importer.Importer` exactly as ``medcollab import`` runs it
  (a named system context, one unit of work per file): validation, reference rewriting, per-patient
  data keys, AES-GCM encryption, search indexes with blind indexes, care relationships, one audit
  event per resource.
* **baseline**: the same files parsed and each resource inserted as JSON under a new id into one
  SQLite table, one transaction per file, through the same engine settings
  (:func:`medcollab.db.session.make_engine`: WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``); the
  fastest of three runs.

Both run in this process on core 0. Run: ``python -m bench.import_bench [--data DIR] [--files N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.fhir_read_bench import SERVER_CPU, Deployment, own_cpu

REPO: Final = Path(__file__).resolve().parents[1]
_DATA_CANDIDATES: Final = (
    Path(os.environ.get("MEDCOLLAB_FHIR_DATA", "/nonexistent")),
    REPO.parent / "shared" / "data" / "fhir",
    REPO / "shared" / "data" / "fhir",
)
ORG_CODE: Final = "IMPORT"


def synthea_dir(given: Path | None) -> Path:
    """The folder of Synthea bundles: ``given``, or ``synthea-r4`` under the shared FHIR data."""
    if given is not None:
        folder = given / "synthea-r4" if (given / "synthea-r4").is_dir() else given
        if any(folder.glob("*.json")):
            return folder
        raise SystemExit(f"no *.json bundles in {folder}")
    for candidate in _DATA_CANDIDATES:
        if (candidate / "synthea-r4").is_dir():
            return candidate / "synthea-r4"
    raise SystemExit("Synthea data not found; pass --data DIR (holding synthea-r4/)")


@dataclass
class ImportResult:
    files: int
    resources: int
    seconds: float
    failed: list[str] = field(default_factory=list)
    #: Entries the importer recognised as already imported (the same source reference in an
    #: earlier bundle, such as a shared Organization), so created nothing for.
    unchanged: int = 0
    baseline_resources: int = 0
    baseline_seconds: float = 0.0
    #: SQL statements the importer sent, per resource created.
    statements_per_resource: float = 0.0

    @property
    def rate(self) -> float:
        return self.resources / self.seconds if self.seconds else 0.0

    @property
    def baseline_rate(self) -> float:
        return self.baseline_resources / self.baseline_seconds if self.baseline_seconds else 0.0

    @property
    def ratio(self) -> float | None:
        return self.rate / self.baseline_rate if self.baseline_rate else None

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "resources": self.resources,
            "seconds": self.seconds,
            "resources_per_second": self.rate,
            "failed": self.failed,
            "unchanged": self.unchanged,
            "baseline_resources": self.baseline_resources,
            "baseline_seconds": self.baseline_seconds,
            "baseline_resources_per_second": self.baseline_rate,
            "ratio": self.ratio,
            "statements_per_resource": self.statements_per_resource,
        }


@contextlib.contextmanager
def _deployment(root: Path) -> Iterator[Any]:
    """A fresh, initialised deployment's Runtime with the organisation the import acts for."""
    from medcollab.config import Settings  # noqa: PLC0415
    from medcollab.deployment import initialise  # noqa: PLC0415
    from medcollab.identity.models import OrgKind  # noqa: PLC0415
    from medcollab.identity.services import UserService, operator_agent  # noqa: PLC0415

    deployment = Deployment(root)
    with deployment.settings_environment():
        initialise(Settings())
    runtime = deployment.runtime()
    try:
        with runtime.database.unit_of_work() as session:
            UserService(session=session, runtime=runtime).create_org(
                code=ORG_CODE,
                name="Import Hospital",
                kind=OrgKind.HOSPITAL,
                region="CN",
                agent=operator_agent("bench"),
            )
        yield runtime
    finally:
        runtime.close()


@dataclass(frozen=True)
class SecuredImport:
    created: int
    unchanged: int
    seconds: float
    failures: list[str]
    statements: int


def import_secured(runtime: Any, files: list[Path]) -> SecuredImport:
    """The real importer, as `medcollab import` runs it, counting its SQL statements."""
    from sqlalchemy import event  # noqa: PLC0415

    from medcollab.access.context import AccessContext  # noqa: PLC0415
    from medcollab.identity.services import UserService  # noqa: PLC0415
    from medcollab.records.cli import repository  # noqa: PLC0415
    from medcollab.records.importer import Importer  # noqa: PLC0415
    from medcollab.records.repository import RecordRepository  # noqa: PLC0415

    with runtime.database.unit_of_work() as session:
        org_id = UserService(session=session, runtime=runtime).org_by_code(ORG_CODE).id
    ctx = AccessContext.system("import", org_id)

    @contextlib.contextmanager
    def scope() -> Iterator[RecordRepository]:
        with runtime.database.unit_of_work() as session:
            yield repository(runtime, session, ctx)

    importer = Importer(repo_scope=scope, keyring=runtime.keyring, org_id=org_id)
    statements = 0

    def count(*_args: Any) -> None:
        nonlocal statements
        statements += 1

    event.listen(runtime.database.engine, "before_cursor_execute", count)
    try:
        report = importer.run(files)
    finally:
        event.remove(runtime.database.engine, "before_cursor_execute", count)
    failures = [f"{f.path.name}: {f.error}" for f in report.failed]
    return SecuredImport(report.created, report.unchanged, report.seconds, failures, statements)


def import_baseline(db_path: Path, files: list[Path]) -> tuple[int, float]:
    """(resources inserted, seconds): parse, new id, serialise, INSERT; a transaction per file."""
    from sqlalchemy import text  # noqa: PLC0415

    from medcollab.db.session import make_engine  # noqa: PLC0415

    engine = make_engine(f"sqlite:///{db_path.resolve()}")
    insert = text("INSERT INTO resource (type, id, body) VALUES (:type, :id, :body)")
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "CREATE TABLE resource (type TEXT NOT NULL, id TEXT NOT NULL, "
                    "body TEXT NOT NULL, PRIMARY KEY (type, id))"
                )
            )
        created = 0
        started = time.perf_counter()
        for path in files:
            bundle = json.loads(path.read_bytes())
            rows = []
            for entry in bundle.get("entry") or []:
                resource = {**entry["resource"], "id": str(uuid.uuid4())}
                rows.append(
                    {
                        "type": resource["resourceType"],
                        "id": resource["id"],
                        "body": json.dumps(resource, ensure_ascii=False, separators=(",", ":")),
                    }
                )
            with engine.begin() as connection:
                connection.execute(insert, rows)
            created += len(rows)
        return created, time.perf_counter() - started
    finally:
        engine.dispose()


def run(data: Path | None = None, max_files: int | None = None) -> ImportResult:
    from medcollab.records.importer import collect  # noqa: PLC0415

    folder = synthea_dir(data)
    files = collect([folder])
    if max_files is not None:
        # The smallest files, for a quick smoke run.
        files = sorted(files, key=lambda p: p.stat().st_size)[:max_files]
    print(f"import: {len(files)} Synthea bundles from {folder}", flush=True)
    with tempfile.TemporaryDirectory(prefix="medcollab-bench-import-") as tmp:
        root = Path(tmp)
        with own_cpu(SERVER_CPU):
            # The baseline is quick, so it runs three times into fresh files; the fastest counts.
            baseline_runs = [import_baseline(root / f"baseline-{n}.db", files) for n in range(3)]
            baseline_created, baseline_seconds = min(baseline_runs, key=lambda run: run[1])
            with _deployment(root / "secured") as runtime:
                secured = import_secured(runtime, files)
    return ImportResult(
        files=len(files),
        resources=secured.created,
        seconds=secured.seconds,
        failed=secured.failures,
        unchanged=secured.unchanged,
        baseline_resources=baseline_created,
        baseline_seconds=baseline_seconds,
        statements_per_resource=secured.statements / secured.created if secured.created else 0.0,
    )


def report(result: ImportResult) -> None:
    print()
    print(f"Import: {result.files} Synthea R4 bundles into a fresh SQLite deployment, core 0")
    print(f"  {'':11}{'resources':>10}{'seconds':>9}{'resources/s':>13}")
    print(f"  {'medcollab':11}{result.resources:>10}{result.seconds:>9.1f}{result.rate:>13.0f}")
    print(
        f"  {'baseline':11}{result.baseline_resources:>10}{result.baseline_seconds:>9.1f}"
        f"{result.baseline_rate:>13.0f}"
    )
    if result.unchanged:
        print(
            f"  medcollab found {result.unchanged} entries already imported from an earlier bundle "
            "(the same source reference) and created nothing for them"
        )
    if result.ratio is not None:
        print(f"  ratio medcollab/baseline: {result.ratio:.3f}x resources/s")
    print(
        f"  medcollab sent {result.statements_per_resource:.1f} SQL statements per resource "
        "(the baseline: one batched INSERT per file)"
    )
    for failure in result.failed:
        print(f"  failed: {failure}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder holding synthea-r4/")
    parser.add_argument("--files", type=int, default=None, help="only the N smallest bundles")
    args = parser.parse_args(argv)
    report(run(args.data, args.files))


if __name__ == "__main__":
    main()
