"""The operator CLI against a real data directory (SQLite, key file, certificate, Argon2, AES-GCM).

Commands run through the real entry point, ``medcollab.cli.main.main(argv)``, with the environment
cleared of MEDCOLLAB_* settings a developer may have exported. Where the process itself matters (the
umask, a real standard-input pipe, a server that must refuse to start) they run as the installed
``medcollab`` command in a subprocess; the rest run in-process, as starting Python costs about a
second per command.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyotp
import pytest
from alembic import command

from medcollab import migrate
from medcollab.audit.events import EventType
from medcollab.cli.main import main
from medcollab.config import Settings
from medcollab.deployment import schema_is_current
from medcollab.errors import AuthenticationFailed
from medcollab.identity.services import AuthService, ClientInfo, IssuedSession, MfaRequired
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime
from tests.support.factories import STRONG_PASSWORD

pytestmark = pytest.mark.slow

_SCRIPT = Path(sys.executable).with_name("medcollab")
#: The console script that `pip install` put next to this interpreter, as an operator runs it.
MEDCOLLAB = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "medcollab.cli.main"]
CLI_TIMEOUT = 60.0
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
FIRST_REVISION = "fe99b2c040fe"  # The identity tables, as released with the foundation.

Result = subprocess.CompletedProcess[str]


@dataclass(frozen=True)
class Call:
    """One command line, with what it reads on standard input and extra environment."""

    args: tuple[str, ...]
    stdin: str = ""
    env: tuple[tuple[str, str], ...] = ()


def call(*args: str, **env: str) -> Call:
    return Call(args, env=tuple(env.items()))


def org_create(code: str, name: str, kind: str, region: str, jurisdiction: str = "") -> Call:
    args = ["org", "create", "--code", code, "--name", name, "--kind", kind, "--region", region]
    if jurisdiction:
        args += ["--jurisdiction", jurisdiction]
    return Call(tuple(args))


def user_create(
    username: str, *grants: str, password: str = STRONG_PASSWORD, display_name: str | None = None
) -> Call:
    args = ["user", "create", "--username", username, "--password-stdin"]
    args += ["--display-name", display_name or f"Test {username}"]
    for grant in grants:
        args += ["--grant", grant]
    return Call(tuple(args), stdin=password + "\n")


def _is_ambient(name: str) -> bool:
    """Variables a developer may have set that would change what the CLI does or prints."""
    return name.startswith("MEDCOLLAB_") or name in ("FORCE_COLOR", "COLUMNS")


def _settings_environment(
    workdir: Path, data_dir: Path, extra: tuple[tuple[str, str], ...]
) -> dict[str, str]:
    env = {
        "MEDCOLLAB_DATA_DIR": str(data_dir),
        "MEDCOLLAB_CONFIG": str(workdir / "absent.toml"),
        "NO_COLOR": "1",
    }
    env.update(extra)
    return env


@dataclass(frozen=True)
class Cli:
    """Runs ``medcollab`` as a subprocess with one data directory, from a directory without TOML."""

    workdir: Path
    data_dir: Path

    @property
    def database(self) -> Path:
        return self.data_dir / "medcollab.db"

    def run(self, command_line: Call) -> Result:
        return subprocess.run(
            [*MEDCOLLAB, *command_line.args],
            input=command_line.stdin,
            capture_output=True,
            text=True,
            encoding="utf-8",
            cwd=self.workdir,
            env={
                **{key: value for key, value in os.environ.items() if not _is_ambient(key)},
                **_settings_environment(self.workdir, self.data_dir, command_line.env),
            },
            timeout=CLI_TIMEOUT,
            check=False,
        )

    def __call__(self, *args: str, **env: str) -> Result:
        return self.run(call(*args, **env))

    def many(self, *calls: Call) -> list[Result]:
        """Run independent commands one after the other; results in the order given."""
        return [self.run(command_line) for command_line in calls]


@dataclass(frozen=True)
class InProcessCli(Cli):
    """Runs ``main(argv)`` in this process: the same environment, stdin and captured output."""

    monkeypatch: pytest.MonkeyPatch | None = None
    capsys: pytest.CaptureFixture[str] | None = None

    def run(self, command_line: Call) -> Result:
        assert self.monkeypatch is not None
        assert self.capsys is not None
        self.capsys.readouterr()
        umask = os.umask(0o022)  # Reading the umask means setting it; put it straight back.
        os.umask(umask)
        with self.monkeypatch.context() as patch:
            for name in [name for name in os.environ if _is_ambient(name)]:
                patch.delenv(name)
            env = _settings_environment(self.workdir, self.data_dir, command_line.env)
            for name, value in env.items():
                patch.setenv(name, value)
            patch.chdir(self.workdir)
            patch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(command_line.stdin.encode())))
            try:
                code = main(list(command_line.args))
            finally:
                os.umask(umask)  # main() narrows it for the rest of its process: this one.
        captured = self.capsys.readouterr()
        return Result(list(command_line.args), code, captured.out, captured.err)

    def process(self) -> Cli:
        """The same deployment, run by the installed command in a subprocess."""
        return Cli(self.workdir, self.data_dir)


def new_cli(root: Path) -> Cli:
    workdir = root / "work"
    workdir.mkdir()
    return Cli(workdir=workdir, data_dir=root / "data")


def ok(result: Result) -> str:
    """The stdout of a command that must have succeeded."""
    assert result.returncode == 0, (result.args, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def error_line(result: Result) -> str:
    """The one-line diagnosis of a refused command: exit 2, nothing on stdout, no traceback."""
    assert result.returncode == 2, (result.args, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "unexpected" not in lines[0]
    return lines[0]


def row_of(listing: str, needle: str) -> str:
    return next(line for line in listing.splitlines() if needle in line)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def query(database: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(database)) as db:
        return list(db.execute(sql))


def audit_bodies(database: Path) -> list[dict[str, Any]]:
    rows = query(database, "SELECT body FROM audit_event ORDER BY seq")
    return [json.loads(body) for (body,) in rows]


def settings_for(data_dir: Path) -> Settings:
    """In-process settings for the same deployment the CLI uses."""
    return Settings(data_dir=data_dir, database_url="", secret_key="", mode="dev")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """One initialised deployment shared by the module; each test uses its own names in it."""
    shared = new_cli(tmp_path_factory.mktemp("cli"))
    ok(shared("init"))
    ok(shared.run(org_create("CLI-H1", "CLI Hospital", "hospital", "CN")))
    return shared


@pytest.fixture
def cli(
    deployment: Cli, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> InProcessCli:
    return InProcessCli(deployment.workdir, deployment.data_dir, monkeypatch, capsys)


# init -------------------------------------------------------------------------------------------


def test_init_creates_a_private_deployment_and_a_second_init_keeps_it(tmp_path: Path) -> None:
    cli = new_cli(tmp_path)
    data = cli.data_dir

    first = ok(cli("init"))

    assert f"data directory   {data.resolve()}\n" in first
    assert "secret           created" in first
    assert "TLS certificate  created" in first
    assert "database         sqlite, schema at the newest migration" in first
    for directory in (data, data / "keys", data / "tls"):
        assert mode_of(directory) == 0o700, directory
    secret_file = data / "keys" / "app.secret"
    cert, key = data / "tls" / "cert.pem", data / "tls" / "key.pem"
    assert mode_of(secret_file) == 0o600
    assert mode_of(key) == 0o600
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    # The umask set by main() makes the database and its WAL companions private too.
    assert cli.database.is_file()
    for path in data.glob("medcollab.db*"):
        assert mode_of(path) == 0o600, path
    secret = secret_file.read_bytes().strip()
    assert len(secret) >= 32
    assert secret.decode() not in first
    before = {path: path.read_bytes() for path in (secret_file, cert, key)}
    assert query(cli.database, "PRAGMA journal_mode") == [("wal",)]
    assert schema_is_current(settings_for(data))

    second = ok(cli("init"))

    assert "secret           kept" in second
    assert "TLS certificate  kept" in second
    assert {path: path.read_bytes() for path in before} == before
    assert query(cli.database, "PRAGMA journal_mode") == [("wal",)]
    assert mode_of(cli.database) == 0o600


def test_init_upgrades_a_deployment_without_losing_rows(tmp_path: Path) -> None:
    """A schema upgrade keeps the rows that reference a table SQLite's batch mode rebuilds.

    Rebuilding a table (copy, drop, rename) with foreign keys enforced would cascade the drop to
    every membership, session and recovery code of every user.
    """
    cli = new_cli(tmp_path)
    cli.data_dir.mkdir(mode=0o700)
    command.upgrade(migrate.alembic_config(f"sqlite:///{cli.database}"), FIRST_REVISION)
    org, user, now = uuid.uuid4().hex, uuid.uuid4().hex, "2026-11-29 10:00:00.000000"
    with closing(sqlite3.connect(cli.database)) as db, db:
        db.execute(
            "INSERT INTO organization (id, code, name, kind, region, created_at) "
            "VALUES (?, 'OLD', 'Old Hospital', 'hospital', 'CN', ?)",
            (org, now),
        )
        db.execute(
            "INSERT INTO user_account (id, username, display_name_enc, password_hash, "
            "password_changed_at, totp_last_step, disabled, created_at) "
            "VALUES (?, 'old.physician', x'00', 'not-a-hash', ?, 0, 0, ?)",
            (user, now, now),
        )
        db.execute(
            "INSERT INTO membership (id, user_id, org_id, role, created_at) "
            "VALUES (?, ?, ?, 'physician', ?)",
            (uuid.uuid4().hex, user, org, now),
        )

    ok(cli("init"))

    assert schema_is_current(settings_for(cli.data_dir))
    assert query(cli.database, "SELECT username FROM user_account") == [("old.physician",)]
    assert query(cli.database, "SELECT role FROM membership") == [("physician",)]
    assert query(cli.database, "PRAGMA foreign_key_check") == []


def test_commands_before_init_say_to_run_init_and_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    missing = InProcessCli(workdir, tmp_path / "data", monkeypatch, capsys)  # Does not exist.
    empty = InProcessCli(workdir, tmp_path / "empty", monkeypatch, capsys)
    empty.data_dir.mkdir()

    results = [
        missing("org", "list"),
        missing("serve"),
        missing("user", "disable", "someone"),
        empty("user", "list"),
        empty.run(user_create("nobody", "X1:patient")),
    ]

    for result in results:
        assert "run `medcollab init`" in error_line(result)
    assert not missing.data_dir.exists()
    assert list(empty.data_dir.iterdir()) == []


# Configuration errors ---------------------------------------------------------------------------


def test_configuration_errors_are_one_line_naming_the_fix(cli: InProcessCli) -> None:
    config = cli.workdir / "typo.toml"
    config.write_text("port = 9443\nsecret_kee = 'typo'\n", encoding="utf-8")
    bad_port, unknown_key, short_secret = cli.many(
        call("org", "list", MEDCOLLAB_PORT="abc"),
        call("org", "list", MEDCOLLAB_CONFIG=str(config)),
        # Dev mode relaxes the serving checks, not what keys can be derived from.
        call("org", "list", MEDCOLLAB_SECRET_KEY="change-me", MEDCOLLAB_MODE="dev"),
    )
    # A real process: should it not refuse, it is killed at the timeout instead of hanging here.
    unsafe = cli.process()(
        "serve",
        MEDCOLLAB_SECRET_KEY="change-me",
        MEDCOLLAB_TLS="false",
        MEDCOLLAB_DEBUG="true",
        MEDCOLLAB_PORT=str(free_port()),
    )

    line = error_line(bad_port)
    assert line.startswith("error: invalid configuration: MEDCOLLAB_PORT: ")
    assert "valid integer" in line
    line = error_line(unknown_key)
    assert "secret_kee: unknown setting in the configuration file" in line
    assert "MEDCOLLAB_CONFIG" in line
    line = error_line(unsafe)
    assert "refusing to start in production mode" in line
    for fix in ("MEDCOLLAB_SECRET_KEY", "MEDCOLLAB_TLS=true", "MEDCOLLAB_DEBUG=false"):
        assert fix in line
    line = error_line(short_secret)
    assert "the application secret is shorter than 16 bytes" in line
    assert "MEDCOLLAB_SECRET_KEY" in line
    for result in (unsafe, short_secret):
        assert "change-me" not in result.stderr


def test_usage_errors_are_one_line(cli: InProcessCli) -> None:
    missing, bad_kind, no_command = cli.many(
        call("org", "create", "--code", "X2"),
        call("org", "create", "--code", "X2", "--name", "X", "--kind", "castle", "--region", "CN"),
        call(),
    )

    assert "Missing option" in error_line(missing)
    assert "Invalid value for '--kind'" in error_line(bad_kind)
    # No command at all: the help, and no pretend "unexpected error".
    assert no_command.returncode == 2
    assert "Usage" in no_command.stdout
    assert "error" not in no_command.stderr


# Organisations ----------------------------------------------------------------------------------


def test_org_create_then_list(cli: InProcessCli) -> None:
    created = ok(
        cli.run(org_create("cli-eu1", "Clinic [/b] :smile:", "clinic", "eu", jurisdiction="gdpr"))
    )

    org_id, code = created.split()
    assert code == "CLI-EU1"
    row = row_of(ok(cli("org", "list")), "CLI-EU1")
    # Whole, though stdout is not a terminal; the name as typed, not read as Rich markup.
    assert str(uuid.UUID(org_id)) in row
    for cell in ("Clinic [/b] :smile:", "clinic", "EU", "GDPR"):
        assert cell in row


def test_duplicate_org_is_refused_in_one_line(cli: InProcessCli) -> None:
    ok(cli.run(org_create("CLI-DUP", "First", "lab", "CN")))

    duplicate = cli.run(org_create("cli-dup", "Second", "lab", "CN"))

    assert error_line(duplicate) == "error: organisation CLI-DUP already exists"
    assert "Second" not in ok(cli("org", "list"))


# Users ------------------------------------------------------------------------------------------


def test_user_create_prints_the_id_and_for_staff_the_enrolment_uri(cli: InProcessCli) -> None:
    # The staff account through a real pipe into the installed command's standard input.
    staff = cli.process().run(user_create("cli.physician", "CLI-H1:physician"))
    patient = cli.run(user_create("cli.patient", "cli-h1:PATIENT"))

    lines = ok(staff).splitlines()
    assert len(lines) == 2
    assert UUID.fullmatch(lines[0])
    assert lines[1].startswith("otpauth://totp/medcollab:cli.physician?")
    totp = pyotp.parse_uri(lines[1])
    assert isinstance(totp, pyotp.TOTP)
    assert totp.issuer == "medcollab"
    assert len(totp.secret) >= 32  # At least 160 bits, as RFC 4226 recommends.
    lines = ok(patient).splitlines()
    assert len(lines) == 1
    assert UUID.fullmatch(lines[0])


def test_user_create_refusals_are_one_line(cli: InProcessCli) -> None:
    base = ("user", "create", "--display-name", "Refused", "--username")
    no_stdin, bad_format, bad_role, no_grant, unknown_org, weak, empty = cli.many(
        call(*base, "cli.r1", "--grant", "CLI-H1:patient"),
        call(*base, "cli.r2", "--grant", "CLI-H1-patient", "--password-stdin"),
        call(*base, "cli.r3", "--grant", "CLI-H1:wizard", "--password-stdin"),
        call(*base, "cli.r4", "--password-stdin"),
        user_create("cli.r5", "NOPE:patient"),
        user_create("cli.r6", "CLI-H1:patient", password="sings at dawn!"),
        user_create("cli.r7", "CLI-H1:patient", password=""),
    )

    line = error_line(no_stdin)
    assert "a password is required" in line
    assert "--password-stdin" in line
    assert "expected ORG:ROLE" in error_line(bad_format)
    line = error_line(bad_role)
    assert "unknown role 'wizard'" in line
    assert ", ".join(role.value for role in Role) in line
    assert "Missing option '--grant'" in error_line(no_grant)
    assert error_line(unknown_org) == "error: no organisation with code 'NOPE'"
    line = error_line(weak)
    assert "password must be at least 15 characters for an account without a second factor" in line
    assert "sings at dawn" not in line
    assert error_line(empty) == "error: no password on standard input"
    listing = ok(cli("user", "list"))
    assert not re.search(r"cli\.r\d", listing)


def _sign_in_with_totp(data_dir: Path, username: str, otpauth_uri: str) -> IssuedSession:
    """Confirm a provisioned authenticator the way its owner does: password, then a TOTP code."""
    runtime = Runtime.from_settings(settings_for(data_dir))
    client = ClientInfo(address="192.0.2.1")
    try:
        with runtime.database.unit_of_work() as session:
            step = AuthService(session=session, runtime=runtime).login(
                username, STRONG_PASSWORD, client
            )
        assert isinstance(step, MfaRequired)
        with runtime.database.unit_of_work() as session:
            return AuthService(session=session, runtime=runtime).complete_mfa(
                step.mfa_token, pyotp.parse_uri(otpauth_uri).now(), client
            )
    finally:
        runtime.database.engine.dispose()


def test_user_list_shows_roles_mfa_and_status(cli: InProcessCli) -> None:
    officer, nurse = cli.many(
        user_create("cli.list.officer", "CLI-H1:security_officer", "CLI-H1:auditor"),
        user_create("cli.list.nurse", "CLI-H1:nurse"),
    )
    _sign_in_with_totp(cli.data_dir, "cli.list.officer", ok(officer).splitlines()[1])
    ok(nurse)

    everyone, one_org, unknown_org = cli.many(
        call("user", "list"),
        call("user", "list", "--org", "cli-h1"),
        call("user", "list", "--org", "NOPE"),
    )

    listing = ok(everyone)
    header = listing.splitlines()[1]
    for column in ("username", "display name", "roles", "MFA", "status", "id"):
        assert column in header
    officer_row = row_of(listing, "cli.list.officer")
    assert "CLI-H1:auditor, CLI-H1:security_officer" in officer_row
    assert re.search(r"│ yes +│ active", officer_row)
    assert "Test cli.list.officer" in officer_row
    assert UUID.search(officer_row)
    nurse_row = row_of(listing, "cli.list.nurse")
    assert "CLI-H1:nurse" in nurse_row
    assert re.search(r"│ no +│ active", nurse_row)
    assert "cli.list.nurse" in ok(one_org)
    assert error_line(unknown_org) == "error: no organisation with code 'NOPE'"


def test_user_disable_by_name_or_id(cli: InProcessCli) -> None:
    first, second = cli.many(
        user_create("cli.disable.a", "CLI-H1:patient"),
        user_create("cli.disable.b", "CLI-H1:patient"),
    )
    by_name, by_id = ok(first).strip(), ok(second).strip()

    results = cli.many(
        call("user", "disable", "CLI.Disable.A"),
        call("user", "disable", by_id),
        call("user", "disable", "cli.nobody"),
        call("user", "disable", str(uuid.uuid4())),
    )

    assert ok(results[0]) == "disabled cli.disable.a\n"
    assert ok(results[1]) == "disabled cli.disable.b\n"
    assert error_line(results[2]) == "error: no such user"
    assert error_line(results[3]) == "error: no such user"
    listing = ok(cli("user", "list"))
    for user_id in (by_name, by_id):
        assert "│ disabled │" in row_of(listing, user_id)


def test_user_reset_mfa_prints_a_new_authenticator(cli: InProcessCli) -> None:
    first = ok(cli.run(user_create("cli.reset", "CLI-H1:pharmacist"))).splitlines()[1]
    _sign_in_with_totp(cli.data_dir, "cli.reset", first)

    second = ok(cli("user", "reset-mfa", "cli.reset")).strip()

    assert second.startswith("otpauth://totp/medcollab:cli.reset?")
    assert pyotp.parse_uri(second).secret != pyotp.parse_uri(first).secret
    # The new authenticator signs in; the old one is forgotten.
    assert _sign_in_with_totp(cli.data_dir, "cli.reset", second).access_token
    with pytest.raises(AuthenticationFailed, match="invalid or expired code"):
        _sign_in_with_totp(cli.data_dir, "cli.reset", first)


# Audit ------------------------------------------------------------------------------------------


def test_every_change_is_audited_as_the_cli_system_actor(cli: InProcessCli) -> None:
    org_id = ok(cli.run(org_create("CLI-AUD", "Audited Org", "partner", "HK"))).split()[0]
    created = cli.run(
        user_create("cli.audited", "CLI-AUD:physician", display_name="Audited Person")
    )
    user_id = ok(created).splitlines()[0]
    ok(cli("user", "reset-mfa", "cli.audited"))
    error_line(cli.run(org_create("CLI-AUD", "Again", "lab", "HK")))
    ok(cli("user", "disable", user_id))

    bodies = audit_bodies(cli.database)

    about_org = [b for b in bodies if b["subject_org"] == org_id]
    about_user = [b for b in bodies if b["subject_user"] == user_id]
    assert [b["type"] for b in about_org] == [EventType.ORG_CREATED.value]
    assert [b["type"] for b in about_user] == [
        EventType.USER_CREATED.value,
        EventType.MFA_RESET.value,
        EventType.USER_DISABLED.value,
    ]
    for body in about_org + about_user:
        assert body["agent"]["role"] == "system:cli"
        assert body["agent"]["user"] is None
        assert body["outcome"] == "0"
    assert about_user[0]["reasons"] == ["role=physician"]
    # The log holds ids and codes, never what was typed.
    text = json.dumps(bodies, ensure_ascii=False)
    for typed in ("Audited Person", "Audited Org", STRONG_PASSWORD):
        assert typed not in text
