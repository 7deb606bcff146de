"""Attacks on sign-in: enumeration, brute force from one address, replay, malformed input."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from medcollab.audit.models import AuditEventRecord
from medcollab.crypto.passwords import PasswordHasher
from medcollab.identity.models import AuthSession, MfaChallenge, Throttle, User
from medcollab.kernel.clock import FrozenClock
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime
from tests.support.factories import STRONG_PASSWORD, bearer, make_org, make_user, sign_in


class CountingHasher(PasswordHasher):
    """The real Argon2id hasher, counting how many verifications each login costs."""

    def __init__(self) -> None:
        super().__init__()
        self.verifications = 0

    def verify(self, stored_hash: str, password: str) -> None:
        self.verifications += 1
        super().verify(stored_hash, password)

    def burn(self, password: str) -> None:
        self.verifications += 1
        super().burn(password)


@pytest.fixture
def org(runtime: Runtime) -> str:
    return make_org(runtime).code


def _row_counts(runtime: Runtime) -> dict[str, int]:
    with runtime.database.unit_of_work() as session:
        return {
            model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
            for model in (User, AuthSession, MfaChallenge)
        }


def test_unknown_username_costs_one_hash_like_a_wrong_password(
    client: TestClient, runtime: Runtime, org: str
) -> None:
    make_user(runtime, "dr.real", [(org, Role.PHYSICIAN)])
    counting = CountingHasher()
    runtime.hasher = counting
    known = client.post("/auth/login", json={"username": "dr.real", "password": "x" * 20})
    assert counting.verifications == 1
    unknown = client.post("/auth/login", json={"username": "dr.fake", "password": "x" * 20})
    assert counting.verifications == 2
    malformed = client.post("/auth/login", json={"username": "dr fake!", "password": "x" * 20})
    assert counting.verifications == 3
    assert known.status_code == unknown.status_code == malformed.status_code == 401
    assert known.json() == unknown.json() == malformed.json()
    assert known.headers.get("www-authenticate") == unknown.headers.get("www-authenticate")


def test_lockout_applies_to_unknown_usernames_too(
    client: TestClient, runtime: Runtime, clock: FrozenClock
) -> None:
    """Otherwise a locked (429) vs. never-locked (401) answer would reveal which accounts exist."""
    statuses = []
    for _ in range(10):
        response = client.post("/auth/login", json={"username": "ghost", "password": "y" * 20})
        statuses.append(response.status_code)
        clock.advance(timedelta(minutes=2))
    assert statuses == [401] * 9 + [429]


def test_backoff_answers_429_with_retry_after_and_is_recorded(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    make_user(runtime, "dr.slow", [(org, Role.PHYSICIAN)])
    for _ in range(3):
        assert (
            client.post(
                "/auth/login", json={"username": "dr.slow", "password": "z" * 20}
            ).status_code
            == 401
        )
    throttled = client.post(
        "/auth/login", json={"username": "dr.slow", "password": STRONG_PASSWORD}
    )
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "1"
    assert throttled.json()["error"] == "too_many_attempts"
    clock.advance(timedelta(seconds=1))
    ok = client.post("/auth/login", json={"username": "dr.slow", "password": STRONG_PASSWORD})
    assert ok.status_code == 200
    with runtime.database.unit_of_work() as session:
        kinds = session.scalars(select(AuditEventRecord.type)).all()
    assert kinds.count("auth:login:failure") == 3
    assert kinds.count("auth:login:throttled") == 1


def test_one_address_spraying_many_usernames_is_blocked(
    client: TestClient, runtime: Runtime, clock: FrozenClock
) -> None:
    """Password spraying: one wrong guess per username, all from one client address."""
    limit = runtime.settings.address_block_threshold
    statuses = []
    for attempt in range(limit):
        response = client.post(
            "/auth/login", json={"username": f"user{attempt}", "password": "w" * 20}
        )
        if response.status_code == 429:
            # Backoff on the address: wait as told, then the guess is evaluated.
            clock.advance(timedelta(seconds=int(response.headers["Retry-After"])))
            response = client.post(
                "/auth/login", json={"username": f"user{attempt}", "password": "w" * 20}
            )
        statuses.append(response.status_code)
    assert statuses == [401] * limit
    # The guess that reaches the threshold is still answered 401 (the username is not locked),
    # but the address now is: the next guess, for any username, is refused.
    blocked = client.post("/auth/login", json={"username": "fresh.name", "password": "w" * 20})
    assert blocked.status_code == 429
    assert int(blocked.headers["Retry-After"]) == runtime.settings.lockout_seconds
    with runtime.database.unit_of_work() as session:
        address_rows = session.scalars(
            select(Throttle).where(Throttle.key.startswith("addr:"))
        ).all()
        locks = session.scalar(
            select(func.count()).where(AuditEventRecord.type == "auth:account:locked")
        )
    assert len(address_rows) == 1
    assert address_rows[0].locked_until is not None
    assert locks == 1


def test_replayed_session_token_after_logout_is_refused(
    client: TestClient, runtime: Runtime, clock: FrozenClock, org: str
) -> None:
    doctor = make_user(runtime, "dr.replay", [(org, Role.PHYSICIAN)])
    token = sign_in(client, doctor, clock)
    client.post("/auth/logout", headers=bearer(token))
    for header in (bearer(token), {"Authorization": f"Bearer {token}x"}, {"Authorization": token}):
        assert client.get("/auth/me", headers=header).status_code == 401


@pytest.mark.parametrize(
    ("body", "content_type", "status", "error"),
    [
        (b'{"username": "a", "password": ', "application/json", 422, "invalid_request"),
        (b"username=a&password=b", "application/x-www-form-urlencoded", 415, None),
        (b'{"username": "a", "password": "b"}', "text/plain", 415, None),
        (b'{"username": "a", "password": "b", "admin": true}', "application/json", 422, None),
        (b'{"username": "' + b"u" * 65 + b'", "password": "b"}', "application/json", 422, None),
        (b'{"username": "a", "password": "' + b"p" * 129 + b'"}', "application/json", 422, None),
        (b'{"username": "\xff\xfe", "password": "b"}', "application/json", 400, "invalid_request"),
        (b'{"username": 5, "password": ["b"]}', "application/json", 422, None),
        (b"[]", "application/json", 422, None),
        (b"", "application/json", 422, None),
    ],
    ids=[
        "malformed-json",
        "form-encoded",
        "text-plain",
        "unknown-field",
        "overlong-username",
        "overlong-password",
        "non-utf8",
        "wrong-types",
        "not-an-object",
        "empty-with-json-type",
    ],
)
def test_bad_login_input_gets_a_clear_4xx_and_writes_nothing(
    client: TestClient,
    runtime: Runtime,
    body: bytes,
    content_type: str,
    status: int,
    error: str | None,
) -> None:
    before = _row_counts(runtime)
    response = client.post("/auth/login", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"error", "message"}
    assert payload["message"]
    if error:
        assert payload["error"] == error
    assert "Traceback" not in response.text
    assert _row_counts(runtime) == before


def test_oversized_body_is_refused_with_413(client: TestClient, runtime: Runtime) -> None:
    huge = b'{"username": "a", "password": "' + b"p" * (2 * 1024 * 1024) + b'"}'
    response = client.post(
        "/auth/login", content=huge, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


def test_error_responses_never_leak_internals(client: TestClient, runtime: Runtime) -> None:
    for path in ("/nope", "/auth/me", "/admin/users"):
        response = client.get(path)
        assert response.status_code in (401, 404)
        text = response.text.lower()
        for leak in ("traceback", "sqlalchemy", "select ", 'file "', "mcs_"):
            assert leak not in text
