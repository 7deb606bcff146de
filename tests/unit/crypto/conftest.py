"""Every test that asks for ``key_provider`` runs once with the file provider and once with SoftHSM2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from medcollab.crypto.providers import KeyProvider
from tests.support import softhsm


@pytest.fixture(params=["file", "pkcs11"])
def key_provider(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyProvider]:
    try:
        provider = softhsm.provider(request.param, tmp_path / "keys")
    except softhsm.SoftHsmUnavailable as exc:
        pytest.fail(f"SoftHSM2 is needed for the pkcs11 provider tests: {exc}", pytrace=False)
    try:
        yield provider
    finally:
        provider.close()
