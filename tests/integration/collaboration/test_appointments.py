"""Appointments: practitioners publish Schedules and Slots; patients book and cancel; of parallel
bookings of one slot exactly one succeeds, proven with real concurrent HTTP requests against a real
server on a committed database (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from medcollab.audit.models import AuditEventRecord
from medcollab.collaboration.models import AppointmentRecord, SlotRecord, SlotStatus
from medcollab.crypto.passwords import PasswordHasher
from medcollab.kernel.clock import FrozenClock
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime
from tests.integration.collaboration import (
    CollabWorld,
    audit_types,
    build_world,
    collab_app,
    headers,
)
from tests.support.factories import (
    Account,
    fhir_headers,
    link,
    make_org,
    make_user,
    patient_resource,
    sign_in,
)
from tests.support.live import Live, live_server

PARALLEL_BOOKINGS = 8


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(
        collab_app(runtime), base_url="https://testserver", raise_server_exceptions=False
    ) as test_client:
        yield test_client


@pytest.fixture
def w(client: TestClient, runtime: Runtime, clock: FrozenClock) -> CollabWorld:
    world = build_world(client, runtime, clock)
    world.practitioner(world.doctor, "One")
    return world


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _schedule_with_slots(w: CollabWorld, *starts: datetime) -> tuple[str, list[dict[str, Any]]]:
    schedule = w.client.post("/collab/schedules", json={"days": 30}, headers=w.h(w.doctor))
    assert schedule.status_code == 201, schedule.text
    sid = schedule.json()["id"]
    slots = w.client.post(
        f"/collab/schedules/{sid}/slots",
        json={
            "slots": [{"start": _iso(s), "end": _iso(s + timedelta(minutes=30))} for s in starts]
        },
        headers=w.h(w.doctor),
    )
    assert slots.status_code == 201, slots.text
    return sid, slots.json()


def _book(w: CollabWorld, slot_id: str, account: Account | None = None) -> Any:
    return w.client.post(
        "/collab/appointments", json={"slot_id": slot_id}, headers=w.h(account or w.patient)
    )


def _second_patient(w: CollabWorld) -> Account:
    pid = w.create(w.doctor, patient_resource(family="Li", identifier="110101199003071111"))
    account = make_user(
        w.runtime, "pat.two", [("H1", Role.PATIENT)], password="another long pass phrase"
    )
    link(w.runtime, account.user_id, "patient", pid)
    w.sign_in(account)
    return account


def test_publish_book_cancel_and_rebook(w: CollabWorld) -> None:
    start = w.clock.now() + timedelta(days=1)
    sid, slots = _schedule_with_slots(w, start, start + timedelta(hours=1))
    assert [s["status"] for s in slots] == ["free", "free"]
    # The FHIR resources exist and are the custodian organisation's.
    schedule = w.client.get(f"/fhir/R4/Schedule/{sid}", headers=w.fhir(w.doctor)).json()
    assert schedule["actor"][0]["reference"].startswith("Practitioner/")

    free = w.client.get("/collab/slots?org=H1", headers=w.h(w.patient))
    assert free.status_code == 200
    assert [s["id"] for s in free.json()] == [s["id"] for s in slots]
    booked = _book(w, slots[0]["id"])
    assert booked.status_code == 201, booked.text
    appointment = booked.json()
    assert appointment["status"] == "booked"
    assert appointment["patient_id"] == w.patient_id
    assert [s["id"] for s in w.client.get("/collab/slots", headers=w.h(w.patient)).json()] == [
        slots[1]["id"]
    ]
    fhir = w.client.get(f"/fhir/R4/Appointment/{appointment['id']}", headers=w.fhir(w.doctor))
    assert fhir.json()["status"] == "booked"
    assert {"reference": f"Patient/{w.patient_id}"} in [
        p["actor"] for p in fhir.json()["participant"]
    ]
    slot = w.client.get(f"/fhir/R4/Slot/{slots[0]['id']}", headers=w.fhir(w.doctor)).json()
    assert slot["status"] == "busy"

    # Booking a taken slot is a conflict, and the refusal is audited.
    other = _second_patient(w)
    taken = _book(w, slots[0]["id"], other)
    assert taken.status_code == 409
    assert taken.json()["error"] == "slot_unavailable"

    mine = w.client.get("/collab/appointments", headers=w.h(w.patient)).json()
    assert [a["id"] for a in mine] == [appointment["id"]]
    clinic = w.client.get("/collab/appointments", headers=w.h(w.doctor)).json()
    assert [a["id"] for a in clinic] == [appointment["id"]]

    # Only the patient (or the organisation) cancels; then the slot is free again.
    cancel_url = f"/collab/appointments/{appointment['id']}/cancel"
    assert w.client.post(cancel_url, headers=w.h(other)).status_code == 404
    cancelled = w.client.post(cancel_url, headers=w.h(w.patient))
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert w.client.post(cancel_url, headers=w.h(w.patient)).status_code == 409
    fhir = w.client.get(f"/fhir/R4/Appointment/{appointment['id']}", headers=w.fhir(w.doctor))
    assert fhir.json()["status"] == "cancelled"
    slot = w.client.get(f"/fhir/R4/Slot/{slots[0]['id']}", headers=w.fhir(w.doctor)).json()
    assert slot["status"] == "free"
    rebooked = _book(w, slots[0]["id"], other)
    assert rebooked.status_code == 201, rebooked.text

    assert audit_types(w.runtime, w.patient_id) == [
        "collab:appointment:booked",
        "collab:appointment:listed",
        "collab:appointment:listed",
        "collab:appointment:cancelled",
    ]


def test_cancelling_after_the_start_is_refused(w: CollabWorld) -> None:
    start = w.clock.now() + timedelta(hours=2)
    _sid, slots = _schedule_with_slots(w, start)
    appointment = _book(w, slots[0]["id"]).json()
    w.refresh(w.patient, at=start)
    late = w.client.post(f"/collab/appointments/{appointment['id']}/cancel", headers=w.h(w.patient))
    assert late.status_code == 409
    assert "begun" in late.json()["message"]
    # A slot that has begun is no longer offered or bookable.
    assert w.client.get("/collab/slots", headers=w.h(w.patient)).json() == []


def test_bad_schedule_slot_and_booking_requests(w: CollabWorld) -> None:
    now = w.clock.now()
    sid, _slots = _schedule_with_slots(w, now + timedelta(days=1))

    def add(*periods: tuple[datetime, datetime]) -> Any:
        return w.client.post(
            f"/collab/schedules/{sid}/slots",
            json={"slots": [{"start": _iso(s), "end": _iso(e)} for s, e in periods]},
            headers=w.h(w.doctor),
        )

    hour = timedelta(hours=1)
    tomorrow = now + timedelta(days=1)
    assert add((tomorrow + timedelta(minutes=10), tomorrow + hour)).status_code == 409
    overlapping = add(
        (tomorrow + 2 * hour, tomorrow + 3 * hour), (tomorrow + 2 * hour, tomorrow + 4 * hour)
    )
    assert overlapping.status_code == 409
    assert add((now - hour, now)).status_code == 400
    assert add((tomorrow + 5 * hour, tomorrow + 5 * hour)).status_code == 400
    assert add((tomorrow + 5 * hour, tomorrow + 18 * hour)).status_code == 400
    naive = w.client.post(
        f"/collab/schedules/{sid}/slots",
        json={"slots": [{"start": "2026-03-01T08:00:00", "end": "2026-03-01T09:00:00"}]},
        headers=w.h(w.doctor),
    )
    assert naive.status_code == 422
    # Another organisation's schedule is not found; an unlinked clinician has no schedule.
    foreign = w.client.post(
        f"/collab/schedules/{sid}/slots",
        json={"slots": [{"start": _iso(tomorrow), "end": _iso(tomorrow + hour)}]},
        headers=w.h(w.receiver),
    )
    assert foreign.status_code == 404
    unlinked = w.client.post("/collab/schedules", json={}, headers=w.h(w.receiver))
    assert unlinked.status_code == 409
    assert "Practitioner" in unlinked.json()["message"]
    # Clinicians do not book for themselves; unknown slots are not found.
    assert _book(w, _slots[0]["id"], w.doctor).status_code == 403
    assert _book(w, "no-such-slot").status_code == 404
    assert _book(w, "../../etc").status_code == 422


# Parallel bookings over real HTTP ---------------------------------------------------------------


@pytest.fixture
def live(
    db_kind: str, tmp_path: Path, hasher: PasswordHasher, request: pytest.FixtureRequest
) -> Iterator[Live]:
    """A real uvicorn server in this process over a committed (not rolled-back) database."""
    with live_server(
        collab_app,
        db_kind=db_kind,
        tmp_path=tmp_path,
        hasher=hasher,
        request=request,
        name="collab_race",
    ) as server:
        yield server


def test_parallel_bookings_of_one_slot_never_both_succeed(live: Live) -> None:
    runtime = live.runtime
    clock = runtime.clock
    assert isinstance(clock, FrozenClock)
    make_org(runtime, "H1")
    doctor = make_user(runtime, "dr.one", [("H1", Role.PHYSICIAN)])
    patients: list[Account] = []
    with httpx.Client(base_url=live.base, timeout=60) as setup:
        token = sign_in(setup, doctor, clock)
        practitioner = setup.post(
            "/fhir/R4/Practitioner",
            json={"resourceType": "Practitioner", "name": [{"family": "One"}]},
            headers=fhir_headers(token),
        ).json()["id"]
        link(runtime, doctor.user_id, "practitioner", practitioner)
        schedule = setup.post("/collab/schedules", json={}, headers=headers(token)).json()
        start = clock.now() + timedelta(days=1)
        slot = setup.post(
            f"/collab/schedules/{schedule['id']}/slots",
            json={"slots": [{"start": _iso(start), "end": _iso(start + timedelta(minutes=20))}]},
            headers=headers(token),
        ).json()[0]
        tokens = []
        for n in range(PARALLEL_BOOKINGS):
            created = setup.post(
                "/fhir/R4/Patient",
                json=patient_resource(identifier=f"11010119900307{n:04d}"),
                headers=fhir_headers(token),
            )
            assert created.status_code == 201, created.text
            account = make_user(
                runtime, f"pat.{n}", [("H1", Role.PATIENT)], password=f"patient pass phrase {n}"
            )
            link(runtime, account.user_id, "patient", created.json()["id"])
            patients.append(account)
            tokens.append(sign_in(setup, account, clock))

    barrier = threading.Barrier(PARALLEL_BOOKINGS)

    def book(token: str) -> tuple[int, dict[str, Any]]:
        with httpx.Client(base_url=live.base, timeout=60) as client:
            client.get("/healthz")  # Connect first, so the bookings leave together.
            barrier.wait(timeout=30)
            response = client.post(
                "/collab/appointments", json={"slot_id": slot["id"]}, headers=headers(token)
            )
            return response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=PARALLEL_BOOKINGS) as pool:
        results = list(pool.map(book, tokens))

    statuses = sorted(status for status, _ in results)
    assert statuses == [201] + [409] * (PARALLEL_BOOKINGS - 1), results
    winner = next(body for status, body in results if status == 201)
    for status, body in results:
        if status == 409:
            assert body["error"] == "slot_unavailable"
    with runtime.database.unit_of_work() as session:
        rows = session.scalars(
            select(AppointmentRecord).where(AppointmentRecord.slot_id == slot["id"])
        ).all()
        assert [r.id for r in rows] == [winner["id"]]
        stored = session.get(SlotRecord, slot["id"])
        assert stored is not None
        assert stored.status is SlotStatus.BUSY
        assert stored.appointment_id == winner["id"]
        refusals = session.scalar(
            select(func.count()).where(
                AuditEventRecord.type == "collab:appointment:booking-refused"
            )
        )
        assert refusals == PARALLEL_BOOKINGS - 1
