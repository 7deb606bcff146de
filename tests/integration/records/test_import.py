"""``medcollab import`` over the real test data: 21 Synthea bundles and the 718 HL7 R4 examples."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select

from medcollab.access.context import AccessContext
from medcollab.errors import InvalidInput
from medcollab.records.cli import repository
from medcollab.records.importer import Importer, collect
from medcollab.records.models import FhirResource
from medcollab.records.repository import RecordRepository
from medcollab.records.validation import validate_resource
from medcollab.runtime import Runtime
from tests.support.factories import make_org

DATA = Path(__file__).resolve().parents[4] / "shared" / "data" / "fhir"
SYNTHEA = DATA / "synthea-r4"
EXAMPLES = DATA / "hl7-r4-examples"


def _importer(runtime: Runtime) -> Importer:
    org = make_org(runtime, "IMP")
    ctx = AccessContext.system("import", org.id)

    @contextmanager
    def scope() -> Iterator[RecordRepository]:
        with runtime.database.unit_of_work() as session:
            yield repository(runtime, session, ctx)

    return Importer(repo_scope=scope, keyring=runtime.keyring, org_id=org.id)


def _count(runtime: Runtime) -> int:
    with runtime.database.unit_of_work() as session:
        return session.scalar(select(func.count()).select_from(FhirResource)) or 0


@pytest.mark.slow
def test_all_synthea_bundles_import_idempotently(runtime: Runtime) -> None:
    files = collect([SYNTHEA])
    assert len(files) == 21
    entries = [e for f in files for e in json.loads(f.read_bytes())["entry"]]
    # Synthea repeats shared resources (organisations, practitioners) in several bundles under
    # the same fullUrl: each is stored once.
    distinct = len({e["fullUrl"] for e in entries})
    importer = _importer(runtime)
    first = importer.run(files)
    assert [f.error for f in first.failed] == []
    assert first.created == distinct
    assert first.created + first.unchanged == len(entries)
    assert _count(runtime) == distinct
    again = importer.run(files)
    assert again.created == 0
    assert again.unchanged == len(entries)
    assert _count(runtime) == distinct  # Same identifiers, no duplicates.


def _valid(path: Path) -> bool:
    try:
        validate_resource(json.loads(path.read_bytes()))
    except InvalidInput:
        return False
    return True


@pytest.mark.slow
def test_hl7_examples_valid_ones_import_invalid_ones_are_reported(runtime: Runtime) -> None:
    files = collect([EXAMPLES])
    assert len(files) == 718
    report = _importer(runtime).run(files)
    failed = {f.path.name: f.error for f in report.failed}
    invalid = {f.name for f in files if not _valid(f)}
    # Exactly the files the validator rejects are reported, each with a reason naming a path;
    # everything else (703+ files) lands.
    assert set(failed) == invalid
    assert len(invalid) <= 15
    assert all(reason and ":" in reason for reason in failed.values())
    assert len(files) - len(failed) >= 703
