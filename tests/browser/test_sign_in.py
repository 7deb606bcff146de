"""Signing in: first-login enrolment of an authenticator with its QR code, recovery codes shown
once, a later sign-in with a code, signing out, and the warning before the idle timeout."""

from __future__ import annotations

import re

import pyotp
from playwright.sync_api import expect

from medcollab.kernel.permissions import Role
from tests.browser.conftest import Pages, World, sign_in, totp_code


def test_first_sign_in_enrols_an_authenticator(world: World, pages: Pages) -> None:
    org = world.org("ENROL")
    nurse = world.staff("nurse", org, Role.NURSE, provision_mfa=False)
    page = pages.new()

    # A staff account without an authenticator gets an enrolment-only session.
    sign_in(page, nurse, mfa=False)
    expect(page).to_have_url(re.compile(r"/account/enrol$"))
    expect(page.locator("nav.site-nav")).to_have_count(0)
    page.get_by_role("button", name="Begin").click()

    qr = page.get_by_role("img", name=re.compile("QR code"))
    expect(qr).to_be_visible()
    assert (qr.get_attribute("src") or "").startswith("data:image/svg+xml;base64,")
    secret = page.locator("code.secret").get_attribute("data-secret")
    assert secret
    # The test is the nurse's authenticator app from here on.
    nurse.otpauth_uri = pyotp.TOTP(secret).provisioning_uri(
        name=nurse.username, issuer_name="medcollab"
    )
    page.get_by_label("Six-digit code").fill(totp_code(nurse))
    page.get_by_role("button", name="Confirm").click()

    codes = page.locator("ol.recovery-codes li")
    expect(codes).to_have_count(10)
    first_code = codes.first.inner_text()
    assert re.fullmatch(r"[a-z0-9]{4}-[a-z0-9]{4}-[a-z0-9]{4}", first_code)
    page.get_by_role("link", name="I have saved my codes, continue").click()
    expect(page).to_have_url(re.compile(r"/clinic/patients$"))
    expect(page.get_by_role("heading", name="My patients")).to_be_visible()

    # Shown once: the account page does not show them again.
    page.goto("/account")
    expect(page.locator("ol.recovery-codes")).to_have_count(0)
    expect(page.get_by_text(first_code)).to_have_count(0)

    page.get_by_role("button", name="Sign out", exact=True).click()
    expect(page.get_by_text("You have signed out.")).to_be_visible()
    page.goto("/clinic/patients")
    expect(page).to_have_url(re.compile(r"/login\?next=/clinic/patients$"))

    # The next sign-in asks for a code from the enrolled authenticator.
    page.fill("#username", nurse.username)
    page.fill("#password", nurse.password)
    page.click("form[action='/login'] button[type=submit]")
    page.fill("#code", "12345x")
    page.click("form[action='/login/mfa'] button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    page.fill("#code", totp_code(nurse))
    page.click("form[action='/login/mfa'] button[type=submit]")
    expect(page).to_have_url(re.compile(r"/clinic/patients$"))


def test_warning_before_the_idle_timeout(world: World, pages: Pages) -> None:
    org = world.org("IDLE")
    doctor = world.staff("doctor", org, Role.PHYSICIAN)
    page = pages.new()
    page.clock.install()
    sign_in(page, doctor)
    expect(page).to_have_url(re.compile(r"/clinic/patients$"))
    warning = page.get_by_role("alertdialog")
    expect(warning).to_be_hidden()
    # Staff sessions end after 15 idle minutes; the warning comes a minute before.
    page.clock.run_for("13:30")
    expect(warning).to_be_hidden()
    page.clock.run_for("00:40")
    expect(warning).to_be_visible()
    expect(page.get_by_role("button", name="Stay signed in")).to_be_focused()
    page.get_by_role("button", name="Stay signed in").click()
    expect(warning).to_be_hidden()
