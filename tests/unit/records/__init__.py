"""Records: FHIR R4 validation and search parameters (pure functions, real HL7 and Synthea data)."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

_REPO = Path(__file__).resolve().parents[3]


@cache
def fhir_data() -> Path:
    """The shared FHIR test data: beside the clone (CI), or where MEDCOLLAB_FHIR_DATA points."""
    candidates = [_REPO.parent / "shared" / "data" / "fhir", Path("/work/shared/data/fhir")]
    if os.environ.get("MEDCOLLAB_FHIR_DATA"):
        candidates.insert(0, Path(os.environ["MEDCOLLAB_FHIR_DATA"]))
    for candidate in candidates:
        if (candidate / "hl7-r4-examples").is_dir() and (candidate / "synthea-r4").is_dir():
            return candidate
    pytest.skip("the shared FHIR test data (shared/data/fhir) is not on this machine")


def example(name: str) -> dict[str, Any]:
    """One HL7 R4 example by file stem, such as ``Patient-example``."""
    path = fhir_data() / "hl7-r4-examples" / f"{name}.json"
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result


def synthea_bundle(stem: str) -> dict[str, Any]:
    path = fhir_data() / "synthea-r4" / f"{stem}.json"
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result
