"""Switching the interface to Simplified Chinese."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from medcollab.kernel.permissions import Role
from tests.browser.conftest import Pages, World, sign_in, snapshot


def test_switching_to_chinese(world: World, pages: Pages) -> None:
    org = world.org("LANG")
    doctor = world.staff("doctor", org, Role.PHYSICIAN)
    patient_id = world.register_patient(doctor, org)
    patient = world.patient_account("patient", org, patient_id)

    page = pages.new()
    page.goto("/login")
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_role("button", name="简体中文").click()
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    expect(page.get_by_role("heading", name="登录")).to_be_visible()
    expect(page.get_by_label("用户名")).to_be_visible()

    sign_in(page, patient, mfa=False)
    expect(page).to_have_url(re.compile(r"/my/record$"))
    expect(page.get_by_role("heading", name="我的病历", level=1)).to_be_visible()
    expect(page.get_by_role("navigation", name="主菜单")).to_contain_text("谁查看了我的病历")
    expect(page.get_by_role("heading", name="生命体征趋势")).to_be_visible()
    expect(page.get_by_role("button", name="退出登录", exact=True)).to_be_visible()
    snapshot(page, "my-record-zh-CN")

    # The choice is remembered, and switching back works the same way.
    page.goto("/my/consents")
    expect(page.get_by_role("heading", name="共享与同意", level=1)).to_be_visible()
    page.get_by_role("button", name="English").click()
    expect(page.get_by_role("heading", name="Sharing and consents", level=1)).to_be_visible()
