"""``medcollab import``, ``export``, ``access explain`` and ``user create --patient`` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.integration.test_cli import Cli, InProcessCli, new_cli, ok, org_create, user_create

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "fhir" / "hl7-r4-examples"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    shared = new_cli(tmp_path_factory.mktemp("cli-records"))
    ok(shared("init"))
    ok(shared.run(org_create("CLI-H1", "CLI Hospital", "hospital", "CN")))
    return shared


@pytest.fixture
def cli(
    deployment: Cli, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> InProcessCli:
    return InProcessCli(deployment.workdir, deployment.data_dir, monkeypatch, capsys)


def test_import_reports_bad_files_and_goes_on_then_export_and_explain(
    cli: InProcessCli, tmp_path: Path
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    for name in ("Patient-example.json", "Observation-example.json", "Questionnaire-qs1.json"):
        shutil.copy(EXAMPLES / name, source / name)
    (source / "broken.json").write_text("{not json", encoding="utf-8")

    first = cli("import", str(source), "--org", "CLI-H1")
    assert first.returncode == 3, first.stderr
    assert "Questionnaire-qs1.json" in first.stdout
    assert "linkId" in first.stdout
    assert "broken.json" in first.stdout
    assert "2 resources created" in first.stdout
    again = cli("import", str(source), "--org", "CLI-H1")
    assert "0 resources created, 2 already present" in again.stdout

    # The imported example patient: find its server id through the observation's subject.
    engine = create_engine(f"sqlite:///{cli.database}")
    with engine.connect() as conn:
        patient_id = conn.execute(
            text("SELECT resource_id FROM fhir_resource WHERE resource_type = 'Patient'")
        ).scalar_one()
        subject = conn.execute(
            text("SELECT patient_id FROM fhir_resource WHERE resource_type = 'Observation'")
        ).scalar_one()
    engine.dispose()
    assert subject == patient_id  # Observation-example's Patient/example reference was remapped.

    out = tmp_path / "export.json"
    ok(cli("export", "--patient", patient_id, "--out", str(out)))
    bundle = json.loads(out.read_text(encoding="utf-8"))
    assert sorted(e["resource"]["resourceType"] for e in bundle["entry"]) == [
        "Observation",
        "Patient",
    ]
    assert oct(out.stat().st_mode & 0o777) == "0o600"

    # Importing registers the patients at the importing organisation: its clinicians may read
    # for the registration period; another organisation's may not.
    ok(cli.run(user_create("cli.doc", "CLI-H1:physician")))
    ok(cli.run(org_create("CLI-H2", "Other Hospital", "hospital", "HK")))
    ok(cli.run(user_create("cli.other", "CLI-H2:physician")))
    question = ["--patient", patient_id, "--action", "read", "--type", "Observation"]
    permitted = cli("access", "explain", "--user", "cli.doc", *question)
    assert permitted.returncode == 0, permitted.stderr
    assert permitted.stdout.startswith("PERMIT")
    assert "care-relationship: registration" in permitted.stdout
    denied = cli("access", "explain", "--user", "cli.other", *question)
    assert denied.stdout.startswith("DENY")
    assert "no-care-relationship" in denied.stdout
    bad = cli("access", "explain", "--user", "cli.doc", "--action", "peek", "--type", "Patient")
    assert bad.returncode == 2
    assert "unknown action" in bad.stderr


def test_user_create_links_a_patient_account(cli: InProcessCli) -> None:
    call = user_create("cli.pat", "CLI-H1:patient", password="a long patient pass phrase")
    linked = cli.run(
        type(call)((*call.args, "--patient", "pat-123"), stdin=call.stdin, env=call.env)
    )
    ok(linked)
    refused = user_create("cli.nurse", "CLI-H1:nurse")
    result = cli.run(type(refused)((*refused.args, "--patient", "pat-1"), stdin=refused.stdin))
    assert result.returncode == 2
    assert "patient link needs" in result.stderr
