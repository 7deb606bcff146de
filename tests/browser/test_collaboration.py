"""A referral across organisations in the browser: the family doctor refers, the specialist
accepts and opens the chart, the patient sees the referral on their own page."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from medcollab.kernel.permissions import Role
from tests.browser.conftest import Pages, World, sign_in

REASON = "Palpitations for three weeks; please assess for atrial fibrillation"


def test_referral_is_sent_accepted_and_shown_to_the_patient(world: World, pages: Pages) -> None:
    home = world.org("GP", "Jing'an Community Clinic")
    heart = world.org("CARDIO", "Ruijin Heart Centre")
    family_doctor = world.staff("gp", home, Role.PHYSICIAN)
    patient_id = world.register_patient(family_doctor, home)
    patient = world.patient_account("patient", home, patient_id)
    cardiologist = world.staff("cardio", heart, Role.PHYSICIAN)

    gp = pages.new()
    sign_in(gp, family_doctor)
    gp.get_by_role("navigation", name="Main menu").get_by_role("link", name="Referrals").click()
    gp.get_by_label("Patient ID").fill(patient_id)
    gp.get_by_label("Refer to organisation").select_option(heart)
    gp.get_by_label("Reason for the referral").fill(REASON)
    gp.get_by_role("button", name="Send referral").click()
    expect(gp.get_by_role("heading", level=1)).to_have_text(f"Referral of patient {patient_id}")
    expect(gp.locator("#referral")).to_contain_text("Requested")

    specialist = pages.new()
    sign_in(specialist, cardiologist)
    specialist.goto("/clinic/referrals")
    row = specialist.locator("#incoming tbody tr").filter(has_text=patient_id)
    row.get_by_role("button", name=f"Accept referral of {patient_id}").click()
    expect(specialist.locator("#referral")).to_contain_text("Accepted")
    specialist.get_by_role("link", name="Open chart").click()
    expect(specialist.locator("#table-allergies")).to_contain_text("Penicillin")

    me = pages.new()
    sign_in(me, patient, mfa=False)
    me.get_by_role("link", name="Referrals").click()
    expect(me).to_have_url(re.compile(r"/my/referrals$"))
    mine = me.locator("#referrals tbody tr").filter(has_text="Ruijin Heart Centre")
    expect(mine).to_contain_text(REASON)
    expect(mine).to_contain_text("Accepted")
    expect(mine.get_by_role("button", name="End referral to Ruijin Heart Centre")).to_be_visible()
