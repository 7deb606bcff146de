"""The collaboration pages: referrals (create, accept, revoke by the patient), consultation threads
(messages, attachments, invitations), appointments (schedules, slots, booking once), their CSRF
protection, tenant isolation and audit trail, with a TestClient on a real database."""

from __future__ import annotations

import re
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from medcollab.audit.models import AuditEventRecord
from medcollab.audit.services import AuditLog
from medcollab.collaboration.models import (
    AppointmentRecord,
    AttachmentRecord,
    ConsultationRecord,
    ReferralRecord,
)
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime
from tests.support.factories import Account, link, make_org, make_user
from tests.unit.web.conftest import WebWorld, csrf_of, web_sign_in

REASON = "Suspected arrhythmia; please assess with a Holter ECG"
TOPIC = "Palpitations at night"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 64


def _count(runtime: Runtime, model: type) -> int:
    with runtime.database.unit_of_work() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _signed_in(world: WebWorld, account: Account) -> tuple[TestClient, str]:
    client = world.browser()
    return client, web_sign_in(client, account, world.clock)


def _refer(world: WebWorld, doctor: TestClient, token: str, **extra: str) -> str:
    """Create a referral of the world's patient from H1 to H2 through the page; returns its id."""
    answer = doctor.post(
        "/clinic/referrals",
        data={
            "patient": world.patient_id,
            "to_org": "H2",
            "reason": REASON,
            "scope": "all",
            "days": "30",
            "csrf_token": token,
            **extra,
        },
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    match = re.fullmatch(r"/clinic/referrals/([0-9a-f-]{36})", answer.headers["location"])
    assert match is not None
    return match.group(1)


def test_referral_is_accepted_opens_the_chart_and_the_patient_revokes_it(
    web_world: WebWorld,
) -> None:
    doctor, doctor_token = _signed_in(web_world, web_world.doctor)
    receiver, receiver_token = _signed_in(web_world, web_world.outsider)
    chart = f"/clinic/patients/{web_world.patient_id}"
    assert receiver.get(chart).status_code == 404  # No relationship yet.

    bad = doctor.post(
        "/clinic/referrals",
        data={"patient": web_world.patient_id, "to_org": "H2", "reason": REASON, "days": "999"}
        | {"scope": "all", "csrf_token": doctor_token},
    )
    assert bad.status_code == 400
    assert "The referral lasts from 1 to 365 days." in bad.text
    assert REASON in bad.text  # The form keeps what was typed.
    assert _count(web_world.runtime, ReferralRecord) == 0

    referral_id = _refer(web_world, doctor, doctor_token)
    detail = doctor.get(f"/clinic/referrals/{referral_id}")
    assert detail.status_code == 200
    assert REASON in detail.text
    assert 'data-status="requested"' in detail.text

    incoming = receiver.get("/clinic/referrals")
    assert incoming.status_code == 200
    table = incoming.text.split('id="incoming"', 1)[1].split("</table>", 1)[0]
    assert web_world.patient_id in table
    # The referring side cannot accept its own referral.
    assert (
        doctor.post(
            f"/clinic/referrals/{referral_id}/accept", data={"csrf_token": doctor_token}
        ).status_code
        == 403
    )
    accepted = receiver.post(
        f"/clinic/referrals/{referral_id}/accept",
        data={"csrf_token": receiver_token},
        follow_redirects=False,
    )
    assert accepted.status_code == 303
    assert 'data-status="accepted"' in receiver.get(accepted.headers["location"]).text
    opened = receiver.get(chart)
    assert opened.status_code == 200
    assert "Wei Zhang" in opened.text
    again = receiver.post(
        f"/clinic/referrals/{referral_id}/accept", data={"csrf_token": receiver_token}
    )
    assert again.status_code == 409

    patient, patient_token = _signed_in(web_world, web_world.patient)
    mine = patient.get("/my/referrals")
    assert mine.status_code == 200
    row = re.search(rf'<tr data-referral="{referral_id}">(.*?)</tr>', mine.text, re.DOTALL)
    assert row is not None
    assert REASON in row.group(1)
    assert "(H2)" in row.group(1)
    assert "your whole record" in row.group(1)
    assert 'data-status="accepted"' in row.group(1)
    revoked = patient.post(
        f"/my/referrals/{referral_id}/revoke",
        data={"csrf_token": patient_token},
        follow_redirects=False,
    )
    assert revoked.status_code == 303
    assert revoked.headers["location"] == "/my/referrals"
    after = patient.get("/my/referrals")
    assert 'data-status="revoked"' in after.text
    assert f'action="/my/referrals/{referral_id}/revoke"' not in after.text

    refused = receiver.get(chart)
    assert refused.status_code == 404
    assert "No access to this record" in refused.text

    # The receiving clinician's read shows in the patient's access history, and the pages'
    # referral reads are audited with the patient named.
    with web_world.runtime.database.unit_of_work() as session:
        AuditLog(session, signer=web_world.runtime.log_signer, clock=web_world.clock).integrate()
        listed = session.scalars(
            select(AuditEventRecord).where(AuditEventRecord.type == "collab:referral:listed")
        ).all()
    assert listed
    assert any(web_world.patient_id in str(e.body) for e in listed)
    history = patient.get("/my/access")
    entries = re.findall(r'<li class="entry([^"]*)"(.*?)</li>', history.text, re.DOTALL)
    by_receiver = [(cls, " ".join(body.split())) for cls, body in entries if "Test dr.two" in body]
    assert any(cls == "" and " viewed " in body for cls, body in by_receiver), by_receiver
    assert any("accepted a referral" in body for _cls, body in by_receiver), by_receiver
    assert any(cls == " denied" for cls, _body in by_receiver)  # The chart opens refused.


def test_other_organisations_see_nothing_of_a_referral_or_thread(web_world: WebWorld) -> None:
    make_org(web_world.runtime, "H3")
    stranger_account = make_user(web_world.runtime, "dr.three", [("H3", Role.PHYSICIAN)])
    doctor, doctor_token = _signed_in(web_world, web_world.doctor)
    referral_id = _refer(web_world, doctor, doctor_token)
    created = doctor.post(
        "/clinic/consultations",
        data={"patient": web_world.patient_id, "topic": TOPIC, "csrf_token": doctor_token},
        follow_redirects=False,
    )
    assert created.status_code == 303
    thread = created.headers["location"]

    stranger, stranger_token = _signed_in(web_world, stranger_account)
    assert stranger.get(f"/clinic/referrals/{referral_id}").status_code == 404
    assert web_world.patient_id not in stranger.get("/clinic/referrals").text
    accept = stranger.post(
        f"/clinic/referrals/{referral_id}/accept", data={"csrf_token": stranger_token}
    )
    assert accept.status_code == 404
    page = stranger.get(thread)
    assert page.status_code == 404
    assert TOPIC not in page.text
    assert TOPIC not in stranger.get("/clinic/consultations").text
    posted = stranger.post(thread + "/messages", data={"text": "hi", "csrf_token": stranger_token})
    assert posted.status_code == 404
    # A patient's pages are not a clinician's, and the other way round.
    assert stranger.get("/my/referrals").status_code == 403
    patient, _ = _signed_in(web_world, web_world.patient)
    assert patient.get("/clinic/referrals").status_code == 403
    with web_world.runtime.database.unit_of_work() as session:
        denied = session.scalars(
            select(AuditEventRecord).where(
                AuditEventRecord.type == "collab:consultation:access-denied"
            )
        ).all()
    assert denied


def test_consultation_messages_attachments_and_invitations(web_world: WebWorld) -> None:
    doctor, token = _signed_in(web_world, web_world.doctor)
    empty = doctor.post(
        "/clinic/consultations",
        data={"patient": web_world.patient_id, "topic": " ", "csrf_token": token},
    )
    assert empty.status_code == 400
    assert "Give the consultation a topic" in empty.text
    created = doctor.post(
        "/clinic/consultations",
        data={"patient": web_world.patient_id, "topic": TOPIC, "csrf_token": token},
        follow_redirects=False,
    )
    assert created.status_code == 303
    thread = created.headers["location"]
    assert TOPIC in doctor.get("/clinic/consultations").text

    script = "<script>alert(1)</script> Holter shows pauses"
    posted = doctor.post(
        thread + "/messages", data={"text": script, "csrf_token": token}, follow_redirects=False
    )
    assert posted.status_code == 303
    page = doctor.get(thread)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Holter shows pauses" in page.text
    assert "<script>alert(1)" not in page.text

    uploaded = doctor.post(
        thread + "/attachments",
        data={"csrf_token": token},
        files={"file": ("ecg strip.png", PNG, "application/octet-stream")},
        follow_redirects=False,
    )
    assert uploaded.status_code == 303, uploaded.text
    page = doctor.get(thread)
    assert "ecg strip.png" in page.text
    href = re.search(rf'href="({thread}/attachments/[0-9a-f-]{{36}})"', page.text)
    assert href is not None
    download = doctor.get(href.group(1))
    assert download.status_code == 200
    assert download.content == PNG
    assert download.headers["content-type"] == "image/png"
    assert download.headers["content-disposition"].startswith("attachment;")
    assert "ecg" not in download.headers["content-disposition"]

    renamed = doctor.post(
        thread + "/attachments",
        data={"csrf_token": token},
        files={"file": ("report.pdf", PNG, "application/pdf")},
    )
    assert renamed.status_code == 415
    assert "The file was refused." in renamed.text
    assert _count(web_world.runtime, AttachmentRecord) == 1

    # Without a basis (no referral, no consent; PIPL) the invitation is refused, and audited.
    invite = {"username": "dr.two", "org": "H2", "days": "7", "csrf_token": token}
    refused = doctor.post(thread + "/invitations", data=invite)
    assert refused.status_code == 403
    unknown = doctor.post(thread + "/invitations", data={**invite, "username": "nobody"})
    assert unknown.status_code == 400
    assert "No clinician of that organisation has that username." in unknown.text
    # An accepted referral gives dr.two's organisation a care relationship: now it works.
    referral_id = _refer(web_world, doctor, token)
    receiver, receiver_token = _signed_in(web_world, web_world.outsider)
    receiver.post(f"/clinic/referrals/{referral_id}/accept", data={"csrf_token": receiver_token})
    invited = doctor.post(thread + "/invitations", data=invite, follow_redirects=False)
    assert invited.status_code == 303
    assert receiver.get(thread).status_code == 404  # Invited is not joined.
    waiting = receiver.get("/clinic/consultations")
    join = re.search(r'action="(/clinic/consultations/[^"]+/accept)"', waiting.text)
    assert join is not None
    joined = receiver.post(join.group(1), data={"csrf_token": receiver_token})
    assert joined.status_code == 200
    assert "Holter shows pauses" in joined.text
    assert "Test dr.two" in joined.text

    # The patient sees the thread (topic, organisations), never its messages.
    patient, _ = _signed_in(web_world, web_world.patient)
    mine = patient.get("/my/consultations")
    assert mine.status_code == 200
    assert TOPIC in mine.text
    assert "H2" in mine.text
    assert "Holter shows pauses" not in mine.text

    closed = doctor.post(thread + "/close", data={"csrf_token": token})
    assert closed.status_code == 200
    assert 'data-status="closed"' in closed.text
    assert 'action="' + thread + '/messages"' not in closed.text
    archived = doctor.post(thread + "/archive", data={"csrf_token": token})
    assert archived.status_code == 200
    assert TOPIC not in archived.text
    assert TOPIC in doctor.get("/clinic/consultations?archived=true").text
    with web_world.runtime.database.unit_of_work() as session:
        reads = session.scalars(
            select(AuditEventRecord).where(AuditEventRecord.type == "collab:consultation:read")
        ).all()
    assert any("patient-listed" in e.body.get("reasons", []) for e in reads)
    assert all(e.body["entity"]["patient"] == web_world.patient_id for e in reads)


def test_schedule_slots_booking_once_and_cancelling(web_world: WebWorld) -> None:
    link(web_world.runtime, web_world.doctor.user_id, "practitioner", "pract-one")
    doctor, token = _signed_in(web_world, web_world.doctor)
    assert (
        doctor.post(
            "/clinic/appointments/schedules", data={"days": "30", "csrf_token": token}
        ).status_code
        == 200
    )
    page = doctor.get("/clinic/appointments")
    schedule = re.search(r'data-schedule="([^"]+)"', page.text)
    assert schedule is not None
    slots_url = f"/clinic/appointments/schedules/{schedule.group(1)}/slots"
    start = (web_world.clock.now() + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M")
    wrong = doctor.post(
        slots_url, data={"start": start, "minutes": "30", "count": "0", "csrf_token": token}
    )
    assert wrong.status_code == 400
    assert "1 to 50 slots" in wrong.text
    added = doctor.post(
        slots_url,
        data={"start": start, "minutes": "30", "count": "2", "csrf_token": token},
        follow_redirects=False,
    )
    assert added.status_code == 303
    free = doctor.get("/clinic/appointments")
    assert free.text.split('id="free-slots"', 1)[1].split("</table>", 1)[0].count("<tr>") == 3

    patient, patient_token = _signed_in(web_world, web_world.patient)
    listing = patient.get("/my/appointments", params={"org": "H1"})
    slot_ids = re.findall(r'name="slot" value="([^"]+)"', listing.text)
    assert len(slot_ids) == 2
    booked = patient.post(
        "/my/appointments",
        data={"slot": slot_ids[0], "org": "H1", "csrf_token": patient_token},
        follow_redirects=False,
    )
    assert booked.status_code == 303
    twice = patient.post(
        "/my/appointments", data={"slot": slot_ids[0], "org": "H1", "csrf_token": patient_token}
    )
    assert twice.status_code == 409
    assert "That time has just been booked by someone else." in twice.text
    assert re.findall(r'name="slot" value="([^"]+)"', twice.text) == slot_ids[1:]
    assert _count(web_world.runtime, AppointmentRecord) == 1

    mine = patient.get("/my/appointments")
    appointment = re.search(r'data-appointment="([^"]+)"', mine.text)
    assert appointment is not None
    assert 'data-status="booked"' in mine.text
    assert appointment.group(1) in doctor.get("/clinic/appointments").text
    cancelled = patient.post(
        f"/my/appointments/{appointment.group(1)}/cancel",
        data={"csrf_token": patient_token},
        follow_redirects=False,
    )
    assert cancelled.status_code == 303
    assert 'data-status="cancelled"' in patient.get("/my/appointments").text
    # The slot is free again.
    assert len(re.findall(r'name="slot"', patient.get("/my/appointments?org=H1").text)) == 2


def test_collaboration_posts_need_the_csrf_token(web_world: WebWorld) -> None:
    doctor, token = _signed_in(web_world, web_world.doctor)
    form = {
        "patient": web_world.patient_id,
        "to_org": "H2",
        "reason": REASON,
        "scope": "all",
        "days": "30",
    }
    for data, headers in (
        (form, {}),
        ({**form, "csrf_token": "mcx_forged"}, {}),
        ({**form, "csrf_token": token}, {"Origin": "https://evil.example"}),
    ):
        refused = doctor.post("/clinic/referrals", data=data, headers=headers)
        assert refused.status_code == 403
        assert "did not come from this site" in refused.text
    assert _count(web_world.runtime, ReferralRecord) == 0

    created = doctor.post(
        "/clinic/consultations",
        data={"patient": web_world.patient_id, "topic": TOPIC, "csrf_token": token},
        follow_redirects=False,
    )
    thread = created.headers["location"]
    upload = doctor.post(
        thread + "/attachments", files={"file": ("a.png", PNG, "image/png")}, data={}
    )
    assert upload.status_code == 403
    assert _count(web_world.runtime, AttachmentRecord) == 0
    assert _count(web_world.runtime, ConsultationRecord) == 1

    # HTMX sends the token as a header and is told where to go instead of a 303.
    htmx = doctor.post(
        "/clinic/referrals",
        data=form,
        headers={"X-CSRF-Token": token, "HX-Request": "true"},
        follow_redirects=False,
    )
    assert htmx.status_code == 204
    assert htmx.headers["hx-redirect"].startswith("/clinic/referrals/")
    assert _count(web_world.runtime, ReferralRecord) == 1
    assert csrf_of(doctor.get("/clinic/referrals").text) == token
