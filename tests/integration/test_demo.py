"""``medcollab demo`` (what ``make demo`` runs), end to end over real HTTPS.

The module starts the demo once on an empty data directory and a free port, signs in through the
running server, starts it a second time on the same directory to see the deployment reused, and
finally reads every log line and the raw database files for anything that must not be there.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pyotp
import pytest

from medcollab.kernel.permissions import Role

pytestmark = pytest.mark.slow

_SCRIPT = Path(sys.executable).with_name("medcollab")
#: The console script that `make demo` runs, or the module when this interpreter has none.
MEDCOLLAB = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "medcollab.cli.main"]
#: The acceptance criterion: serving within 2 minutes on a fresh machine.
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
IO_TIMEOUT = 10.0
CLI_TIMEOUT = 60.0
PATIENTS = 50
ORGS = {"DEMO-SH", "DEMO-EU", "DEMO-RES"}
CJK = re.compile(r"[\u4e00-\u9fff]")
LATIN_NAME = re.compile(r"[A-Za-z][A-Za-z .'\-]+")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class DemoRun:
    """One `medcollab demo` process; its output goes to files, so no pipe can fill up."""

    process: subprocess.Popen[bytes]
    stdout_file: Path
    stderr_file: Path
    startup_seconds: float = 0.0

    def stdout(self) -> str:
        return self.stdout_file.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_file.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)


@dataclass
class DemoDeployment:
    root: Path
    port: int
    runs: list[DemoRun] = field(default_factory=list)
    #: Every credential the tests saw (tokens, codes); none may appear in a log line.
    seen_secrets: set[str] = field(default_factory=set)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def cert_file(self) -> Path:
        return self.data_dir / "tls" / "cert.pem"

    def environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("MEDCOLLAB_") and key not in ("FORCE_COLOR", "COLUMNS")
        }
        env.update(
            MEDCOLLAB_DATA_DIR=str(self.data_dir),
            MEDCOLLAB_PORT=str(self.port),
            MEDCOLLAB_CONFIG=str(self.root / "absent.toml"),
            NO_COLOR="1",
        )
        return env

    def start(self) -> DemoRun:
        number = len(self.runs) + 1
        stdout_file = self.root / f"run{number}.stdout"
        stderr_file = self.root / f"run{number}.stderr"
        started = time.monotonic()
        with stdout_file.open("wb") as stdout, stderr_file.open("wb") as stderr:
            process = subprocess.Popen(
                [*MEDCOLLAB, "demo"],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=self.root,
                env=self.environment(),
            )
        run = DemoRun(process, stdout_file, stderr_file)
        self.runs.append(run)
        self._wait_until_healthy(run)
        run.startup_seconds = time.monotonic() - started
        return run

    def running(self) -> DemoRun:
        """The running demo, starting it again if a test stopped it."""
        if self.runs and self.runs[-1].process.poll() is None:
            return self.runs[-1]
        return self.start()

    def stop(self) -> None:
        for run in self.runs:
            run.stop()

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, verify=_trusting(self.cert_file), timeout=IO_TIMEOUT, trust_env=False
        )

    def _wait_until_healthy(self, run: DemoRun) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if run.process.poll() is not None:
                pytest.fail(
                    f"medcollab demo exited with {run.process.returncode}:\n"
                    f"{run.stdout()}\n{run.stderr()}"
                )
            if self.cert_file.exists():
                try:
                    with self.client() as client:
                        if client.get("/healthz").status_code == 200:
                            return
                except httpx.TransportError:
                    pass
            time.sleep(0.25)
        pytest.fail(f"no answer on {self.url}/healthz within {START_TIMEOUT} s:\n{run.stderr()}")


def _trusting(cert_file: Path) -> ssl.SSLContext:
    """A client that trusts only the demo's self-signed certificate and checks the host name."""
    context = ssl.create_default_context(cafile=str(cert_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoDeployment]:
    deployment = DemoDeployment(root=tmp_path_factory.mktemp("demo"), port=_free_port())
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


def _accounts(demo: DemoDeployment) -> list[dict[str, Any]]:
    accounts: list[dict[str, Any]] = json.loads(
        (demo.data_dir / "demo-accounts.json").read_text(encoding="utf-8")
    )
    return accounts


def _account(demo: DemoDeployment, username: str) -> dict[str, Any]:
    return next(a for a in _accounts(demo) if a["username"] == username)


def _printed_rows(stdout: str) -> dict[str, list[str]]:
    """The account lines the demo printed: username -> [password, role, organisation, secret?]."""
    rows: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) in (4, 5) and cells[2] in {role.value for role in Role}:
            rows[cells[0]] = cells[1:]
    return rows


def _totp_secret(otpauth_uri: str) -> str:
    secret: str = pyotp.parse_uri(otpauth_uri).secret
    return secret


# The first run --------------------------------------------------------------------------------


def test_demo_serves_healthz_over_tls_within_two_minutes(demo: DemoDeployment) -> None:
    run = demo.runs[0]
    assert run.startup_seconds < START_TIMEOUT

    with demo.client() as client:
        response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.http_version == "HTTP/1.1"
    assert "strict-transport-security" in response.headers
    # The certificate and its key were generated with the deployment, the key private.
    assert stat.S_IMODE((demo.data_dir / "tls" / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(demo.data_dir.stat().st_mode) == 0o700


def test_demo_prints_banner_url_and_accounts(demo: DemoDeployment) -> None:
    stdout = demo.runs[0].stdout()

    assert stdout.count("DEMO ONLY") >= 2  # Above and below the credentials.
    assert "DEMO ONLY - synthetic accounts and data" in stdout
    assert "with real patients" in stdout
    assert f"Serving on {demo.url}" in stdout
    rows = _printed_rows(stdout)
    for username in ("admin", "sh.physician", "eu.physician", "patient01"):
        account = _account(demo, username)
        assert rows[username][:3] == [account["password"], account["role"], account["org"]]
    assert rows["admin"][1] == Role.PLATFORM_ADMIN.value
    assert rows["sh.physician"][3] == _totp_secret(_account(demo, "sh.physician")["otpauth_uri"])
    assert len(rows["patient01"]) == 3  # A patient has no authenticator.
    assert f"... and {PATIENTS - 3} more patients" in stdout
    assert "demo-accounts.json" in stdout


def test_demo_accounts_file_covers_every_role_and_50_patients(demo: DemoDeployment) -> None:
    path = demo.data_dir / "demo-accounts.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    accounts = _accounts(demo)

    assert {a["org"] for a in accounts} == ORGS
    assert {a["role"] for a in accounts} == {role.value for role in Role}
    patients = [a for a in accounts if a["role"] == Role.PATIENT.value]
    assert len(patients) == PATIENTS
    assert len({a["username"] for a in accounts}) == len(accounts)
    names = [a["display_name"] for a in patients]
    assert sum(bool(CJK.search(name)) for name in names) >= 10  # Faker zh_CN.
    assert sum(bool(LATIN_NAME.fullmatch(name)) for name in names) >= 10  # Faker en_US.
    for account in accounts:
        subject = account["role"] in (Role.PATIENT.value, Role.GUARDIAN.value)
        assert (account["otpauth_uri"] is None) is subject, account["username"]
        assert len(account["password"]) >= 15
    # Two hospitals in different regions and one research partner, as the database has them.
    listing = subprocess.run(
        [*MEDCOLLAB, "org", "list"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=demo.root,
        env=demo.environment(),
        timeout=CLI_TIMEOUT,
        check=True,
    ).stdout
    rows = {line.split()[1]: line for line in listing.splitlines() if "DEMO-" in line}
    assert set(rows) == ORGS
    assert re.search(r"│ hospital +│ CN ", rows["DEMO-SH"])
    assert re.search(r"│ hospital +│ EU ", rows["DEMO-EU"])
    assert "│ research " in rows["DEMO-RES"]


def test_sign_in_as_demo_patient_and_physician(demo: DemoDeployment) -> None:
    demo.running()
    patient = _account(demo, "patient01")
    physician = _account(demo, "sh.physician")
    printed_secret = _printed_rows(demo.runs[0].stdout())["sh.physician"][3]

    with demo.client() as client:
        login = client.post(
            "/auth/login", json={"username": "patient01", "password": patient["password"]}
        )
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        demo.seen_secrets.add(token)
        me = client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200, me.text
        assert me.json()["user"]["username"] == "patient01"
        assert me.json()["user"]["display_name"] == patient["display_name"]
        assert me.json()["roles"] == [Role.PATIENT.value]

        step = client.post(
            "/auth/login", json={"username": "sh.physician", "password": physician["password"]}
        )
        assert step.status_code == 200, step.text
        assert step.json()["mfa_required"] is True
        assert "access_token" not in step.json()
        mfa_token = step.json()["mfa_token"]
        code = pyotp.TOTP(printed_secret).now()
        demo.seen_secrets.add(mfa_token)
        done = client.post("/auth/mfa", json={"mfa_token": mfa_token, "code": code})
        assert done.status_code == 200, done.text
        token = done.json()["access_token"]
        demo.seen_secrets.add(token)
        demo.seen_secrets.update(done.json().get("recovery_codes") or [])
        me = client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200, me.text
        assert me.json()["roles"] == [Role.PHYSICIAN.value]
        assert me.json()["session"]["mfa_verified"] is True

        wrong = client.post(
            "/auth/login", json={"username": "patient02", "password": patient["password"]}
        )
        assert wrong.status_code == 401


# The second run -------------------------------------------------------------------------------


def test_second_run_reuses_the_deployment(demo: DemoDeployment) -> None:
    demo.running()
    kept = [
        demo.data_dir / "demo-accounts.json",
        demo.data_dir / "keys" / "app.secret",
        demo.cert_file,
        demo.data_dir / "tls" / "key.pem",
    ]
    before = {path: path.read_bytes() for path in kept}
    first_rows = _printed_rows(demo.runs[-1].stdout())
    demo.stop()

    second = demo.start()

    assert {path: path.read_bytes() for path in kept} == before
    assert _printed_rows(second.stdout()) == first_rows
    assert "DEMO ONLY" in second.stdout()
    patient = _account(demo, "patient02")
    with demo.client() as client:
        login = client.post(
            "/auth/login", json={"username": "patient02", "password": patient["password"]}
        )
        assert login.status_code == 200, login.text
        demo.seen_secrets.add(login.json()["access_token"])


# After both runs ------------------------------------------------------------------------------


def test_logs_are_json_and_hold_no_credentials_or_names(demo: DemoDeployment) -> None:
    demo.stop()
    accounts = _accounts(demo)
    forbidden = set(demo.seen_secrets)
    for account in accounts:
        forbidden |= {account["password"], account["display_name"]}
        if account["otpauth_uri"]:
            forbidden.add(_totp_secret(account["otpauth_uri"]))

    for run in demo.runs:
        lines = [line for line in run.stderr().splitlines() if line.strip()]
        assert lines, "the server logged nothing"
        for line in lines:
            entry = json.loads(line)
            assert {"time", "level", "logger", "message"} <= set(entry), line
            for secret in forbidden:
                assert secret not in line
        # Standard output is the banner and the accounts, which carry passwords by design; it
        # never carries what the server issued.
        stdout = run.stdout()
        for secret in demo.seen_secrets:
            assert secret not in stdout
        assert not [line for line in stdout.splitlines() if line.startswith("{")]
    assert any(
        '"route":"/auth/login"' in line for run in demo.runs for line in run.stderr().splitlines()
    )


def test_database_holds_no_name_password_or_authenticator_in_clear(demo: DemoDeployment) -> None:
    demo.stop()
    raw = b"".join(
        path.read_bytes() for path in sorted(demo.data_dir.glob("medcollab.db*")) if path.is_file()
    )
    assert len(raw) > 100_000
    accounts = _accounts(demo)
    assert b"patient01" in raw  # Usernames are identifiers, stored as they are.

    for account in accounts:
        assert account["display_name"].encode("utf-8") not in raw, account["username"]
        assert account["password"].encode("utf-8") not in raw, account["username"]
        if account["otpauth_uri"]:
            secret = _totp_secret(account["otpauth_uri"])
            seed = base64.b32decode(secret + "=" * (-len(secret) % 8))
            assert secret.encode() not in raw
            assert seed not in raw
