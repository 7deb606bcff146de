"""Browser tests: Debian's Chromium, driven by Playwright, against a real HTTPS server.

One server process and one browser serve all the browser tests (each test gets fresh browser
contexts, so cookies never leak between tests or between the users of one test). They are scoped
to this package, not the session: Playwright's synchronous API runs an event loop in the main
thread while it is started, which would break the ``asyncio.run`` of tests collected later. The server is
``medcollab.server.build_server`` in a subprocess, with the web pages installed, on a temporary
data directory with SQLite, a generated secret and a self-signed certificate. The test process
seeds data through the same services and repository the server uses, on the same database.

Chromium comes from Debian (``/usr/bin/chromium``), never from ``playwright install``. When it is
missing and the run is root, ``apt-get install chromium`` runs first; if it still cannot be had,
the browser tests fail (they never skip). When a test fails, a screenshot of every page it opened
goes to ``test-artifacts/``. With ``MEDCOLLAB_SCREENSHOT_DIR`` set (``tools/screenshots.py``),
the tests also save the screenshots the README's tour shows.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from medcollab.access.context import AccessContext
from medcollab.access.policy import Purpose
from medcollab.config import Settings
from medcollab.deployment import initialise
from medcollab.identity.models import Organization, OrgKind
from medcollab.identity.services import UserService, operator_agent
from medcollab.jurisdiction.profiles import effective_profile
from medcollab.kernel.permissions import Role
from medcollab.records.repository import RecordRepository
from medcollab.runtime import Runtime
from tests.support.factories import STRONG_PASSWORD, Account, link, make_org, make_user

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
START_TIMEOUT = 30.0
#: Playwright's wait for any one element or navigation; tests stay well under 30 s each.
ACTION_TIMEOUT_MS = 10_000
PATIENT_PASSWORD = "a long patient pass phrase"

SERVER_SNIPPET = """
from medcollab.config import Settings
from medcollab.logging import configure_logging
from medcollab.runtime import Runtime
from medcollab.server import build_server
from medcollab.web import install

settings = Settings()
configure_logging(settings.log_level)
runtime = Runtime.from_settings(settings)
server = build_server(runtime)
# Installing twice is a no-op, so this holds whether or not create_app already adds the pages.
install(server.config.app)
server.run()
"""


# Chromium -------------------------------------------------------------------------------------------


def _ensure_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.geteuid() != 0:
        pytest.fail(
            "Chromium is missing: install Debian's package (apt-get install chromium)",
            pytrace=False,
        )
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.fail("Chromium is missing and apt-get is not available", pytrace=False)
    quiet = subprocess.DEVNULL
    install = [apt, "install", "-y", "-q", "chromium"]
    if subprocess.run(install, stdout=quiet, stderr=quiet, check=False).returncode != 0:
        subprocess.run([apt, "update", "-q"], stdout=quiet, stderr=quiet, check=False)
        subprocess.run(install, stdout=quiet, stderr=quiet, check=False)
    if not CHROMIUM.exists():
        pytest.fail("Chromium could not be installed with apt-get install chromium", pytrace=False)


@pytest.fixture(scope="package")
def playwright_instance() -> Iterator[Playwright]:
    _ensure_chromium()
    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="package")
def browser(playwright_instance: Playwright) -> Iterator[Browser]:
    browser = playwright_instance.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    )
    yield browser
    browser.close()


# The server -----------------------------------------------------------------------------------------


@dataclass
class LiveServer:
    base_url: str
    runtime: Runtime
    log_file: Path

    def logs(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log_file: Path) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # The generated certificate is self-signed.
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited early:\n{log_file.read_text()}", pytrace=False)
        try:
            with urllib.request.urlopen(url + "/healthz", context=context, timeout=2) as answer:  # noqa: S310 - our own https URL.
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"the server did not start:\n{log_file.read_text()}", pytrace=False)


@pytest.fixture(scope="package")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("browser") / "var"
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MEDCOLLAB_")}
    env.update(
        MEDCOLLAB_DATA_DIR=str(data_dir),
        MEDCOLLAB_PORT=str(port),
        MEDCOLLAB_MODE="production",
        # Tree heads every 0.2 s, so an access is verifiable by the time a patient looks.
        MEDCOLLAB_AUDIT_INTEGRATE_SECONDS="0.2",
        MEDCOLLAB_LOG_LEVEL="WARNING",
    )
    settings = Settings(
        mode="production", data_dir=data_dir, port=port, audit_integrate_seconds=0.2
    )
    initialise(settings)
    log_file = data_dir.parent / "server.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER_SNIPPET],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"https://127.0.0.1:{port}"
    runtime = Runtime.from_settings(settings)
    try:
        _wait_until_up(base_url, process, log_file)
        yield LiveServer(base_url, runtime, log_file)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        runtime.close()


# Data -----------------------------------------------------------------------------------------------


def _vital(
    patient_id: str, when: datetime, code: str, value: float, unit: str, ucum: str
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when.isoformat(),
        "valueQuantity": {
            "value": value,
            "unit": unit,
            "system": "http://unitsofmeasure.org",
            "code": ucum,
        },
    }


def _blood_pressure(
    patient_id: str, when: datetime, systolic: float, diastolic: float
) -> dict[str, Any]:
    def component(code: str, value: float) -> dict[str, Any]:
        return {
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "valueQuantity": {
                "value": value,
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        }

    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "85354-9"}],
            "text": "Blood pressure panel",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when.isoformat(),
        "component": [component("8480-6", systolic), component("8462-4", diastolic)],
    }


@dataclass
class World:
    """Accounts and records made for one test, plus the server they live on."""

    server: LiveServer
    tag: str
    accounts: dict[str, Account] = field(default_factory=dict)

    @property
    def runtime(self) -> Runtime:
        return self.server.runtime

    def org(self, code: str, name: str | None = None) -> str:
        """A fresh organisation; returns its code (suffixed so tests never collide)."""
        full = f"{code}-{self.tag}".upper()
        if name is None:
            make_org(self.runtime, full)
        else:
            with self.runtime.database.unit_of_work() as session:
                UserService(session=session, runtime=self.runtime).create_org(
                    code=full,
                    name=name,
                    kind=OrgKind.HOSPITAL,
                    region="CN",
                    agent=operator_agent("test"),
                )
        return full

    def staff(
        self,
        name: str,
        org: str,
        role: Role,
        *,
        provision_mfa: bool = True,
        display_name: str | None = None,
    ) -> Account:
        username = f"{name}.{self.tag}"
        if display_name is None:
            account = make_user(self.runtime, username, [(org, role)], provision_mfa=provision_mfa)
        else:
            with self.runtime.database.unit_of_work() as session:
                created = UserService(session=session, runtime=self.runtime).create_user(
                    username=username,
                    display_name=display_name,
                    password=STRONG_PASSWORD,
                    grants=[(org, role)],
                    agent=operator_agent("test"),
                    provision_mfa=provision_mfa,
                )
                account = Account(
                    username, STRONG_PASSWORD, str(created.user.id), created.otpauth_uri
                )
        self.accounts[name] = account
        return account

    def patient_account(
        self, name: str, org: str, patient_id: str, display_name: str | None = None
    ) -> Account:
        username = f"{name}.{self.tag}"
        with self.runtime.database.unit_of_work() as session:
            created = UserService(session=session, runtime=self.runtime).create_user(
                username=username,
                display_name=display_name or f"Test {username}",
                password=PATIENT_PASSWORD,
                grants=[(org, Role.PATIENT)],
                agent=operator_agent("test"),
            )
            account = Account(username, PATIENT_PASSWORD, str(created.user.id), None)
        link(self.runtime, account.user_id, "patient", patient_id)
        self.accounts[name] = account
        return account

    def repository(self, clinician: Account, org: str) -> tuple[Any, RecordRepository]:
        session = self.runtime.database.session()
        organisation = session.query(Organization).filter_by(code=org).one()
        ctx = AccessContext(
            user_id=uuid.UUID(clinician.user_id),
            org_id=organisation.id,
            roles=frozenset({Role.PHYSICIAN}),
            purpose=Purpose.TREAT,
        )
        repo = RecordRepository(
            session=session,
            ctx=ctx,
            keys=self.runtime.key_service(session),
            keyring=self.runtime.keyring,
            clock=self.runtime.clock,
            settings=self.runtime.settings,
            profile=effective_profile(self.runtime.settings.jurisdiction, None),
        )
        return session, repo

    def register_patient(
        self, clinician: Account, org: str, family: str = "Wang", given: str = "Fang"
    ) -> str:
        """A patient registered by ``clinician`` at ``org`` (a care relationship), with a record
        of conditions, medications, an allergy and two weeks of vital signs."""
        session, repo = self.repository(clinician, org)
        try:
            patient = repo.create(
                {
                    "resourceType": "Patient",
                    "name": [{"family": family, "given": [given]}],
                    "gender": "female",
                    "birthDate": "1968-04-12",
                }
            )
            pid = patient.resource_id
            subject = {"reference": f"Patient/{pid}"}
            repo.create(
                {
                    "resourceType": "Condition",
                    "subject": subject,
                    "code": {"text": "Essential hypertension"},
                    "clinicalStatus": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                "code": "active",
                            }
                        ]
                    },
                    "onsetDateTime": "2019-06-01",
                }
            )
            repo.create(
                {
                    "resourceType": "MedicationRequest",
                    "status": "active",
                    "intent": "order",
                    "subject": subject,
                    "medicationCodeableConcept": {"text": "Amlodipine 5 mg tablet"},
                    "authoredOn": "2024-03-02",
                    "dosageInstruction": [{"text": "One tablet every morning"}],
                }
            )
            repo.create(
                {
                    "resourceType": "AllergyIntolerance",
                    "patient": subject,
                    "code": {"text": "Penicillin"},
                    "criticality": "high",
                    "reaction": [{"manifestation": [{"text": "Hives"}]}],
                }
            )
            start = datetime.now(UTC) - timedelta(days=14)
            for day in range(0, 14, 2):
                when = start + timedelta(days=day, hours=8)
                repo.create(_vital(pid, when, "8867-4", 72 + (day % 5) * 3, "beats/min", "/min"))
                repo.create(_blood_pressure(pid, when, 150 - day * 2, 95 - day))
                repo.create(_vital(pid, when, "8310-5", 36.6 + (day % 3) / 10, "°C", "Cel"))
            session.commit()
        finally:
            session.close()
        return pid


_tags = iter(range(1, 10_000))


@pytest.fixture
def world(live_server: LiveServer) -> World:
    return World(live_server, f"t{next(_tags)}")


# Pages ----------------------------------------------------------------------------------------------


class Pages:
    """Browser pages for one test, each in its own context (its own cookies: its own user)."""

    def __init__(self, browser: Browser, base_url: str) -> None:
        self.browser = browser
        self.base_url = base_url
        self.opened: list[Page] = []
        #: Script errors and console errors (a CSP violation is one), which no page may cause.
        self.errors: list[str] = []
        self._contexts: list[BrowserContext] = []

    def new(self, *, locale: str = "en-GB") -> Page:
        context = self.browser.new_context(
            base_url=self.base_url,
            # The server's certificate is self-signed, generated at its first start.
            ignore_https_errors=True,
            locale=locale,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        self._contexts.append(context)
        page = context.new_page()

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.errors.append(f"console: {message.text}")

        page.on("pageerror", lambda error: self.errors.append(f"script error: {error}"))
        page.on("console", on_console)
        self.opened.append(page)
        return page

    def close(self) -> None:
        for context in self._contexts:
            context.close()


@pytest.fixture
def pages(browser: Browser, live_server: LiveServer) -> Iterator[Pages]:
    opened = Pages(browser, live_server.base_url)
    yield opened
    opened.close()
    # Refused form posts and failed look-ups answer 4xx on purpose; the browser logs those as
    # "Failed to load resource". Anything else (a CSP violation, a script error) is a bug.
    unexpected = [e for e in opened.errors if "Failed to load resource" not in e]
    assert not unexpected, f"the pages logged errors: {unexpected}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Save a screenshot of every page of a failed browser test to ``test-artifacts/``."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    opened = getattr(item, "funcargs", {}).get("pages")
    if not isinstance(opened, Pages):
        return
    ARTIFACTS.mkdir(exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)
    for number, page in enumerate(opened.opened):
        try:
            path = ARTIFACTS / f"{stem}-{number}.png"
            page.screenshot(path=str(path), full_page=True)
            report.sections.append(("screenshot", str(path)))
        except Exception as exc:  # noqa: BLE001 - a closed page must not hide the real failure.
            report.sections.append(("screenshot", f"page {number}: not saved ({exc})"))


def snapshot(page: Page, name: str, *, full_page: bool = False) -> None:
    """A screenshot for the README's tour, only when ``tools/screenshots.py`` asks for them."""
    target = os.environ.get("MEDCOLLAB_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / f"{name}.png"), full_page=full_page)


def verify_history_entry(page: Page, entry: Locator) -> None:
    """Press an access-history entry's "verify" and expect the browser's check to pass.

    An entry joins a signed tree head a fraction of a second after it is written (the server
    integrates every 0.2 s); until then the page offers no button, so it is reloaded until then.
    """
    button = entry.get_by_role("button", name="Verify")
    for _ in range(40):
        if button.count():
            break
        page.wait_for_timeout(250)
        page.reload()
    button.click()
    result = entry.locator(".verify-result")
    expect(result).to_have_attribute("data-state", "verified")
    expect(result).to_contain_text("Verified")


# Signing in -----------------------------------------------------------------------------------------

_last_step: dict[str, int] = {}


def totp_code(account: Account) -> str:
    """The next code for ``account`` that the server will accept (each time step only once)."""
    while True:
        current = int(time.time()) // 30
        last = _last_step.get(account.username, -1)
        # The server accepts the current step and one either side, each only after the last.
        step = max(current, last + 1)
        if step <= current + 1:
            _last_step[account.username] = step
            return account.totp().at(step * 30)
        time.sleep(1)


def sign_in(page: Page, account: Account, *, mfa: bool = True) -> None:
    page.goto("/login")
    page.fill("#username", account.username)
    page.fill("#password", account.password)
    page.click("form[action='/login'] button[type=submit]")
    if mfa:
        page.fill("#code", totp_code(account))
        page.click("form[action='/login/mfa'] button[type=submit]")
        page.wait_for_load_state()
        if page.locator("ol.recovery-codes").count():
            # The first code confirms an authenticator provisioned by an administrator; its
            # recovery codes are shown once.
            page.click("a.button[href]")
    page.wait_for_load_state()
