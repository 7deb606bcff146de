"""The patient's side: the record with its vital-signs chart, who accessed it (with a proof the
browser checks against the published tree head), and withdrawing sharing with an organisation."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from medcollab.kernel.permissions import Role
from tests.browser.conftest import Pages, World, sign_in, verify_history_entry


def test_patient_sees_and_verifies_a_clinicians_read(world: World, pages: Pages) -> None:
    org = world.org("HIST")
    doctor = world.staff("doctor", org, Role.PHYSICIAN)
    patient_id = world.register_patient(doctor, org)
    patient = world.patient_account("patient", org, patient_id)

    # The clinician opens the chart: one audited read of the whole record.
    clinician = pages.new()
    sign_in(clinician, doctor)
    clinician.get_by_role("link", name="Fang Wang").click()
    expect(clinician.get_by_role("heading", name="Fang Wang", level=1)).to_be_visible()
    expect(clinician.locator("#table-allergies")).to_contain_text("Penicillin")

    me = pages.new()
    sign_in(me, patient, mfa=False)
    expect(me).to_have_url(re.compile(r"/my/record$"))
    expect(me.locator("figure.chart")).to_have_count(3)
    expect(me.get_by_role("img", name=re.compile(r"Blood pressure"))).to_be_visible()

    me.get_by_role("link", name="Who accessed my record").click()
    entry = me.locator("#access-history li.entry").filter(has_text="Test doctor").first
    expect(entry).to_contain_text(f"physician · Organisation {org}")
    expect(entry).to_contain_text("viewed your record")
    expect(entry).to_contain_text("Purpose: Treatment")
    verify_history_entry(me, entry)


def test_withdrawing_sharing_closes_the_chart_to_that_organisation(
    world: World, pages: Pages
) -> None:
    org = world.org("CONSENT")
    doctor = world.staff("doctor", org, Role.PHYSICIAN)
    patient_id = world.register_patient(doctor, org, family="李", given="娜")
    patient = world.patient_account("patient", org, patient_id)

    clinician = pages.new()
    sign_in(clinician, doctor)
    clinician.goto(f"/clinic/patients/{patient_id}")
    expect(clinician.get_by_role("heading", name="李娜", level=1)).to_be_visible()

    me = pages.new()
    sign_in(me, patient, mfa=False)
    me.get_by_role("link", name="Sharing and consents").click()
    row = me.locator(f"#consent-orgs tr[data-org='{org}']")
    expect(row).to_contain_text("shared")
    row.get_by_role("button", name=re.compile("^Stop sharing with")).click()
    row = me.locator(f"#consent-orgs tr[data-org='{org}']")
    expect(row).to_contain_text("withdrawn")
    expect(row.get_by_role("button", name=re.compile("^Share again with"))).to_be_visible()

    # The organisation's clinician can no longer open the chart, nor find the patient.
    clinician.goto(f"/clinic/patients/{patient_id}")
    expect(clinician.get_by_role("heading", name="No access to this record")).to_be_visible()
    expect(clinician.locator("#table-allergies")).to_have_count(0)
    clinician.goto("/clinic/patients")
    expect(clinician.get_by_text("李娜")).to_have_count(0)

    # The refused attempt is in the patient's history, marked as refused.
    me.get_by_role("link", name="Who accessed my record").click()
    refused = me.locator("#access-history li.entry.denied").first
    expect(refused).to_contain_text("Refused")
    expect(refused).to_contain_text("Test doctor")
