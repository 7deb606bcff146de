"""FHIR read throughput: medcollab's secured ``GET /fhir/R4/Observation/{id}`` against a baseline.

In one run, on a two-core machine, with byte-identical response bodies:

* **baseline**: :mod:`bench.baseline_app`, the same framework, database engine and JSON payload with
  no authentication, crypto, policy or audit;
* **secured**: ``medcollab serve`` in dev mode, read with a valid bearer token by a physician whose
  organisation registered the patient (a care relationship), so every request authenticates the
  session, decides the access policy, decrypts the record and appends an audit event;
* **secured+TLS**: the same over HTTPS with the server's own TLS policy (``--no-tls`` skips it);
* **secured c=1**: the secured server with one connection, no concurrent requests (``--no-single``
  skips it), which shows what concurrency costs it;
* **secured, audit off**: a second ``medcollab serve`` over the same data directory, started in dev
  mode with ``MEDCOLLAB_UNSAFE_DISABLE_AUDIT=true`` so that record access appends no audit event
  (``--no-audit-off`` skips it). The secured line's req/s over this one's says what auditing costs
  (issue 4: at most 15% of read throughput); the run first checks that this server appends no
  event for a read and the secured server does.

Baseline and secured use plain HTTP on 127.0.0.1: TLS is excluded from both so that their ratio
measures the application's security work, not the transport's. Each server is one uvicorn worker
pinned to core 0 (``taskset -c 0``); the load generator (Debian's ``wrk --latency``, else an asyncio
client using ``httpx2``) runs on core 1. All servers stay up, idle while another is measured; after
a 2 s warm-up each (discarded), the measured time is split into rounds that visit every line in
turn, alternating the order, so the shared machine's background load falls on all lines alike.

Then an in-process profile (core 0, no socket) drives three ASGI applications: the baseline,
medcollab with its security work stubbed out, and medcollab; and breaks the secured request down
into timed sections, to say what limits it.

Run: ``python -m bench.fhir_read_bench [--seconds 20] [--rounds 4] [--connections 8]``, or through
``python -m bench``. Servers and temporary folders are removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import inspect
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, cast
from unittest import mock

from fastapi import FastAPI

from medcollab.app import create_app
from medcollab.db.session import Database
from medcollab.identity.services import AuthService, ClientInfo
from medcollab.kernel.context import Actor
from medcollab.records import api as records_api
from medcollab.records.repository import StoredResource
from medcollab.runtime import Runtime

REPO: Final = Path(__file__).resolve().parents[1]
SERVER_CPU: Final = 0
CLIENT_CPU: Final = 1
WARMUP_SECONDS: Final = 2.0
STARTUP_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 10.0
#: The fallback client never sends more than this many requests, whatever the duration.
MAX_CLIENT_REQUESTS: Final = 2_000_000
ORG_CODE: Final = "BENCH"
#: The line of the secured server started with auditing of record access switched off.
AUDIT_OFF: Final = "secured, audit off"
#: Issue 4's goal: auditing record access costs at most this share of read throughput.
AUDIT_COST_GOAL_PERCENT: Final = 15.0
USERNAME: Final = "bench.physician"


# Tools ------------------------------------------------------------------------------------------


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def ensure_wrk(*, install: bool) -> bool:
    """True when Debian's ``wrk`` is on PATH, installing it with apt-get if allowed and possible."""
    if have("wrk"):
        return True
    if not install or not have("apt-get") or os.geteuid() != 0:
        return False
    print("wrk is missing: installing Debian's wrk package (apt-get install -y wrk)", flush=True)
    install_wrk = ["apt-get", "install", "-y", "wrk"]
    # The package lists may be missing or stale on a fresh machine: update once, then retry.
    for steps in ([install_wrk], [["apt-get", "update"], install_wrk]):
        for step in steps:
            subprocess.run(
                step, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, check=False
            )
        if have("wrk"):
            return True
    return False


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run on one core with util-linux's taskset, or unpinned where it is missing."""
    if have("taskset") and (os.cpu_count() or 1) > cpu:
        return ["taskset", "-c", str(cpu), *argv]
    return list(argv)


@contextlib.contextmanager
def own_cpu(cpu: int) -> Iterator[None]:
    """Run this process on core ``cpu`` for the duration (the in-process sections)."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) <= cpu:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def unwind_on_signals() -> None:
    """Make SIGTERM, and SIGINT even where a parent ignored it, unwind like Ctrl-C, so that every
    server and temporary folder is cleaned up on the way out."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# Processes --------------------------------------------------------------------------------------


@dataclass
class Service:
    """A server subprocess in its own process group, stopped (TERM, then KILL) on exit."""

    name: str
    process: subprocess.Popen[bytes]
    log_file: Path

    @classmethod
    def start(cls, name: str, argv: Sequence[str], env: dict[str, str], log_file: Path) -> Service:
        with log_file.open("ab") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                # Its own group: a Ctrl-C at the terminal reaches only the benchmark, which then
                # stops its servers itself, in order.
                start_new_session=True,
            )
        return cls(name, process, log_file)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def running(
    name: str, argv: Sequence[str], env: dict[str, str], log_file: Path, ready: Callable[[], bool]
) -> Iterator[Service]:
    service = Service.start(name, argv, env, log_file)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _probe(ready):
            service.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer within {STARTUP_TIMEOUT:.0f} s")
            time.sleep(0.1)
        yield service
    finally:
        service.stop()


def _probe(ready: Callable[[], bool]) -> bool:
    try:
        return ready()
    except OSError:
        return False


def run_bounded(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a client to completion within ``timeout`` seconds; its stdout."""
    with subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    if process.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} failed ({process.returncode}): {stderr.decode(errors='replace')[-2000:]}"
        )
    return stdout.decode("utf-8", errors="replace")


# HTTP -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    base: str,
    method: str,
    path: str,
    *,
    body: object | None = None,
    headers: dict[str, str] | None = None,
    cafile: Path | None = None,
) -> Reply:
    """One request on a fresh connection (setup only; the load generators do the measuring)."""
    host, port = base.split("://", 1)[1].rsplit(":", 1)
    connection: http.client.HTTPConnection
    if base.startswith("https"):
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        connection = http.client.HTTPSConnection(host, int(port), timeout=30, context=context)
    else:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
    sent = dict(headers or {})
    payload = None
    if body is not None:
        payload = json.dumps(body).encode("utf-8")
        sent.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, path, body=payload, headers=sent)
        response = connection.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return Reply(response.status, headers, response.read())
    finally:
        connection.close()


def expect(reply: Reply, status: int, what: str) -> Reply:
    if reply.status != status:
        raise RuntimeError(f"{what}: HTTP {reply.status}: {reply.body[:500]!r}")
    return reply


# The secured deployment -------------------------------------------------------------------------


def _patient() -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.156.10011.1.1", "value": "110101199003074514"}],
        "name": [{"family": "Zhang", "given": ["Wei"]}],
        "telecom": [{"system": "phone", "value": "+86 138 0013 8000"}],
        "gender": "male",
        "birthDate": "1990-03-07",
        "address": [{"text": "上海市浦东新区世纪大道100号", "city": "上海"}],
    }


def _observation(patient_id: str) -> dict[str, object]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                        "display": "Vital Signs",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}],
            "text": "Heart rate",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2026-01-01T08:00:00Z",
        "valueQuantity": {
            "value": 72,
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


@dataclass
class Deployment:
    """A throw-away medcollab deployment (dev mode, SQLite) in ``root``."""

    root: Path
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    #: The second plain-HTTP server, started with auditing of record access switched off.
    audit_off_port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: f"bench {secrets.token_urlsafe(18)} harbour")
    otpauth_uri: str = ""
    token: str = ""
    observation_id: str = ""
    payload: bytes = b""

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _port(self, *, tls: bool, audit: bool) -> int:
        if tls and not audit:
            raise ValueError("the audit-off server is plain HTTP only")
        if tls:
            return self.tls_port
        return self.port if audit else self.audit_off_port

    def environment(self, *, tls: bool = False, audit: bool = True) -> dict[str, str]:
        """The server's environment; ``audit=False`` adds the dev-only switch that skips the audit
        events of record access (Settings.unsafe_disable_audit), for the audit-off line only."""
        # Nothing MEDCOLLAB_ from the caller's shell: a stray MEDCOLLAB_UNSAFE_DISABLE_AUDIT must
        # never reach the servers that are measured with auditing on.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCOLLAB_")}
        env.update(
            MEDCOLLAB_MODE="dev",
            MEDCOLLAB_TLS="true" if tls else "false",
            MEDCOLLAB_DATA_DIR=str(self.data_dir),
            MEDCOLLAB_PORT=str(self._port(tls=tls, audit=audit)),
            MEDCOLLAB_HOST="127.0.0.1",
            # No medcollab.toml from wherever the benchmark was started.
            MEDCOLLAB_CONFIG=str(self.root / "absent.toml"),
            MEDCOLLAB_LOG_LEVEL="INFO",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            NO_COLOR="1",
        )
        if not audit:
            env["MEDCOLLAB_UNSAFE_DISABLE_AUDIT"] = "true"
        return env

    @contextlib.contextmanager
    def settings_environment(self) -> Iterator[None]:
        """This process's environment as the server's, while in-process code builds Settings."""
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.environment())
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def runtime(self) -> Runtime:
        from medcollab.config import Settings  # noqa: PLC0415

        with self.settings_environment():
            return Runtime.from_settings(Settings())

    def initialise(self) -> None:
        """``medcollab init``, then an organisation and a physician through the real services."""
        from medcollab.identity.models import OrgKind  # noqa: PLC0415
        from medcollab.identity.services import UserService, operator_agent  # noqa: PLC0415
        from medcollab.kernel.permissions import Role  # noqa: PLC0415

        run_bounded([sys.executable, "-m", "medcollab.cli.main", "init"], 120, self.environment())
        runtime = self.runtime()
        try:
            with runtime.database.unit_of_work() as session:
                users = UserService(session=session, runtime=runtime)
                users.create_org(
                    code=ORG_CODE,
                    name="Benchmark Hospital",
                    kind=OrgKind.HOSPITAL,
                    region="CN",
                    agent=operator_agent("bench"),
                )
                created = users.create_user(
                    username=USERNAME,
                    display_name="Benchmark Physician",
                    password=self.password,
                    grants=[(ORG_CODE, Role.PHYSICIAN)],
                    agent=operator_agent("bench"),
                )
            assert created.otpauth_uri is not None  # noqa: S101 - staff get an authenticator.
            self.otpauth_uri = created.otpauth_uri
        finally:
            runtime.close()

    def serve_argv(self) -> list[str]:
        return pinned(SERVER_CPU, [sys.executable, "-m", "medcollab.cli.main", "serve"])

    def base(self, *, tls: bool = False, audit: bool = True) -> str:
        scheme = "https" if tls else "http"
        return f"{scheme}://127.0.0.1:{self._port(tls=tls, audit=audit)}"

    @property
    def cert_file(self) -> Path:
        return self.data_dir / "tls" / "cert.pem"

    def healthy(self, *, tls: bool = False, audit: bool = True) -> Callable[[], bool]:
        def probe() -> bool:
            cafile = self.cert_file if tls else None
            if tls and not self.cert_file.is_file():
                return False
            base = self.base(tls=tls, audit=audit)
            return request(base, "GET", "/healthz", cafile=cafile).status == 200

        return probe

    def sign_in_and_seed(self) -> None:
        """Password + TOTP sign-in, then a registered Patient and one Observation over HTTP."""
        import pyotp  # noqa: PLC0415

        base = self.base()
        login = expect(
            request(
                base, "POST", "/auth/login", body={"username": USERNAME, "password": self.password}
            ),
            200,
            "login",
        ).json()
        authenticator = pyotp.parse_uri(self.otpauth_uri)
        if not isinstance(authenticator, pyotp.TOTP):
            raise TypeError("the provisioned authenticator is not TOTP")
        code = authenticator.now()
        tokens = expect(
            request(
                base, "POST", "/auth/mfa", body={"mfa_token": login["mfa_token"], "code": code}
            ),
            200,
            "MFA",
        ).json()
        self.token = tokens["access_token"]
        fhir = {**self.bearer(), "Content-Type": "application/fhir+json"}
        patient = expect(
            request(base, "POST", "/fhir/R4/Patient", body=_patient(), headers=fhir),
            201,
            "create Patient",
        ).json()
        observation = expect(
            request(
                base,
                "POST",
                "/fhir/R4/Observation",
                body=_observation(patient["id"]),
                headers=fhir,
            ),
            201,
            "create Observation",
        ).json()
        self.observation_id = observation["id"]
        self.payload = expect(
            request(base, "GET", self.read_path(), headers=self.bearer()), 200, "read Observation"
        ).body

    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def audit_events(self) -> int:
        """How many audit events the deployment holds (read in process, outside any load)."""
        from sqlalchemy import func, select  # noqa: PLC0415

        from medcollab.audit.models import AuditEventRecord  # noqa: PLC0415

        runtime = self.runtime()
        try:
            with runtime.database.unit_of_work() as session:
                return session.scalar(select(func.count()).select_from(AuditEventRecord)) or 0
        finally:
            runtime.close()

    def check_audit_switch(self) -> None:
        """The audit-off server answers the same bytes and appends no audit event for a read; the
        secured server appends one. Otherwise the audit on/off ratio would measure nothing."""
        before = self.audit_events()
        reply = expect(
            request(self.base(audit=False), "GET", self.read_path(), headers=self.bearer()),
            200,
            "read Observation (audit off)",
        )
        if reply.body != self.payload:
            raise RuntimeError("the audit-off server's payload differs from the secured server's")
        unaudited = self.audit_events()
        expect(
            request(self.base(), "GET", self.read_path(), headers=self.bearer()),
            200,
            "read Observation",
        )
        audited = self.audit_events()
        if unaudited != before:
            raise RuntimeError(
                f"the audit-off server appended {unaudited - before} audit events for one read: "
                "MEDCOLLAB_UNSAFE_DISABLE_AUDIT did not take effect"
            )
        if audited <= unaudited:
            raise RuntimeError("the secured server appended no audit event for a read")

    def read_path(self) -> str:
        return f"/fhir/R4/Observation/{self.observation_id}"


# Load generation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    name: str
    client: str
    seconds: float
    connections: int
    requests: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    #: Throughput of each round, to show how steady the machine was.
    round_rps: tuple[float, ...] = ()

    @property
    def server_us_per_request(self) -> float:
        """The server's time per request at saturation: one core, so 1/throughput."""
        return 1e6 / self.requests_per_second if self.requests_per_second else float("nan")

    @classmethod
    def combine(cls, rounds: Sequence[LoadResult]) -> LoadResult:
        """Rounds of one line: throughput over their total time; latency percentiles are the
        median of the rounds' own (exact within a round, approximate across rounds)."""
        first = rounds[0]
        seconds = sum(r.seconds for r in rounds)
        requests = sum(r.requests for r in rounds)
        return cls(
            name=first.name,
            client=first.client,
            seconds=seconds,
            connections=first.connections,
            requests=requests,
            requests_per_second=requests / seconds if seconds else 0.0,
            p50_ms=statistics.median(r.p50_ms for r in rounds),
            p99_ms=statistics.median(r.p99_ms for r in rounds),
            errors=sum(r.errors for r in rounds),
            round_rps=tuple(r.requests_per_second for r in rounds),
        )


_UNITS: Final = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_DURATION: Final = r"([\d.]+)(us|ms|s|m)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(output: str, name: str, connections: int) -> LoadResult:
    """Requests/s, p50, p99 and errors from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(rf"^\s+50%\s+{_DURATION}", output, re.MULTILINE)
    p99 = re.search(rf"^\s+99%\s+{_DURATION}", output, re.MULTILINE)
    total = re.search(r"(\d+) requests in " + _DURATION, output)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return LoadResult(
        name=name,
        client="wrk",
        seconds=_ms(total.group(2), total.group(3)) / 1e3,
        connections=connections,
        requests=int(total.group(1)),
        requests_per_second=float(rps.group(1)),
        p50_ms=_ms(*p50.groups()),
        p99_ms=_ms(*p99.groups()),
        errors=errors,
    )


def _lua_string(value: str) -> str:
    if not re.fullmatch(r"[\x20-\x7e]*", value) or "\\" in value or '"' in value:
        raise ValueError("header values must be plain printable ASCII")
    return f'"{value}"'


@dataclass(frozen=True)
class LoadPlan:
    seconds: float
    connections: int
    use_wrk: bool
    workdir: Path


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: dict[str, str]
    cafile: Path | None = None
    #: Overrides the plan's number of connections.
    connections: int | None = None


def measure(plan: LoadPlan, targets: Sequence[Target], rounds: int) -> list[LoadResult]:
    """A 2 s warm-up per target (discarded), then ``rounds`` rounds that visit every target in
    turn, alternating the order, so that the machine's background load falls on all of them
    alike; each target gets ``plan.seconds`` in all."""
    for target in targets:
        load(plan, target, WARMUP_SECONDS)
    per_round = max(1.0, plan.seconds / rounds)
    results: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
    for number in range(rounds):
        order = targets if number % 2 == 0 else list(reversed(targets))
        for target in order:
            results[target.name].append(load(plan, target, per_round))
    combined = [LoadResult.combine(results[t.name]) for t in targets]
    for result in combined:
        if result.errors:
            print(f"  warning: {result.name}: {result.errors} failed requests", flush=True)
    return combined


def load(plan: LoadPlan, target: Target, seconds: float) -> LoadResult:
    name, url, headers, cafile = target.name, target.url, target.headers, target.cafile
    connections = target.connections or plan.connections
    duration = max(1, round(seconds))
    if plan.use_wrk:
        # Headers go in a script (mode 0600) rather than argv, where `ps` would show the token.
        script = plan.workdir / f"wrk-{uuid.uuid4().hex}.lua"
        lines = [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write("\n".join(lines) + "\n")
        try:
            argv = pinned(
                CLIENT_CPU,
                [
                    "wrk",
                    "-t1",
                    f"-c{connections}",
                    f"-d{duration}s",
                    "--timeout",
                    "10s",
                    "--latency",
                    "-s",
                    str(script),
                    url,
                ],
            )
            output = run_bounded(argv, duration + 60)
        finally:
            script.unlink(missing_ok=True)
        return parse_wrk(output, name, connections)
    env = dict(os.environ)
    env["BENCH_HEADERS"] = json.dumps(headers)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    argv = pinned(
        CLIENT_CPU,
        [
            sys.executable,
            "-m",
            "bench.fhir_read_bench",
            "client",
            "--url",
            url,
            "--seconds",
            str(duration),
            "--connections",
            str(connections),
            *(["--cafile", str(cafile)] if cafile else []),
        ],
    )
    measured = json.loads(run_bounded(argv, duration + 60, env))
    return LoadResult(name=name, client="httpx2", connections=connections, **measured)


async def _client_loop(
    url: str, seconds: float, connections: int, headers: dict[str, str], cafile: str | None
) -> dict[str, Any]:
    import httpx2  # noqa: PLC0415 - the project's test dependency, needed only in the fallback.

    latencies: list[float] = []
    errors = 0
    verify: Any = ssl.create_default_context(cafile=cafile) if cafile else True
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx2.AsyncClient(
        headers=headers, limits=limits, timeout=10.0, verify=verify
    ) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline and len(latencies) < MAX_CLIENT_REQUESTS:
                begin = time.perf_counter()
                try:
                    response = await client.get(url)
                    await response.aread()
                    ok = response.status_code == 200
                except Exception:  # noqa: BLE001 - a failed request is counted, not fatal.
                    ok = False
                latencies.append(time.perf_counter() - begin)
                errors += not ok

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "seconds": elapsed,
        "requests": len(latencies),
        "requests_per_second": len(latencies) / elapsed,
        "p50_ms": quantiles[49] * 1e3,
        "p99_ms": quantiles[98] * 1e3,
        "errors": errors,
    }


def client_main(argv: Sequence[str]) -> None:
    """The fallback load generator: ``python -m bench.fhir_read_bench client --url ...``."""
    parser = argparse.ArgumentParser(prog="bench.fhir_read_bench client")
    parser.add_argument("--url", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--cafile", default=None)
    args = parser.parse_args(argv)
    headers = json.loads(os.environ.get("BENCH_HEADERS", "{}"))
    result = asyncio.run(
        _client_loop(args.url, args.seconds, args.connections, headers, args.cafile)
    )
    print(json.dumps(result))


# In-process profile -----------------------------------------------------------------------------


class Sections:
    """Inclusive wall and thread-CPU time and call counts of named functions, patched in for the
    profile only (and removed by :meth:`restore`)."""

    def __init__(self) -> None:
        self.wall: defaultdict[str, float] = defaultdict(float)
        self.cpu: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._patches: list[tuple[Any, str, Any, bool]] = []

    def wrap(self, owner: Any, attribute: str, label: str) -> None:
        """Time ``owner.attribute`` (a plain function or method, called in one thread); a name
        the product no longer has is left out, and its section reads zero."""
        if not hasattr(owner, attribute):
            return
        static = inspect.getattr_static(owner, attribute)
        restore_by_setting = not isinstance(owner, type) or attribute in vars(owner)
        original = getattr(owner, attribute)
        wall, cpu, calls = self.wall, self.cpu, self.calls

        def timed(*args: Any, **kwargs: Any) -> Any:
            wall_start, cpu_start = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                wall[label] += time.perf_counter() - wall_start
                cpu[label] += time.thread_time() - cpu_start
                calls[label] += 1

        setattr(owner, attribute, timed)
        self._patches.append((owner, attribute, static, restore_by_setting))

    def restore(self) -> None:
        for owner, attribute, static, restore_by_setting in reversed(self._patches):
            if restore_by_setting:
                setattr(owner, attribute, static)
            else:
                delattr(owner, attribute)
        self._patches.clear()


class AsgiDriver:
    """Sends GET requests straight into an ASGI application: no socket, no HTTP parser."""

    def __init__(self, app: Any, path: str, headers: dict[str, str]) -> None:
        self.app = app
        self.scope_headers = [(b"host", b"127.0.0.1"), (b"user-agent", b"bench")] + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]
        self.path = path

    async def get(self) -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode("ascii"),
            "query_string": b"",
            "root_path": "",
            "headers": self.scope_headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        done = asyncio.Event()
        delivered = False
        status = 0
        body = bytearray()

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    done.set()

        await self.app(scope, receive, send)
        done.set()
        return status, bytes(body)

    async def timed(self, iterations: int, budget: float) -> tuple[int, float, float]:
        """(requests, wall seconds, process CPU seconds) for up to ``iterations`` requests or
        ``budget`` seconds, whichever comes first."""
        start, cpu_start = time.perf_counter(), time.process_time()
        deadline = start + budget
        count = 0
        while count < iterations and time.perf_counter() < deadline:
            status, body = await self.get()
            if status != 200:
                raise RuntimeError(f"in-process request failed: HTTP {status}: {body[:300]!r}")
            count += 1
        return count, time.perf_counter() - start, time.process_time() - cpu_start


@dataclass
class Profile:
    requests: int
    #: Best (least disturbed) per-request wall and CPU time of three alternating passes.
    baseline_us: float
    baseline_cpu_us: float
    stubbed_us: float
    stubbed_cpu_us: float
    secured_us: float
    secured_cpu_us: float
    sections_us: dict[str, float]
    sections_cpu_us: dict[str, float]
    calls_per_request: dict[str, float]
    sql_statements: float
    sql_us: float
    thread_hops: float
    baseline_thread_hops: float
    thread_hop_us: float


#: (label, depth) in the order printed; the labels are the keys of Profile.sections_us.
SECTION_ORDER: Final = (
    ("authenticate: token HMAC, session + user rows", 1),
    ("RecordRepository setup: organisation, access subject", 1),
    ("repo.read", 1),
    ("head + current version rows", 2),
    ("data key: SELECT + AES-GCM unwrap", 2),
    ("AES-GCM unseal of the record", 2),
    ("policy facts: consents, relationships, grants", 2),
    ("policy decision", 2),
    ("audit append: event body + INSERT", 2),
    ("commit: WAL append + fsync (synchronous=FULL)", 1),
    ("render FHIR JSON", 1),
    ("access log line: redaction + JSON + write", 1),
)


def _patch_sections(sections: Sections) -> None:
    import logging  # noqa: PLC0415

    from sqlalchemy.orm import Session  # noqa: PLC0415

    from medcollab.audit.services import AuditLog  # noqa: PLC0415
    from medcollab.identity.services import AuthService  # noqa: PLC0415
    from medcollab.keys.services import KeyService  # noqa: PLC0415
    from medcollab.logging import RedactionFilter  # noqa: PLC0415
    from medcollab.records import api as records_api  # noqa: PLC0415
    from medcollab.records import repository as records_repository  # noqa: PLC0415

    repo = records_repository.RecordRepository
    label = [name for name, _ in SECTION_ORDER]
    sections.wrap(AuthService, "authenticate", label[0])
    sections.wrap(repo, "__init__", label[1])
    sections.wrap(repo, "read", label[2])
    sections.wrap(repo, "_head", label[3])
    sections.wrap(repo, "_version_row", label[3])
    # Both ways to a data key (by id, and by a ciphertext's key id with an owner check) end here.
    sections.wrap(KeyService, "_key", label[4])
    sections.wrap(records_repository, "unseal", label[5])
    sections.wrap(repo, "_patient_facts", label[6])
    sections.wrap(records_repository, "decide", label[7])
    sections.wrap(AuditLog, "append", label[8])
    sections.wrap(Session, "commit", label[9])
    sections.wrap(records_api.FhirResponse, "render", label[10])
    sections.wrap(RedactionFilter, "filter", label[11])
    sections.wrap(logging.StreamHandler, "emit", label[11])


@contextlib.contextmanager
def _json_logging_to(path: Path) -> Iterator[None]:
    """medcollab's redacting JSON log handler, as `serve` installs it, writing to ``path``."""
    import logging  # noqa: PLC0415

    from medcollab.logging import configure_logging  # noqa: PLC0415

    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    with path.open("a", encoding="utf-8") as stream:
        with contextlib.redirect_stderr(stream):
            configure_logging("INFO")
        try:
            yield
        finally:
            for handler in [h for h in root.handlers if h not in before]:
                root.removeHandler(handler)
                handler.close()
            root.setLevel(level)


async def _thread_hop_seconds(iterations: int, budget: float) -> float:
    import anyio.to_thread  # noqa: PLC0415

    def nothing() -> None:
        return None

    for _ in range(100):
        await anyio.to_thread.run_sync(nothing)
    start = time.perf_counter()
    deadline = start + budget
    count = 0
    while count < iterations and time.perf_counter() < deadline:
        await anyio.to_thread.run_sync(nothing)
        count += 1
    return (time.perf_counter() - start) / max(count, 1)


class _StubRepository:
    """Stands in for RecordRepository: the stored resource of a real read, without the read."""

    def __init__(self, stored: StoredResource) -> None:
        self.stored = stored

    def read(self, *_args: Any) -> StoredResource:
        return self.stored


class _StubSession:
    def get(self, *_args: Any) -> None:
        return None


class _StubDatabase:
    @contextlib.contextmanager
    def unit_of_work(self) -> Iterator[_StubSession]:
        yield _StubSession()


@dataclass
class StubbedApp:
    """medcollab's app, its routes, dependencies, thread-pool hops, middleware and access log
    unchanged, with the security work behind the dependencies stubbed out: no database, no
    session lookup, no policy, crypto or audit. The stubs are patched in only while
    :meth:`stubbed` is active (FastAPI's ``dependency_overrides`` would not do: it analyses an
    override's signature again on every request, which costs more than the work it replaces)."""

    app: FastAPI
    actor: Actor
    stored: StoredResource

    @classmethod
    def build(cls, runtime: Runtime, actor: Actor, stored: StoredResource) -> StubbedApp:
        stub_runtime = Runtime(
            settings=runtime.settings,
            database=cast(Database, _StubDatabase()),
            keyring=runtime.keyring,
            clock=runtime.clock,
            hasher=runtime.hasher,
            provider=runtime.key_provider,
        )
        return cls(create_app(stub_runtime), actor, stored)

    @contextlib.contextmanager
    def stubbed(self) -> Iterator[None]:
        actor, stored = self.actor, self.stored

        def authenticate(*_args: Any, **_kwargs: Any) -> Actor:
            return actor

        def repository(**_kwargs: Any) -> _StubRepository:
            return _StubRepository(stored)

        with (
            mock.patch.object(AuthService, "authenticate", authenticate),
            mock.patch.object(records_api, "RecordRepository", repository),
        ):
            yield


def _real_read(runtime: Runtime, deployment: Deployment) -> tuple[Actor, StoredResource]:
    """One real authenticated read, outside the framework: the stubs' actor and resource."""
    with runtime.database.unit_of_work() as session:
        actor = AuthService(session=session, runtime=runtime).authenticate(
            deployment.token, ClientInfo("127.0.0.1", "bench")
        )
        ctx = records_api.access_context(actor)
        repository = records_api.record_repository(ctx, session, runtime)
        stored = repository.read("Observation", deployment.observation_id)
    return actor, stored


class _Counters:
    """SQL statements (and their time in the driver) and thread-pool hops, while installed."""

    def __init__(self) -> None:
        self.statements = 0
        self.sql_seconds = 0.0
        self.hops: Counter[str] = Counter()
        self.app = "secured"
        self._started: list[float] = []

    def _before(self, *_args: Any) -> None:
        self._started.append(time.perf_counter())

    def _after(self, *_args: Any) -> None:
        self.statements += 1
        self.sql_seconds += time.perf_counter() - self._started.pop()

    @contextlib.contextmanager
    def installed(self, engine: Any) -> Iterator[None]:
        import anyio.to_thread  # noqa: PLC0415
        from sqlalchemy import event  # noqa: PLC0415

        real_run_sync = anyio.to_thread.run_sync

        async def counted_run_sync(*args: Any, **kwargs: Any) -> Any:
            self.hops[self.app] += 1
            return await real_run_sync(*args, **kwargs)

        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        anyio.to_thread.run_sync = counted_run_sync  # type: ignore[assignment]
        try:
            yield
        finally:
            anyio.to_thread.run_sync = real_run_sync
            event.remove(engine, "before_cursor_execute", self._before)
            event.remove(engine, "after_cursor_execute", self._after)


def _best_of_three(
    drivers: dict[str, AsgiDriver], stubbed: StubbedApp, iterations: int, budget: float
) -> dict[str, tuple[float, float]]:
    """Per-request (wall, CPU) seconds of each app: the best of three alternating passes."""

    def run_pass(name: str, requests: int, seconds: float) -> tuple[int, float, float]:
        with stubbed.stubbed() if name == "stubbed" else contextlib.nullcontext():
            return asyncio.run(drivers[name].timed(requests, seconds))

    best = {name: (float("inf"), float("inf")) for name in drivers}
    for name in drivers:
        run_pass(name, min(100, iterations), budget / 10)
    for _ in range(3):
        for name in drivers:
            count, wall, cpu = run_pass(name, iterations // 3 or 1, budget / 9)
            count = max(count, 1)
            best[name] = (min(best[name][0], wall / count), min(best[name][1], cpu / count))
    return best


def profile(deployment: Deployment, baseline_db: Path, iterations: int, budget: float) -> Profile:
    """Drive the applications in process on core 0 and time the secured path's sections.

    Three applications answer the same GET: the baseline, medcollab with its security work stubbed
    out, and medcollab. They run in three alternating passes (each up to a third of
    ``iterations`` requests and of ``budget`` seconds), and each keeps its best pass. Then one
    more pass of the secured app, with timers patched in, breaks its time down.
    """
    from bench import baseline_app  # noqa: PLC0415

    runtime = deployment.runtime()
    sections = Sections()
    counters = _Counters()
    path = deployment.read_path()
    try:
        with own_cpu(SERVER_CPU), _json_logging_to(deployment.root / "profile.log"):
            baseline_application = baseline_app.create_app(baseline_db)
            actor, stored = _real_read(runtime, deployment)
            stubbed = StubbedApp.build(runtime, actor, stored)
            drivers = {
                "baseline": AsgiDriver(baseline_application, path, {}),
                "stubbed": AsgiDriver(stubbed.app, path, deployment.bearer()),
                "secured": AsgiDriver(create_app(runtime), path, deployment.bearer()),
            }
            best = _best_of_three(drivers, stubbed, iterations, budget)
            hop_seconds = asyncio.run(_thread_hop_seconds(iterations, budget / 6))

            # The breakdown, in a further pass so that the patches do not tax the totals above.
            _patch_sections(sections)
            try:
                with counters.installed(runtime.database.engine):
                    secured_count, _, _ = asyncio.run(drivers["secured"].timed(iterations, budget))
                    counters.app = "baseline"
                    baseline_count, _, _ = asyncio.run(drivers["baseline"].timed(100, budget / 10))
            finally:
                sections.restore()
            baseline_application.state.engine.dispose()
    finally:
        runtime.close()
    n = max(secured_count, 1)
    return Profile(
        requests=secured_count,
        baseline_us=best["baseline"][0] * 1e6,
        baseline_cpu_us=best["baseline"][1] * 1e6,
        stubbed_us=best["stubbed"][0] * 1e6,
        stubbed_cpu_us=best["stubbed"][1] * 1e6,
        secured_us=best["secured"][0] * 1e6,
        secured_cpu_us=best["secured"][1] * 1e6,
        sections_us={k: v * 1e6 / n for k, v in sections.wall.items()},
        sections_cpu_us={k: v * 1e6 / n for k, v in sections.cpu.items()},
        calls_per_request={k: v / n for k, v in sections.calls.items()},
        sql_statements=counters.statements / n,
        sql_us=counters.sql_seconds * 1e6 / n,
        thread_hops=counters.hops["secured"] / n,
        baseline_thread_hops=counters.hops["baseline"] / max(baseline_count, 1),
        thread_hop_us=hop_seconds * 1e6,
    )


# The benchmark ----------------------------------------------------------------------------------


@dataclass
class ReadBenchResult:
    loads: list[LoadResult]
    profile: Profile | None
    notes: list[str]

    def line(self, name: str) -> LoadResult | None:
        return next((r for r in self.loads if r.name == name), None)

    @property
    def ratio(self) -> float | None:
        secured, baseline = self.line("secured"), self.line("baseline")
        if not secured or not baseline or not baseline.requests_per_second:
            return None
        return secured.requests_per_second / baseline.requests_per_second

    @property
    def audit_ratio(self) -> float | None:
        """Secured throughput with auditing on over the same with it off (1.0: audit is free)."""
        audited, unaudited = self.line("secured"), self.line(AUDIT_OFF)
        if not audited or not unaudited or not unaudited.requests_per_second:
            return None
        return audited.requests_per_second / unaudited.requests_per_second

    @property
    def audit_cost_percent(self) -> float | None:
        """The share of the audit-off throughput that auditing costs."""
        ratio = self.audit_ratio
        return None if ratio is None else 100 * (1 - ratio)

    def to_json(self) -> dict[str, Any]:
        return {
            "loads": [asdict(r) for r in self.loads],
            "ratio_secured_to_baseline": self.ratio,
            "ratio_audit_on_to_off": self.audit_ratio,
            "audit_cost_percent": self.audit_cost_percent,
            "profile": asdict(self.profile) if self.profile else None,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class ReadBenchConfig:
    seconds: float = 20.0
    rounds: int = 4
    connections: int = 8
    tls: bool = True
    #: Also measure the secured server with one connection (no concurrent requests).
    single_connection: bool = True
    #: Also measure a second secured server with auditing of record access switched off.
    audit_off: bool = True
    install: bool = True
    profile_iterations: int = 2000
    profile_budget: float = 30.0


def run(config: ReadBenchConfig) -> ReadBenchResult:
    from bench import baseline_app  # noqa: PLC0415

    notes: list[str] = []
    if not have("taskset") or (os.cpu_count() or 1) < 2:
        notes.append("taskset or a second core is missing: server and client are NOT pinned")
    use_wrk = ensure_wrk(install=config.install)
    if not use_wrk:
        notes.append("wrk unavailable: load from the httpx2 asyncio client (slower; ratios only)")
    with tempfile.TemporaryDirectory(prefix="medcollab-bench-read-") as tmp:
        root = Path(tmp)
        plan = LoadPlan(config.seconds, config.connections, use_wrk, root)
        deployment = Deployment(root)
        print(f"fhir_read: initialising a dev deployment in {root}", flush=True)
        deployment.initialise()
        baseline_db = root / "baseline.db"
        baseline_base = f"http://127.0.0.1:{free_port()}"
        with contextlib.ExitStack() as servers:
            # All servers stay up (each on core 0, idle while another is measured), so that the
            # rounds can alternate between them.
            servers.enter_context(
                running(
                    "medcollab (HTTP)",
                    deployment.serve_argv(),
                    deployment.environment(),
                    root / "secured.log",
                    deployment.healthy(),
                )
            )
            deployment.sign_in_and_seed()
            baseline_app.create_store(baseline_db, deployment.observation_id, deployment.payload)

            def baseline_ready() -> bool:
                return request(baseline_base, "GET", deployment.read_path()).status == 200

            baseline_argv = [sys.executable, "-m", "bench.baseline_app", "--db", str(baseline_db)]
            baseline_argv += ["--port", baseline_base.rsplit(":", 1)[1]]
            servers.enter_context(
                running(
                    "baseline",
                    pinned(SERVER_CPU, baseline_argv),
                    deployment.environment(),
                    root / "baseline.log",
                    baseline_ready,
                )
            )
            reply = expect(request(baseline_base, "GET", deployment.read_path()), 200, "baseline")
            if reply.body != deployment.payload:
                raise RuntimeError("the baseline's payload differs from the secured server's")
            targets = [
                Target("secured", deployment.base() + deployment.read_path(), deployment.bearer())
            ]
            if config.audit_off:
                # The same data directory, read by the same session token: only the audit events
                # of record access (and the commit that writes them) are left out.
                servers.enter_context(
                    running(
                        "medcollab (HTTP, audit off)",
                        deployment.serve_argv(),
                        deployment.environment(audit=False),
                        root / "secured-audit-off.log",
                        deployment.healthy(audit=False),
                    )
                )
                deployment.check_audit_switch()
                targets.append(
                    Target(
                        AUDIT_OFF,
                        deployment.base(audit=False) + deployment.read_path(),
                        deployment.bearer(),
                    )
                )
            targets.append(Target("baseline", baseline_base + deployment.read_path(), {}))
            if config.tls:
                servers.enter_context(
                    running(
                        "medcollab (HTTPS)",
                        deployment.serve_argv(),
                        deployment.environment(tls=True),
                        root / "secured-tls.log",
                        deployment.healthy(tls=True),
                    )
                )
                targets.append(
                    Target(
                        "secured+TLS",
                        deployment.base(tls=True) + deployment.read_path(),
                        deployment.bearer(),
                        deployment.cert_file,
                    )
                )
            if config.single_connection and config.connections != 1:
                secured_url = deployment.base() + deployment.read_path()
                targets.append(
                    Target("secured c=1", secured_url, deployment.bearer(), connections=1)
                )
            print(
                f"fhir_read: payload {len(deployment.payload)} B, byte-identical from both; "
                f"{config.seconds:.0f} s per line in {config.rounds} alternating rounds, "
                f"{config.connections} connections",
                flush=True,
            )
            loads = measure(plan, targets, config.rounds)
        result_profile = None
        if config.profile_iterations > 0:
            print(
                f"fhir_read: in-process profile (up to {config.profile_iterations} requests "
                f"or {config.profile_budget:.0f} s per pass)",
                flush=True,
            )
            result_profile = profile(
                deployment, baseline_db, config.profile_iterations, config.profile_budget
            )
    return ReadBenchResult(loads, result_profile, notes)


def report(result: ReadBenchResult) -> None:
    print()
    print("FHIR read: GET /fhir/R4/Observation/{id}, one uvicorn worker on core 0, load on core 1")
    print(
        f"  {'':19}{'client':>7}{'conns':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>7}  req/s per round"
    )
    for r in result.loads:
        rounds = " ".join(f"{x:.0f}" for x in r.round_rps)
        print(
            f"  {r.name:19}{r.client:>7}{r.connections:>6}{r.requests_per_second:>9.0f}"
            f"{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.errors:>7}  {rounds}"
        )
    secured, baseline = result.line("secured"), result.line("baseline")
    if secured and baseline and result.ratio is not None:
        p50 = secured.p50_ms / baseline.p50_ms
        p99 = secured.p99_ms / baseline.p99_ms
        print(
            f"  ratio secured/baseline: {result.ratio:.3f}x req/s "
            f"(latency: p50 {p50:.2f}x, p99 {p99:.2f}x); plain HTTP, TLS excluded from both"
        )
        tls_line = result.line("secured+TLS")
        if tls_line and secured.requests_per_second:
            ratio = tls_line.requests_per_second / secured.requests_per_second
            print(f"  ratio secured+TLS/secured: {ratio:.3f}x req/s")
    report_audit(result)
    for note in result.notes:
        print(f"  note: {note}")
    if result.profile:
        report_profile(result.profile, secured, baseline, result.line(AUDIT_OFF))


def report_audit(result: ReadBenchResult) -> None:
    """Issue 4: the same secured read with auditing on and off, measured in the same rounds."""
    audited, unaudited = result.line("secured"), result.line(AUDIT_OFF)
    ratio, cost = result.audit_ratio, result.audit_cost_percent
    if not audited or not unaudited or ratio is None or cost is None:
        return
    p50 = audited.p50_ms / unaudited.p50_ms if unaudited.p50_ms else float("nan")
    p99 = audited.p99_ms / unaudited.p99_ms if unaudited.p99_ms else float("nan")
    # The two lines are neighbours in every round's order, so each round's ratio compares
    # measurements taken back to back: their spread shows how far the machine's noise reaches.
    per_round = " ".join(
        f"{on / off:.2f}" if off else "-"
        for on, off in zip(audited.round_rps, unaudited.round_rps, strict=True)
    )
    print(
        f"  ratio secured (audit on) / secured (audit off): {ratio:.3f}x req/s "
        f"(latency: p50 {p50:.2f}x, p99 {p99:.2f}x; per round {per_round})"
    )
    verdict = "met" if cost <= AUDIT_COST_GOAL_PERCENT else "NOT met"
    print(
        f"  audit costs {cost:.1f}% of read throughput "
        f"(goal: at most {AUDIT_COST_GOAL_PERCENT:.0f}%: {verdict})"
    )


def report_profile(
    p: Profile,
    secured: LoadResult | None,
    baseline: LoadResult | None,
    audit_off: LoadResult | None = None,
) -> None:
    print()
    print(
        "Where the secured request's time goes (in process on core 0, no socket; "
        "µs per request, best of 3 alternating passes)"
    )
    print(f"  {'':58}{'wall':>8}{'CPU':>8}")
    if secured and baseline:
        served_lines = [("baseline", baseline), ("secured", secured)]
        if audit_off:
            served_lines.append((AUDIT_OFF, audit_off))
        for label, line in served_lines:
            served = f"served over HTTP (1/throughput): {label}"
            print(f"  {served:58}{line.server_us_per_request:8.0f}")
    rows = (
        ("baseline app", p.baseline_us, p.baseline_cpu_us),
        ("medcollab app, security work stubbed out", p.stubbed_us, p.stubbed_cpu_us),
        ("medcollab app", p.secured_us, p.secured_cpu_us),
    )
    for label, wall, cpu in rows:
        print(f"  {'ASGI: ' + label:58}{wall:8.0f}{cpu:8.0f}")
    if p.baseline_cpu_us:
        print(
            f"  of the secured CPU time: framework shape (dependencies, hops, middleware, log) "
            f"{p.stubbed_cpu_us - p.baseline_cpu_us:.0f} µs, security work "
            f"{p.secured_cpu_us - p.stubbed_cpu_us:.0f} µs; CPU ratio secured/baseline "
            f"{p.secured_cpu_us / p.baseline_cpu_us:.1f}x"
        )
    print()
    print(
        f"  Sections of the secured request ({p.requests} requests in a further pass, timers"
        " patched in; inclusive; share of the top-level sum)"
    )
    print(f"  {'':58}{'wall':>8}{'CPU':>8}{'share':>7}{'calls':>7}")
    values = [
        (label, depth, p.sections_us.get(label, 0.0), p.sections_cpu_us.get(label, 0.0))
        for label, depth in SECTION_ORDER
    ]
    top_wall = sum(wall for _, depth, wall, _ in values if depth == 1)
    top_cpu = sum(cpu for _, depth, _, cpu in values if depth == 1)
    for label, depth, wall, cpu in values:
        calls = p.calls_per_request.get(label, 0.0)
        share = 100 * wall / top_wall if top_wall else 0.0
        print(
            f"  {'  ' * depth}{label:<{58 - 2 * depth}}{wall:8.0f}{cpu:8.0f}{share:6.1f}%"
            f"{calls:7.1f}"
        )
    print(f"    {'sum of the top-level sections':<54}{top_wall:8.0f}{top_cpu:8.0f}")
    print(
        f"  SQL: {p.sql_statements:.1f} statements per secured request ({p.sql_us:.0f} µs wall in"
        f" the driver; the rest of their cost is the ORM). Thread-pool hops per request:"
        f" {p.thread_hops:.1f} secured, {p.baseline_thread_hops:.1f} baseline; one hop alone"
        f" costs {p.thread_hop_us:.0f} µs wall here"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["client"]:
        client_main(args_in[1:])
        return
    unwind_on_signals()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per line")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per line")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--no-tls", action="store_true", help="skip the secured+TLS line")
    parser.add_argument(
        "--no-single", action="store_true", help="skip the secured line with one connection"
    )
    parser.add_argument(
        "--no-audit-off",
        action="store_true",
        help="skip the secured line with auditing of record access switched off",
    )
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    parser.add_argument("--profile-iterations", type=int, default=2000)
    args = parser.parse_args(args_in)
    config = ReadBenchConfig(
        seconds=args.seconds,
        rounds=max(1, args.rounds),
        connections=args.connections,
        tls=not args.no_tls,
        single_connection=not args.no_single,
        audit_off=not args.no_audit_off,
        install=not args.no_install,
        profile_iterations=args.profile_iterations,
    )
    report(run(config))


if __name__ == "__main__":
    main()
