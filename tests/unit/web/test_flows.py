"""The pages' flows with a TestClient: sign-in and enrolment, the patient's record, access
history proofs, consents, break-glass and its review, the organisation pages."""

from __future__ import annotations

import base64
import re
import uuid

from sqlalchemy import select

from medcollab.access.models import ReviewTask
from medcollab.audit.merkle import verify_inclusion
from medcollab.audit.models import AuditEventRecord
from medcollab.audit.services import AuditLog
from medcollab.identity.models import Organization
from medcollab.kernel.permissions import Role
from medcollab.runtime import Runtime
from tests.support.factories import fhir_headers, make_user, observation
from tests.unit.web.conftest import WebWorld, csrf_of, web_sign_in

REASON = "Unconscious in the emergency department, need allergies"


def _integrate(runtime: Runtime) -> None:
    with runtime.database.unit_of_work() as session:
        AuditLog(session, signer=runtime.log_signer, clock=runtime.clock).integrate()


def _checkpoint(runtime: Runtime) -> tuple[int, bytes]:
    with runtime.database.unit_of_work() as session:
        head = AuditLog(session).latest_tree_head()
    assert head is not None
    return head.size, head.root_hash


def test_first_sign_in_of_staff_enrols_an_authenticator(web_world: WebWorld) -> None:
    import pyotp  # noqa: PLC0415

    nurse = make_user(web_world.runtime, "nurse.new", [("H1", Role.NURSE)], provision_mfa=False)
    client = web_world.browser()
    form = client.get("/login")
    answer = client.post(
        "/login",
        data={
            "username": nurse.username,
            "password": nurse.password,
            "csrf_token": csrf_of(form.text),
        },
        follow_redirects=False,
    )
    assert answer.headers["location"] == "/account/enrol"
    # Until enrolled, every other page sends the nurse back to enrolment.
    blocked = client.get("/clinic/patients", follow_redirects=False)
    assert blocked.headers["location"] == "/account/enrol"
    intro = client.get("/account/enrol")
    started = client.post("/account/enrol/start", data={"csrf_token": csrf_of(intro.text)})
    assert started.status_code == 200
    assert 'src="data:image/svg+xml;base64,' in started.text
    secret = re.search(r'data-secret="([A-Z2-7]+)"', started.text)
    assert secret is not None
    wrong = client.post(
        "/account/enrol/confirm", data={"code": "000000", "csrf_token": csrf_of(started.text)}
    )
    assert wrong.status_code == 401
    assert "That code did not work." in wrong.text
    code = pyotp.TOTP(secret.group(1)).at(web_world.clock.now())
    confirmed = client.post(
        "/account/enrol/confirm", data={"code": code, "csrf_token": csrf_of(started.text)}
    )
    assert confirmed.status_code == 200
    codes = re.findall(r"<li><code>([a-z0-9-]+)</code></li>", confirmed.text)
    assert len(codes) == 10
    # A new session (and CSRF token) replaced the enrolment-only one.
    new_token = csrf_of(confirmed.text)
    assert new_token != csrf_of(started.text)
    assert client.get("/clinic/patients").status_code == 200
    account = client.get("/account")
    assert codes[0] not in account.text


def test_provisioned_staff_see_recovery_codes_once(web_world: WebWorld) -> None:
    fresh = make_user(web_world.runtime, "dr.fresh", [("H1", Role.PHYSICIAN)])
    client = web_world.browser()
    form = client.get("/login")
    step = client.post(
        "/login",
        data={
            "username": fresh.username,
            "password": fresh.password,
            "csrf_token": csrf_of(form.text),
        },
    )
    token = re.search(r'name="mfa_token" value="([^"]+)"', step.text)
    assert token is not None
    bad = client.post(
        "/login/mfa",
        data={"mfa_token": token.group(1), "code": "12", "csrf_token": csrf_of(form.text)},
    )
    assert bad.status_code == 401
    assert "That code is not valid or has expired." in bad.text
    first = client.post(
        "/login/mfa",
        data={
            "mfa_token": token.group(1),
            "code": fresh.code(web_world.clock),
            "csrf_token": csrf_of(form.text),
        },
    )
    assert first.status_code == 200
    assert len(re.findall(r"<li><code>", first.text)) == 10
    logout = client.post("/logout", data={"csrf_token": csrf_of(first.text)})
    assert "You have signed out." in logout.text
    again = web_world.browser()
    web_sign_in(again, fresh, web_world.clock)
    assert "<li><code>" not in again.get("/clinic/patients").text


def test_patient_record_shows_the_chart_and_tables(web_world: WebWorld) -> None:
    client = web_world.browser()
    web_sign_in(client, web_world.patient, web_world.clock)
    page = client.get("/my/record")
    assert page.status_code == 200
    assert "Wei Zhang" in page.text
    assert page.text.count("<circle") == 3
    assert 'role="img"' in page.text
    assert "82 beats/minute" in page.text


def test_access_history_entries_verify_against_the_checkpoint(web_world: WebWorld) -> None:
    doctor = web_world.browser()
    web_sign_in(doctor, web_world.doctor, web_world.clock)
    assert doctor.get(f"/clinic/patients/{web_world.patient_id}").status_code == 200
    _integrate(web_world.runtime)
    size, root = _checkpoint(web_world.runtime)

    patient = web_world.browser()
    web_sign_in(patient, web_world.patient, web_world.clock)
    history = patient.get("/my/access")
    assert history.status_code == 200
    assert "Test dr.one" in history.text
    assert "viewed" in history.text
    seqs = [int(s) for s in re.findall(r'data-proof-url="/my/access/(\d+)/proof', history.text)]
    assert seqs
    for seq in seqs[:3]:
        proof = patient.get(f"/my/access/{seq}/proof", params={"size": size}).json()
        assert proof["tree_size"] == size
        verify_inclusion(
            base64.b64decode(proof["leaf_hash"]),
            proof["leaf_index"],
            size,
            [base64.b64decode(h) for h in proof["inclusion_path"]],
            root,
        )
    # Only published sizes, only the patient's own entries.
    assert patient.get(f"/my/access/{seqs[0]}/proof", params={"size": size + 1}).status_code == 404
    with web_world.runtime.database.unit_of_work() as session:
        other = session.scalar(
            select(AuditEventRecord.seq).where(AuditEventRecord.type == "auth:login:success")
        )
    assert patient.get(f"/my/access/{other}/proof", params={"size": size}).status_code == 404


def test_withdrawing_sharing_closes_the_chart_and_category_hides_data(web_world: WebWorld) -> None:
    psy = observation(web_world.patient_id, value=1.0, code="72166-2", labels=["PSY"])
    made = web_world.api.post(
        "/fhir/R4/Observation", json=psy, headers=fhir_headers(web_world.doctor_token)
    )
    assert made.status_code == 201
    with web_world.runtime.database.unit_of_work() as session:
        h1 = session.scalars(select(Organization).where(Organization.code == "H1")).one()
    patient = web_world.browser()
    token = web_sign_in(patient, web_world.patient, web_world.clock)
    doctor = web_world.browser()
    web_sign_in(doctor, web_world.doctor, web_world.clock)
    chart = f"/clinic/patients/{web_world.patient_id}"
    assert "72166-2" in doctor.get(chart).text

    hidden = patient.post(
        "/my/consents", data={"category": "PSY", "share": "no", "csrf_token": token}
    )
    assert 'data-category="PSY"' in hidden.text
    assert doctor.get(chart).status_code == 200
    assert "72166-2" not in doctor.get(chart).text

    withdrawn = patient.post(
        "/my/consents", data={"org": str(h1.id), "share": "no", "csrf_token": token}
    )
    assert re.search(
        r'data-org="H1">\s*<th[^>]*>[^<]*<span[^>]*>\(H1\)</span></th>\s*<td><span class="tag warning">',
        withdrawn.text,
    )
    refused = doctor.get(chart)
    assert refused.status_code == 404
    assert "No access to this record" in refused.text
    assert "Wei Zhang" not in doctor.get("/clinic/patients").text

    # In an emergency the grant overrides the denial (PIPL), and the chart keeps using it.
    doctor_token = csrf_of(refused.text)
    emergency = doctor.post(
        chart + "/break-glass", data={"reason": REASON, "csrf_token": doctor_token}
    )
    assert emergency.status_code == 200
    assert "break-glass-banner" in emergency.text
    assert "break-glass-banner" in doctor.get(chart).text

    patient.post("/my/consents", data={"org": str(h1.id), "share": "yes", "csrf_token": token})
    assert doctor.get(chart).status_code == 200
    unknown = patient.post(
        "/my/consents", data={"org": str(uuid.uuid4()), "share": "no", "csrf_token": token}
    )
    assert unknown.status_code == 400


def test_break_glass_is_granted_shown_notified_and_reviewed(web_world: WebWorld) -> None:
    outsider = web_world.browser()
    token = web_sign_in(outsider, web_world.outsider, web_world.clock)
    chart = f"/clinic/patients/{web_world.patient_id}"
    refused = outsider.get(chart)
    assert refused.status_code == 404
    assert 'id="break-glass-dialog"' in refused.text
    short = outsider.post(chart + "/break-glass", data={"reason": "urgent", "csrf_token": token})
    assert short.status_code == 400
    assert "at least 10" in short.text
    missing = outsider.post(
        f"/clinic/patients/{uuid.uuid4()}/break-glass", data={"reason": REASON, "csrf_token": token}
    )
    assert missing.status_code == 404
    opened = outsider.post(chart + "/break-glass", data={"reason": REASON, "csrf_token": token})
    assert opened.status_code == 200
    assert "Emergency access (break-glass)" in opened.text
    assert "break-glass-banner" in opened.text
    assert "Wei Zhang" in opened.text

    patient = web_world.browser()
    web_sign_in(patient, web_world.patient, web_world.clock)
    assert "1 new" in patient.get("/my/record").text
    notes = patient.get("/my/notifications")
    assert "Your record was opened in an emergency." in notes.text
    assert REASON in notes.text
    assert "Test dr.two" in notes.text
    read = patient.post("/my/notifications/read", data={"csrf_token": csrf_of(notes.text)})
    assert "1 new" not in read.text

    officer = make_user(web_world.runtime, "privacy.h2", [("H2", Role.PRIVACY_OFFICER)])
    other = make_user(web_world.runtime, "privacy.h1", [("H1", Role.PRIVACY_OFFICER)])
    reviewer = web_world.browser()
    review_token = web_sign_in(reviewer, officer, web_world.clock)
    queue = reviewer.get("/org/reviews")
    assert REASON in queue.text
    with web_world.runtime.database.unit_of_work() as session:
        task = session.scalars(select(ReviewTask)).one()
    # Another organisation's officer cannot see or decide it.
    stranger = web_world.browser()
    stranger_token = web_sign_in(stranger, other, web_world.clock)
    assert REASON not in stranger.get("/org/reviews").text
    assert (
        stranger.post(
            f"/org/reviews/{task.id}", data={"decision": "approve", "csrf_token": stranger_token}
        ).status_code
        == 404
    )
    decided = reviewer.post(
        f"/org/reviews/{task.id}", data={"decision": "flag", "csrf_token": review_token}
    )
    assert decided.status_code == 200
    assert "flagged" in decided.text
    again = reviewer.post(
        f"/org/reviews/{task.id}", data={"decision": "approve", "csrf_token": review_token}
    )
    assert again.status_code == 409
    with web_world.runtime.database.unit_of_work() as session:
        event = session.scalars(
            select(AuditEventRecord).where(AuditEventRecord.type == "access:break-glass:reviewed")
        ).one()
    assert "decision=flagged" in event.body["reasons"]


def test_admin_sees_own_organisation_and_revokes_sessions(web_world: WebWorld) -> None:
    admin = make_user(web_world.runtime, "admin.h1", [("H1", Role.ORG_ADMIN)])
    client = web_world.browser()
    token = web_sign_in(client, admin, web_world.clock)
    users = client.get("/org/users")
    assert users.status_code == 200
    assert 'data-username="dr.one"' in users.text
    assert 'data-username="dr.two"' not in users.text  # Another organisation's.
    assert "Staff with two-step sign-in" in users.text

    doctor = web_world.browser()
    web_sign_in(doctor, web_world.doctor, web_world.clock)
    revoked = client.post(
        f"/org/users/{web_world.doctor.user_id}/revoke-sessions", data={"csrf_token": token}
    )
    assert "sessions were ended" in revoked.text
    gone = doctor.get("/clinic/patients", follow_redirects=False)
    assert gone.status_code == 303
    outsider_id = web_world.outsider.user_id
    assert (
        client.post(
            f"/org/users/{outsider_id}/revoke-sessions", data={"csrf_token": token}
        ).status_code
        == 404
    )


def test_security_officer_searches_and_verifies_the_log(web_world: WebWorld) -> None:
    officer = make_user(web_world.runtime, "sec.h1", [("H1", Role.SECURITY_OFFICER)])
    doctor = web_world.browser()
    web_sign_in(doctor, web_world.doctor, web_world.clock)
    doctor.get(f"/clinic/patients/{web_world.patient_id}")
    _integrate(web_world.runtime)
    client = web_world.browser()
    token = web_sign_in(client, officer, web_world.clock)
    found = client.get("/org/audit", params={"patient": web_world.patient_id})
    assert found.status_code == 200
    assert "fhir:patient:everything" in found.text
    assert "Test dr.one" in found.text
    by_user = client.get("/org/audit", params={"user": "dr.one", "type": "fhir:patient:everything"})
    assert "fhir:patient:everything" in by_user.text
    assert "No user has that username." in client.get("/org/audit", params={"user": "nobody"}).text
    assert "YYYY-MM-DD" in client.get("/org/audit", params={"date_from": "yesterday"}).text

    status = client.get("/org/audit/status")
    assert "Latest signed tree head" in status.text
    assert "not run from this server" in status.text or "intact" in status.text
    verified = client.post("/org/audit/verify", data={"csrf_token": token})
    assert verified.status_code == 200
    assert "intact" in verified.text


def test_collaboration_pages_are_real_pages_for_their_roles(web_world: WebWorld) -> None:
    """The menu's collaboration entries lead to working pages (no "coming soon"), each for its
    role only; their flows are tested in test_collab_pages.py."""
    client = web_world.browser()
    web_sign_in(client, web_world.doctor, web_world.clock)
    for path, heading, form in (
        ("/clinic/referrals", "Referrals", 'action="/clinic/referrals"'),
        ("/clinic/consultations", "Consultations", 'action="/clinic/consultations"'),
        ("/clinic/appointments", "Appointments", 'action="/clinic/appointments/schedules"'),
    ):
        page = client.get(path)
        assert page.status_code == 200
        assert f"<h1>{heading}</h1>" in page.text
        assert form in page.text
        assert "coming soon" not in page.text
        assert f'<a href="{path}" aria-current="page">' in page.text
    assert client.get("/my/referrals").status_code == 403  # Patients' pages need a patient role.
    assert client.get("/clinic/unknown").status_code == 404
    patient = web_world.browser()
    web_sign_in(patient, web_world.patient, web_world.clock)
    for path in ("/my/referrals", "/my/consultations", "/my/appointments"):
        page = patient.get(path)
        assert page.status_code == 200
        assert "coming soon" not in page.text
    assert patient.get("/clinic/consultations").status_code == 403


def test_language_switch(web_world: WebWorld) -> None:
    client = web_world.browser()
    login = client.get("/login")
    assert '<html lang="en">' in login.text
    switched = client.post(
        "/lang", data={"lang": "zh-CN", "next": "/login", "csrf_token": csrf_of(login.text)}
    )
    assert '<html lang="zh-CN">' in switched.text
    assert "登录" in switched.text
    assert (
        client.post("/lang", data={"lang": "xx", "csrf_token": csrf_of(login.text)}).status_code
        == 400
    )
    web_sign_in(client, web_world.patient, web_world.clock)
    record = client.get("/my/record")
    assert "我的病历" in record.text
    assert "生命体征趋势" in record.text
    back = client.post(
        "/lang", data={"lang": "en", "next": "/my/record", "csrf_token": csrf_of(record.text)}
    )
    assert "Vital signs over time" in back.text
    browser_chinese = web_world.browser()
    page = browser_chinese.get("/login", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.5"})
    assert '<html lang="zh-CN">' in page.text
