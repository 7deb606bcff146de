#!/usr/bin/env python3
"""Take the README tour's screenshots of the web app from a real browser test run.

Usage (from the repository root)::

    .venv/bin/python tools/screenshots.py            # writes docs/screenshots/*.png

It runs two browser tests, which drive Debian's Chromium against a real HTTPS server with
synthetic data, with ``MEDCOLLAB_SCREENSHOT_DIR`` set, so that on the way they save
``clinician-chart.png`` (a chart opened in an emergency, with its banner), ``access-history.png``
(the patient's view of who accessed the record, one entry verified) and ``my-record-zh-CN.png``
(the patient's record in Simplified Chinese). Chinese text needs a CJK font: on Debian, as root, ``fonts-wqy-microhei`` is installed first
when no CJK font is present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "screenshots"
TESTS = (
    "tests/browser/test_clinician.py::test_break_glass",
    "tests/browser/test_language.py::test_switching_to_chinese",
)


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    # Fixed programs and arguments only; nothing here comes from the outside.
    return subprocess.run(command, check=False, text=True, **kwargs)  # noqa: S603


def _has_cjk_font() -> bool:
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return False
    return bool(_run([fc_list, ":lang=zh-cn", "family"], capture_output=True).stdout.strip())


def _ensure_cjk_font() -> None:
    apt = shutil.which("apt-get")
    if _has_cjk_font() or apt is None or os.geteuid() != 0:
        return
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    command = [apt, "install", "-y", "-q", "fonts-wqy-microhei"]
    if _run(command, **quiet).returncode != 0:
        _run([apt, "update", "-q"], **quiet)
        _run(command, **quiet)


def main() -> int:
    _ensure_cjk_font()
    TARGET.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MEDCOLLAB_SCREENSHOT_DIR": str(TARGET)}
    result = _run(
        [sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env
    )
    if result.returncode == 0:
        for shot in sorted(TARGET.glob("*.png")):
            print(f"wrote {shot.relative_to(ROOT)}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
