"""The real server over a real socket: TLS only, strong suites only, protective headers, JSON logs.

One server process is started for the module with a production configuration, a generated secret
and an empty data directory, so it also exercises the self-signed certificate on first start.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medcollab.config import Settings
from medcollab.errors import ConfigurationError
from medcollab.runtime import Runtime
from medcollab.server import build_server, serve

pytestmark = pytest.mark.slow

START_TIMEOUT = 20.0
IO_TIMEOUT = 10.0

# Until the CLI's `serve` exists, the server starts from this snippet; the schema comes from the
# models rather than the migrations, which the CLI path will use instead.
SERVER_SNIPPET = """
import sys
from pathlib import Path
from typing import Any

from medcollab.config import Settings
from medcollab.models import metadata
from medcollab.runtime import Runtime
from medcollab.server import serve

data_dir = Path(sys.argv[1])
data_dir.mkdir(mode=0o700)
settings = Settings(mode="production", data_dir=data_dir, port=int(sys.argv[2]))
runtime = Runtime.from_settings(settings)
metadata.create_all(runtime.database.engine)
serve(runtime)
"""


@dataclass(frozen=True)
class RunningServer:
    port: int
    cert_file: Path
    secret: str
    log_file: Path

    def logs(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _clean_environment(**extra: str) -> dict[str, str]:
    """The test's environment without MEDCOLLAB_* settings a developer may have exported."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MEDCOLLAB_")}
    env.update(extra)
    return env


def _trusting(cert_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _permissive_client(*, maximum: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    """A client that verifies nothing and offers whatever it is told, old protocols included.

    Security level 0 lets this client's OpenSSL offer TLS 1.0/1.1 and SHA-1 suites at all, so a
    failed handshake shows that the *server* refused them.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = maximum
    context.set_ciphers(f"{ciphers or 'DEFAULT'}:@SECLEVEL=0")
    return context


def _handshake(port: int, context: ssl.SSLContext) -> tuple[str | None, str | None]:
    """Complete a TLS handshake and return (protocol version, cipher name)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        cipher = tls.cipher()
        return tls.version(), cipher[0] if cipher else None


def _assert_refused_by_the_server(error: ssl.SSLError) -> None:
    """The client did send its hello; the failure is not the client's OpenSSL declining to."""
    for local_failure in ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE", "NO_CIPHER_MATCH"):
        assert local_failure not in str(error)


def _wait_until_listening(
    process: subprocess.Popen[bytes], port: int, cert_file: Path, log_file: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"the server exited with {process.returncode}:\n"
                + log_file.read_text(encoding="utf-8", errors="replace")
            )
        if cert_file.exists():
            with contextlib.suppress(OSError):
                _handshake(port, _trusting(cert_file))
                return
        time.sleep(0.1)
    pytest.fail(
        f"the server did not accept TLS within {START_TIMEOUT} s:\n"
        + log_file.read_text(encoding="utf-8", errors="replace")
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("https-server")
    data_dir = workdir / "data"
    log_file = workdir / "server.log"
    port = _free_port()
    secret = secrets.token_urlsafe(36)  # 48 characters.
    with log_file.open("wb") as log_output:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER_SNIPPET, str(data_dir), str(port)],
            # The secret travels in the environment, not the command line that `ps` shows.
            env=_clean_environment(MEDCOLLAB_SECRET_KEY=secret),
            # A medcollab.toml in the developer's working directory must not leak in.
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_output,
            stderr=log_output,
        )
    try:
        cert_file = data_dir / "tls" / "cert.pem"
        _wait_until_listening(process, port, cert_file, log_file)
        yield RunningServer(port=port, cert_file=cert_file, secret=secret, log_file=log_file)
    finally:
        process.terminate()
        try:
            process.wait(timeout=IO_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=IO_TIMEOUT)


def _https_request(
    server: RunningServer, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, list[str]], bytes]:
    connection = http.client.HTTPSConnection(
        "127.0.0.1", server.port, context=_trusting(server.cert_file), timeout=IO_TIMEOUT
    )
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        received: dict[str, list[str]] = {}
        for name, value in response.getheaders():
            received.setdefault(name.lower(), []).append(value)
        return response.status, received, body
    finally:
        connection.close()


def test_healthz_over_https_with_protective_headers(server: RunningServer) -> None:
    status, headers, body = _https_request(server, "GET", "/healthz")

    assert status == 200
    assert json.loads(body) == {"status": "ok"}
    assert headers["strict-transport-security"] == ["max-age=63072000; includeSubDomains"]
    assert headers["content-security-policy"] == [
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ]
    assert headers["x-content-type-options"] == ["nosniff"]
    assert headers["referrer-policy"] == ["no-referrer"]
    assert headers["cache-control"] == ["no-store"]
    assert "server" not in headers


def test_certificate_is_the_generated_one_and_verifies_by_name(server: RunningServer) -> None:
    # "localhost" and 127.0.0.1 are both in the SubjectAltName; verification uses the name here.
    version, cipher = _handshake(server.port, _trusting(server.cert_file))

    assert version in ("TLSv1.2", "TLSv1.3")
    assert cipher is not None
    key_file = server.cert_file.with_name("key.pem")
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_plain_http_gets_no_data(server: RunningServer) -> None:
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := raw.recv(4096):
                received += chunk

    # At most a TLS alert record (content type 0x15), never an HTTP response or any data.
    assert b"HTTP/" not in received
    assert b"ok" not in received
    assert not received or received[0] == 0x15


# Python deprecates choosing TLS 1.1, which is exactly what this client must do.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused(server: RunningServer) -> None:
    old = _permissive_client(maximum=ssl.TLSVersion.TLSv1_1)

    with pytest.raises(ssl.SSLError) as refused:
        _handshake(server.port, old)

    _assert_refused_by_the_server(refused.value)


def test_tls_1_2_with_a_strong_suite_is_accepted(server: RunningServer) -> None:
    modern = _permissive_client(
        maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"
    )

    assert _handshake(server.port, modern) == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")


@pytest.mark.parametrize(
    "weak_suite",
    [
        # RSA key exchange, CBC, SHA-1: no forward secrecy at all.
        "AES128-SHA",
        # Forward secret and usable with the server's ECDSA key, but CBC with a SHA-1 MAC.
        "ECDHE-ECDSA-AES128-SHA",
        # Forward secret, SHA-2, but CBC mode.
        "ECDHE-ECDSA-AES256-SHA384",
    ],
)
def test_tls_1_2_with_a_weak_suite_is_refused(server: RunningServer, weak_suite: str) -> None:
    # Built outside pytest.raises: a client that cannot offer the suite must error, not pass.
    weak = _permissive_client(maximum=ssl.TLSVersion.TLSv1_2, ciphers=weak_suite)

    with pytest.raises(ssl.SSLError) as refused:
        _handshake(server.port, weak)

    _assert_refused_by_the_server(refused.value)


def test_oversized_body_is_refused_before_it_is_sent(server: RunningServer) -> None:
    status, headers, body = _https_request(
        server, "POST", "/healthz", headers={"Content-Length": "50000000"}
    )

    assert status == 413
    assert json.loads(body) == {
        "error": "payload_too_large",
        "message": "request body exceeds 1048576 bytes",
    }
    assert "strict-transport-security" in headers


def test_logs_are_json_lines_without_secrets_or_paths(server: RunningServer) -> None:
    _https_request(server, "GET", "/healthz?patient=Zhang%20Wei", {"Authorization": "Bearer t0k"})
    access: list[dict[str, object]] = []
    deadline = time.monotonic() + IO_TIMEOUT
    while not access and time.monotonic() < deadline:
        lines = [line for line in server.logs().splitlines() if line.strip()]
        entries = [json.loads(line) for line in lines]
        access = [
            entry
            for entry in entries
            if entry.get("logger") == "medcollab.access" and entry.get("route") == "/healthz"
        ]
        time.sleep(0.05)

    assert access, server.logs()
    assert {"time", "level", "logger", "message", "method", "status", "duration_ms"} <= set(
        access[0]
    )
    logs = server.logs()
    for leaked in (server.secret, "Zhang", "t0k"):
        assert leaked not in logs


# Refusals that happen before a server exists, in this process ---------------------------------


@contextlib.contextmanager
def _runtime(tmp_path: Path, **overrides: Any) -> Iterator[Runtime]:
    settings = Settings(
        mode="production", secret_key=secrets.token_urlsafe(36), data_dir=tmp_path, **overrides
    )
    runtime = Runtime.from_settings(settings)
    try:
        yield runtime
    finally:
        runtime.database.engine.dispose()


def test_production_without_tls_refuses_to_start_and_names_the_fix(tmp_path: Path) -> None:
    with _runtime(tmp_path, tls=False) as runtime:
        with pytest.raises(ConfigurationError) as refused:
            serve(runtime)

        assert "MEDCOLLAB_TLS=true" in refused.value.diagnostics()
    assert not (tmp_path / "tls").exists()


def test_configured_but_missing_certificate_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "hospital.crt"
    with _runtime(tmp_path, tls_cert_file=missing, tls_key_file=tmp_path / "k.pem") as runtime:
        with pytest.raises(ConfigurationError) as refused:
            build_server(runtime)

        assert str(missing) in refused.value.diagnostics()
        assert "MEDCOLLAB_TLS_CERT_FILE" in refused.value.diagnostics()
    # Nothing was generated in its place.
    assert not missing.exists()
    assert not (tmp_path / "tls").exists()


def test_build_server_applies_the_tls_policy(tmp_path: Path) -> None:
    with _runtime(tmp_path, port=_free_port()) as runtime:
        server = build_server(runtime)

        context = server.config.ssl
        assert isinstance(context, ssl.SSLContext)
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12
        assert all(name.startswith("ECDHE-") for name in tls12)
        assert all("GCM" in name or "CHACHA20" in name for name in tls12)
        assert context.options & ssl.OP_NO_TICKET
        assert server.config.server_header is False
        assert server.config.access_log is False
        assert server.config.proxy_headers is False
        assert (tmp_path / "tls" / "cert.pem").exists()
