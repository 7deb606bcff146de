"""DICOM imaging in the browser: upload a series from the chart, see the study, download an image;
an upload over the limit is stopped in the page before a byte is sent."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom.data
from playwright.sync_api import expect

from medcollab.kernel.permissions import Role
from tests.browser.conftest import Pages, World, sign_in

MR_SERIES = sorted(
    (
        Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892003" / "MR700"
    ).iterdir()
)


def test_upload_a_series_from_the_chart_and_download_an_image(world: World, pages: Pages) -> None:
    radiology = world.org("RAD", "Minhang Imaging Centre")
    doctor = world.staff("rad", radiology, Role.PHYSICIAN)
    patient_id = world.register_patient(doctor, radiology)
    page = pages.new()
    sign_in(page, doctor)
    page.goto(f"/clinic/patients/{patient_id}")
    files = page.get_by_label("DICOM files of one study")
    limit = world.runtime.settings.max_upload_bytes
    files.set_input_files(
        [{"name": "big.dcm", "mimeType": "application/dicom", "buffer": b"\x00" * (limit + 1)}]
    )
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#imaging-files-error")).to_contain_text("nothing was sent")
    expect(page).to_have_url(re.compile(rf"/clinic/patients/{patient_id}$"))

    files.set_input_files([str(path) for path in MR_SERIES[:3]])
    page.get_by_role("button", name="Upload").click()
    expect(page).to_have_url(re.compile(r"/clinic/imaging/[0-9a-f-]{36}"))
    expect(page.locator("#upload-result")).to_contain_text("New images stored: 3")
    # The test record carries no identifier, so the files' PatientID cannot be compared.
    expect(page.locator("#upload-result")).to_contain_text("could not be compared")
    expect(page.locator("#instance-list tbody tr")).to_have_count(3)
    with page.expect_download() as download_info:
        page.locator("#instance-list tbody tr").first.get_by_role(
            "link", name=re.compile("Download")
        ).click()
    downloaded = Path(download_info.value.path()).read_bytes()
    assert downloaded in {path.read_bytes() for path in MR_SERIES[:3]}
