"""One TOTP code signs in once, even when it is submitted many times at the same instant.

``AuthService.complete_mfa`` locks the MFA challenge and the user row (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises whole requests), so concurrent submissions
cannot all pass the "unused challenge" and "newer time step" checks. The rolled-back-transaction
fixtures cannot show that, so these tests race real HTTP requests (threads released together by a
barrier) against a real server over a committed database, on SQLite and on PostgreSQL.

Exactly one submission gets a session. The others are refused with the generic 401 (a replay of
the code, or a used challenge) or, under the shipped throttling policy, with 429 once the username
backs off after ``backoff_free_attempts`` consecutive failures: the losers run one after another,
so the count of each is exact. Every refusal is audited.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from sqlalchemy import func, select

from medcollab.app import create_app
from medcollab.audit.models import AuditEventRecord
from medcollab.crypto.passwords import PasswordHasher
from medcollab.identity.models import AuthSession
from medcollab.kernel.permissions import Role
from tests.support.factories import Account, bearer, make_org, make_user
from tests.support.live import Live, live_server

PARALLEL = 8
GENERIC_MFA_REFUSAL = {"error": "authentication_failed", "message": "invalid or expired code"}


@pytest.fixture
def live_settings() -> dict[str, Any]:
    """Settings overrides for the server; tests parametrise it."""
    return {}


@pytest.fixture
def live(
    db_kind: str,
    tmp_path: Path,
    hasher: PasswordHasher,
    request: pytest.FixtureRequest,
    live_settings: dict[str, Any],
) -> Iterator[Live]:
    with live_server(
        create_app,
        db_kind=db_kind,
        tmp_path=tmp_path,
        hasher=hasher,
        request=request,
        name="mfa_race",
        **live_settings,
    ) as server:
        yield server


def _challenge(client: httpx.Client, account: Account) -> str:
    """``POST /auth/login`` for a staff account: an MFA challenge, not yet a session."""
    response = client.post(
        "/auth/login", json={"username": account.username, "password": account.password}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mfa_required"] is True, body
    token: str = body["mfa_token"]
    return token


def _enrolled_staff(live: Live) -> Account:
    """A physician whose authenticator is confirmed (one full sign-in), with the clock moved on
    to the next TOTP time step so that a fresh code is valid."""
    make_org(live.runtime, "H1")
    doctor = make_user(live.runtime, "dr.race", [("H1", Role.PHYSICIAN)])
    with httpx.Client(base_url=live.base, timeout=60) as client:
        first = client.post(
            "/auth/mfa",
            json={"mfa_token": _challenge(client, doctor), "code": doctor.code(live.clock)},
        )
        assert first.status_code == 200, first.text
        assert len(first.json()["recovery_codes"]) == 10  # The authenticator is now confirmed.
    live.clock.advance(timedelta(seconds=30))
    return doctor


def _submit_all_at_once(live: Live, submissions: list[tuple[str, str]]) -> list[tuple[int, Any]]:
    """``POST /auth/mfa`` each ``(mfa_token, code)`` from its own thread and connection, all
    released together by a barrier."""
    barrier = threading.Barrier(len(submissions))

    def submit(submission: tuple[str, str]) -> tuple[int, Any]:
        mfa_token, code = submission
        with httpx.Client(base_url=live.base, timeout=60) as client:
            client.get("/healthz")  # Connect first, so the submissions leave together.
            barrier.wait(timeout=30)
            response = client.post("/auth/mfa", json={"mfa_token": mfa_token, "code": code})
            return response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=len(submissions)) as pool:
        return list(pool.map(submit, submissions))


def _last_audit_seq(live: Live) -> int:
    with live.runtime.database.unit_of_work() as session:
        return int(session.scalar(select(func.max(AuditEventRecord.seq))) or 0)


def _audit_since(live: Live, seq: int) -> Counter[tuple[str, tuple[str, ...]]]:
    """The audit events recorded after ``seq``, as (type, reasons), counted."""
    with live.runtime.database.unit_of_work() as session:
        rows = session.scalars(select(AuditEventRecord).where(AuditEventRecord.seq > seq)).all()
        return Counter((row.type, _reasons(row.body)) for row in rows)


def _reasons(body: dict[str, object]) -> tuple[str, ...]:
    reasons = body.get("reasons", [])
    assert isinstance(reasons, list)
    return tuple(str(reason) for reason in reasons)


def _session_count(live: Live, account: Account) -> int:
    with live.runtime.database.unit_of_work() as session:
        count = session.scalar(
            select(func.count())
            .select_from(AuthSession)
            .where(AuthSession.user_id == uuid.UUID(account.user_id))
        )
    return int(count or 0)


def _assert_one_winner(live: Live, results: list[tuple[int, Any]]) -> None:
    """Exactly one submission got a bearer token, and it works."""
    tokens = [body["access_token"] for status, body in results if status == 200]
    assert len(tokens) == 1, results
    with httpx.Client(base_url=live.base, timeout=60) as client:
        me = client.get("/auth/me", headers=bearer(tokens[0]))
    assert me.status_code == 200, me.text
    assert me.json()["user"]["username"] == "dr.race"


@pytest.mark.parametrize(
    "live_settings",
    [
        # Backoff never starts within the race, so every losing submission reaches the
        # time-step check and is refused as a replay: the lock alone is under test.
        pytest.param({"backoff_free_attempts": PARALLEL}, id="no-backoff"),
        # The shipped policy: after backoff_free_attempts consecutive failures the username
        # backs off, and the remaining submissions are throttled before the code is looked at.
        pytest.param({}, id="default-throttling"),
    ],
)
def test_one_code_on_many_challenges_at_once_signs_in_once(live: Live) -> None:
    """Variant A: N logins, each with its own challenge; the same valid code for all at once."""
    doctor = _enrolled_staff(live)
    with httpx.Client(base_url=live.base, timeout=60) as client:
        challenges = [_challenge(client, doctor) for _ in range(PARALLEL)]
    assert len(set(challenges)) == PARALLEL
    code = doctor.code(live.clock)
    seq = _last_audit_seq(live)
    sessions_before = _session_count(live, doctor)

    results = _submit_all_at_once(live, [(challenge, code) for challenge in challenges])

    _assert_one_winner(live, results)
    assert _session_count(live, doctor) == sessions_before + 1
    # The winner commits first (nothing can fail before it); the losers then run one at a time,
    # each a replay, until the username backs off.
    replays = min(PARALLEL - 1, live.runtime.settings.backoff_free_attempts)
    throttled = PARALLEL - 1 - replays
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [401] * replays + [429] * throttled, results
    for status, body in results:
        if status == 401:
            assert body == GENERIC_MFA_REFUSAL
        elif status == 429:
            assert body["error"] == "too_many_attempts"
    expected = Counter(
        {
            ("auth:mfa:success", ()): 1,
            ("auth:mfa:replay", ("code-already-used",)): replays,
            ("auth:mfa:failure", ("replayed-code",)): replays,
            ("auth:login:throttled", ("user",)): throttled,
        }
    )
    assert _audit_since(live, seq) == +expected


def test_one_challenge_submitted_many_times_at_once_signs_in_once(live: Live) -> None:
    """Variant B: one challenge; the same valid code submitted N times at once to it."""
    doctor = _enrolled_staff(live)
    with httpx.Client(base_url=live.base, timeout=60) as client:
        challenge = _challenge(client, doctor)
    code = doctor.code(live.clock)
    seq = _last_audit_seq(live)
    sessions_before = _session_count(live, doctor)

    results = _submit_all_at_once(live, [(challenge, code)] * PARALLEL)

    _assert_one_winner(live, results)
    assert _session_count(live, doctor) == sessions_before + 1
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [401] * (PARALLEL - 1), results
    assert all(body == GENERIC_MFA_REFUSAL for status, body in results if status == 401)
    # The losers find the challenge used: refused before the code is even looked at, so no
    # replay is recorded (and only the address is throttled, well below its limit).
    assert _audit_since(live, seq) == Counter(
        {
            ("auth:mfa:success", ()): 1,
            ("auth:mfa:failure", ("invalid-or-expired-challenge",)): PARALLEL - 1,
        }
    )
