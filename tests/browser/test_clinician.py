"""The clinician's emergency access: refused without a care relationship, opened through the
break-glass dialog with a reason, a banner while the grant lasts; the patient is told and the
privacy officer reviews it."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from medcollab.kernel.permissions import Role
from tests.browser.conftest import Pages, World, sign_in, snapshot, verify_history_entry


def test_break_glass(world: World, pages: Pages) -> None:
    home = world.org("HOME", "Jing'an Community Clinic")
    er = world.org("ER", "Pudong Emergency Hospital")
    family_doctor = world.staff("gp", home, Role.PHYSICIAN, display_name="Dr Zhou Min")
    patient_id = world.register_patient(family_doctor, home)
    patient = world.patient_account("patient", home, patient_id, display_name="Wang Fang")
    emergency_doctor = world.staff("er", er, Role.PHYSICIAN, display_name="Dr Chen Jing")
    officer = world.staff("privacy", er, Role.PRIVACY_OFFICER, display_name="Liu Yang")

    page = pages.new()
    sign_in(page, emergency_doctor)
    page.get_by_label("Open a chart by patient ID").fill(patient_id)
    page.get_by_role("button", name="Open", exact=True).click()
    expect(page.get_by_role("heading", name="No access to this record")).to_be_visible()

    page.get_by_role("link", name="Emergency access (break-glass)").click()
    dialog = page.get_by_role("dialog", name="Emergency access (break-glass)")
    expect(dialog).to_be_visible()
    reason = dialog.get_by_label(re.compile("^Reason"))
    expect(reason).to_be_focused()
    # Too short a reason is refused by the browser and, without it, by the server.
    reason.fill("urgent")
    dialog.get_by_role("button", name="Open the record in an emergency").click()
    expect(dialog).to_be_visible()
    assert reason.evaluate("element => element.validity.tooShort")
    reason.fill("Unconscious after a road accident; need allergies and medication")
    dialog.get_by_role("button", name="Open the record in an emergency").click()

    banner = page.get_by_role("alert").filter(has_text="Emergency access (break-glass)")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("lasts until")
    expect(banner.locator(".countdown")).to_have_text(re.compile(r"^(59|60) minutes left$"))
    expect(page.locator("#table-allergies")).to_contain_text("Penicillin")
    snapshot(page, "clinician-chart")

    # The patient is told, with who, where and why.
    me = pages.new()
    sign_in(me, patient, mfa=False)
    expect(me.get_by_role("link", name=re.compile("Notifications.*1 new"))).to_be_visible()
    me.get_by_role("link", name=re.compile("^Notifications")).click()
    notice = me.locator("#notifications li").first
    expect(notice).to_contain_text("Your record was opened in an emergency.")
    expect(notice).to_contain_text("road accident")
    me.get_by_role("link", name="Who accessed my record").click()
    emergency = me.locator("#access-history li.entry.break-glass").first
    expect(emergency).to_contain_text("Emergency access (break-glass)")
    expect(emergency).to_contain_text("Purpose: Emergency treatment")
    refused = me.locator("#access-history li.entry.denied").first
    expect(refused).to_contain_text("Refused")
    verify_history_entry(me, emergency)
    snapshot(me, "access-history")

    # The privacy officer of the emergency doctor's organisation reviews it.
    review = pages.new()
    sign_in(review, officer)
    expect(review).to_have_url(re.compile(r"/org/reviews$"))
    row = review.locator("#reviews tbody tr").filter(has_text="road accident")
    row.get_by_role("button", name="Approve").click()
    row = review.locator("#reviews tbody tr").filter(has_text="road accident")
    expect(row).to_contain_text("approved")
