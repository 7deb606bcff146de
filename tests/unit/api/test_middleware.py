"""Transport protections: security headers, the body limit and the access log.

The middleware is installed on a small application of its own, wired like ``create_app`` (the real
error handlers, then ``install``), so these tests do not depend on any domain router.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from medcollab.api import errors
from medcollab.api.middleware import (
    API_CSP,
    BodyLimitMiddleware,
    content_security_policy,
    install,
    route_template,
)
from medcollab.config import Settings
from medcollab.logging import JsonFormatter, RedactionFilter

LIMIT = 1024
HSTS_MAX_AGE = 31_536_000
EXPECTED_HEADERS = {
    "strict-transport-security": f"max-age={HSTS_MAX_AGE}; includeSubDomains",
    "content-security-policy": (
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}


class Calls:
    """What the endpoints saw, so a test can prove an endpoint never ran."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        mode="dev",
        secret_key="x" * 40,
        data_dir=tmp_path,
        max_body_bytes=LIMIT,
        hsts_max_age=HSTS_MAX_AGE,
    )


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def app(settings: Settings, calls: Calls) -> FastAPI:
    app = FastAPI()
    errors.install(app)
    install(app, settings)

    patients = APIRouter(prefix="/Patient")

    @patients.get("/{patient_id}")
    def read_patient(patient_id: str) -> dict[str, str]:
        return {"id": patient_id}

    fhir = APIRouter(prefix="/fhir/R4")
    fhir.include_router(patients)
    app.include_router(fhir)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()
        calls.bodies.append(body)
        return {"length": len(body)}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("the patient Zhang Wei broke it")

    @app.get("/branded")
    def branded() -> Response:
        return Response(
            "{}",
            media_type="application/json",
            headers={"Server": "leaky/1.0", "Cache-Control": "public, max-age=3600"},
        )

    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(
        app, base_url="https://testserver", raise_server_exceptions=False
    ) as test_client:
        yield test_client


def assert_security_headers(headers: Any) -> None:
    for name, value in EXPECTED_HEADERS.items():
        assert headers.get_list(name) == [value], name
    assert "server" not in headers


# Security headers ---------------------------------------------------------------------------


def test_success_carries_every_security_header(client: TestClient) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert_security_headers(response.headers)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/no/such/endpoint", 404),
        ("DELETE", "/healthz", 405),
        ("GET", "/boom", 500),
        ("POST", "/echo?x=1", 200),
    ],
)
def test_error_responses_carry_them_too(
    client: TestClient, method: str, path: str, status: int
) -> None:
    response = client.request(method, path)

    assert response.status_code == status
    assert_security_headers(response.headers)


def test_internal_error_reveals_nothing(client: TestClient) -> None:
    response = client.get("/boom")

    assert response.status_code == 500
    assert response.json()["error"] == "internal_error"
    # The application's own error handler answered (it quotes an incident id), and its response
    # still passed through the security headers: they wrap Starlette's ServerErrorMiddleware.
    assert "incident" in response.json()["message"]
    assert_security_headers(response.headers)
    assert "Zhang" not in response.text


def test_application_cannot_weaken_or_brand_responses(client: TestClient) -> None:
    response = client.get("/branded")

    assert response.status_code == 200
    # The app's own Server and Cache-Control values are replaced, not sent alongside ours.
    assert_security_headers(response.headers)


def test_failing_error_handler_still_gets_a_json_500_with_headers(settings: Settings) -> None:
    app = FastAPI()

    @app.exception_handler(Exception)
    async def broken_handler(_request: Request, _exc: Exception) -> Response:
        raise LookupError("the error handler itself failed")

    install(app, settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = test_client.get("/boom")

    assert response.status_code == 500
    assert response.json() == {"error": "internal_error", "message": "internal error"}
    assert_security_headers(response.headers)


def test_content_security_policy_is_strict_everywhere_for_now() -> None:
    assert content_security_policy("/healthz") == API_CSP
    assert content_security_policy("/") == API_CSP
    assert "'unsafe-inline'" not in API_CSP
    assert "frame-ancestors 'none'" in API_CSP


def test_install_refuses_to_run_twice(app: FastAPI, settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="already installed"):
        install(app, settings)


def test_install_refuses_a_running_application(settings: Settings) -> None:
    app = FastAPI()
    with TestClient(app) as test_client:
        test_client.get("/")
    with pytest.raises(RuntimeError, match="before the application handles"):
        install(app, settings)


# Body limit ---------------------------------------------------------------------------------


def test_body_at_the_limit_is_accepted(client: TestClient, calls: Calls) -> None:
    response = client.post("/echo", content=b"a" * LIMIT)

    assert response.status_code == 200
    assert response.json() == {"length": LIMIT}
    assert calls.bodies == [b"a" * LIMIT]


def test_declared_oversized_body_is_refused_with_413(client: TestClient, calls: Calls) -> None:
    response = client.post("/echo", content=b"a" * (LIMIT + 1))

    assert response.status_code == 413
    assert response.json() == {
        "error": "payload_too_large",
        "message": f"request body exceeds {LIMIT} bytes",
    }
    assert_security_headers(response.headers)
    assert calls.bodies == []


def test_an_oversized_form_post_from_a_browser_gets_a_page(
    client: TestClient, calls: Calls
) -> None:
    page = client.post(
        "/clinic/referrals",
        content=b"a" * (LIMIT + 1),
        headers={"Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"},
    )
    assert page.status_code == 413
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "The upload is too large" in page.text
    assert "上传内容过大" in page.text
    assert "<script" not in page.text
    # The pages' own policy applies: scripts and styles from the site only, nothing inline.
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["strict-transport-security"]
    # The same post from an API client, or to an API path, stays JSON.
    api = client.post("/clinic/referrals", content=b"a" * (LIMIT + 1))
    assert api.json()["error"] == "payload_too_large"
    echo = client.post("/echo", content=b"a" * (LIMIT + 1), headers={"Accept": "text/html"})
    assert echo.json()["error"] == "payload_too_large"
    assert calls.bodies == []


def test_chunked_oversized_body_is_refused_before_the_endpoint_runs(
    client: TestClient, calls: Calls
) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b"b" * 300

    response = client.post("/echo", content=chunks())

    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert_security_headers(response.headers)
    assert calls.bodies == []


def test_chunked_body_within_the_limit_arrives_whole(client: TestClient, calls: Calls) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"one,"
        yield b"two,"
        yield b"three"

    response = client.post("/echo", content=chunks())

    assert response.status_code == 200
    assert calls.bodies == [b"one,two,three"]


class _Recorder:
    """A bare ASGI conversation: scripted request messages in, response messages out."""

    def __init__(self, messages: list[Message]) -> None:
        self._messages = list(messages)
        self.received = 0
        self.sent: list[Message] = []
        self.app_calls: list[bytes] = []

    async def receive(self) -> Message:
        self.received += 1
        if self._messages:
            return self._messages.pop(0)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def app(self, _scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.app_calls.append(body)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _run(recorder: _Recorder, headers: list[tuple[bytes, bytes]]) -> None:
    scope: Scope = {"type": "http", "method": "POST", "path": "/x", "headers": headers}
    middleware = BodyLimitMiddleware(recorder.app, max_body_bytes=LIMIT)
    asyncio.run(middleware(scope, recorder.receive, recorder.send))


def test_streamed_body_stops_being_read_once_over_the_limit() -> None:
    chunk = {"type": "http.request", "body": b"c" * 400, "more_body": True}
    recorder = _Recorder([chunk] * 10)

    _run(recorder, [])

    assert recorder.app_calls == []
    assert recorder.sent[0]["status"] == 413
    assert (b"connection", b"close") in recorder.sent[0]["headers"]
    # 3 x 400 bytes cross the 1024-byte limit; the remaining 7 chunks are never read.
    assert recorder.received == 3


def test_declared_length_is_refused_without_reading_the_body() -> None:
    recorder = _Recorder([{"type": "http.request", "body": b"", "more_body": False}])

    _run(recorder, [(b"content-length", b"999999999")])

    assert recorder.received == 0
    assert recorder.app_calls == []
    assert recorder.sent[0]["status"] == 413


@pytest.mark.parametrize("values", [[b"12x"], [b"-1"], [b"10", b"20"]])
def test_malformed_content_length_is_a_400(values: list[bytes]) -> None:
    recorder = _Recorder([{"type": "http.request", "body": b"", "more_body": False}])

    _run(recorder, [(b"content-length", value) for value in values])

    assert recorder.app_calls == []
    assert recorder.sent[0]["status"] == 400
    assert json.loads(recorder.sent[1]["body"])["error"] == "invalid_request"


def test_client_leaving_mid_body_runs_nothing() -> None:
    recorder = _Recorder(
        [
            {"type": "http.request", "body": b"partial", "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    _run(recorder, [])

    assert recorder.app_calls == []
    assert recorder.sent == []


# Access log ---------------------------------------------------------------------------------


def _access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "medcollab.access"]


def _as_json(record: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_access_log_names_the_route_template_not_the_path(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="medcollab.access")

    client.get(
        "/fhir/R4/Patient/98765?name=Zhang%20Wei&birthdate=1980-01-01",
        headers={"Authorization": "Bearer abc.def", "Cookie": "session=s3cr3t"},
    )

    (record,) = _access_records(caplog)
    entry = _as_json(record)
    assert entry["logger"] == "medcollab.access"
    assert entry["method"] == "GET"
    assert entry["route"] == "/fhir/R4/Patient/{patient_id}"
    assert entry["status"] == 200
    assert isinstance(entry["duration_ms"], float)
    line = json.dumps(entry)
    for leaked in ("98765", "Zhang", "1980", "abc.def", "s3cr3t", "testclient", "Bearer"):
        assert leaked not in line


@pytest.mark.parametrize(
    ("path", "route", "status"),
    [
        ("/healthz", "/healthz", 200),
        ("/nowhere/98765", "/nowhere", 404),
        ("/%E5%BC%A0%E4%BC%9F/records", "/<unmatched>", 404),
        ("/", "/", 404),
        ("/boom", "/boom", 500),
    ],
)
def test_access_log_route_and_status(
    client: TestClient, caplog: pytest.LogCaptureFixture, path: str, route: str, status: int
) -> None:
    caplog.set_level(logging.INFO, logger="medcollab.access")

    client.get(path)

    (record,) = _access_records(caplog)
    assert _as_json(record)["route"] == route
    assert _as_json(record)["status"] == status
    assert record.levelno == (logging.WARNING if status >= 500 else logging.INFO)


def test_access_log_records_refused_bodies(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="medcollab.access")

    client.post("/echo", content=b"a" * (LIMIT + 1))

    (record,) = _access_records(caplog)
    entry = _as_json(record)
    assert (entry["method"], entry["route"], entry["status"]) == ("POST", "/echo", 413)


def test_route_template_of_a_plain_route_and_of_nothing() -> None:
    class Route:
        path_format = "/fhir/R4/metadata"

    assert route_template({"route": Route(), "path": "/fhir/R4/metadata"}) == "/fhir/R4/metadata"
    assert route_template({"path": "/a b/c"}) == "/<unmatched>"
    assert route_template({"path": "/" + "x" * 41}) == "/<unmatched>"


# The JSON log format ------------------------------------------------------------------------


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("medcollab.test", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_redaction_masks_credential_fields_and_inline_pairs() -> None:
    record = _record(
        "login failed for token=%s with password: hunter2",
        "tok-123",
        password="hunter2",
        session_token="tok-456",
        recovery_codes=["a1", "b2"],
        headers={"Authorization": "Bearer tok-789", "Accept": "application/json"},
        status_code=401,
        user_id="u-1",
    )

    assert RedactionFilter().filter(record) is True
    entry = json.loads(JsonFormatter().format(record))

    line = json.dumps(entry)
    for secret in ("hunter2", "tok-123", "tok-456", "tok-789", "a1", "b2"):
        assert secret not in line
    assert entry["password"] == "[redacted]"
    assert entry["headers"] == {"Authorization": "[redacted]", "Accept": "application/json"}
    assert entry["status_code"] == 401
    assert entry["user_id"] == "u-1"
    assert entry["message"] == "login failed for token=[redacted] with password: [redacted]"


def test_exceptions_are_logged_as_type_and_frames_only() -> None:
    # The text lives in a variable: the frames quote source lines, and source holds no data.
    detail = "patient Zhang Wei, id card 110101198001011234"

    def fail() -> None:
        raise ValueError(detail)

    try:
        fail()
    except ValueError:
        record = logging.LogRecord(
            "medcollab.test", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )

    entry = json.loads(JsonFormatter().format(record))

    assert entry["error_type"] == "ValueError"
    assert "test_exceptions_are_logged_as_type_and_frames_only" in entry["frames"]
    assert "Zhang" not in json.dumps(entry)
    assert "110101198001011234" not in json.dumps(entry)
    assert entry["time"].endswith("Z")
    assert entry["level"] == "ERROR"
