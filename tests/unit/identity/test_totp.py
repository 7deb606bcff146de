"""RFC 6238 Appendix B test vectors and the verifier's window and replay rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from medcollab.identity.totp import Authenticator, qr_svg, step_of

# RFC 6238 Appendix B: the seeds are the ASCII string "1234567890" repeated to the digest size.
SEED_SHA1 = b"12345678901234567890"
SEED_SHA256 = b"12345678901234567890123456789012"
SEED_SHA512 = b"1234567890123456789012345678901234567890123456789012345678901234"

VECTORS = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]


@pytest.mark.parametrize(("unix_time", "sha1", "sha256", "sha512"), VECTORS)
def test_rfc6238_appendix_b_vectors(unix_time: int, sha1: str, sha256: str, sha512: str) -> None:
    moment = datetime.fromtimestamp(unix_time, UTC)
    assert Authenticator(SEED_SHA1, digits=8, digest="sha1").code_at(moment) == sha1
    assert Authenticator(SEED_SHA256, digits=8, digest="sha256").code_at(moment) == sha256
    assert Authenticator(SEED_SHA512, digits=8, digest="sha512").code_at(moment) == sha512


def test_window_accepts_one_step_of_drift_either_side() -> None:
    auth = Authenticator(SEED_SHA1)
    now = datetime(2026, 3, 1, 12, 0, 15, tzinfo=UTC)
    current = step_of(now)
    assert auth.matching_step(auth.code_at(now), now) == current
    assert auth.matching_step(auth.code_at(now - timedelta(seconds=30)), now) == current - 1
    assert auth.matching_step(auth.code_at(now + timedelta(seconds=30)), now) == current + 1
    assert auth.matching_step(auth.code_at(now - timedelta(seconds=60)), now) is None
    assert auth.matching_step(auth.code_at(now + timedelta(seconds=60)), now) is None


def test_wrong_and_malformed_codes_do_not_match() -> None:
    auth = Authenticator(SEED_SHA1)
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    right = auth.code_at(now)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    for code in (wrong, "", "12345", "1234567", "abcdef", right + "0"):
        assert auth.matching_step(code, now) is None


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        step_of(datetime(2026, 1, 1))  # noqa: DTZ001 - the point of the test.


def test_provisioning_uri_and_qr_code() -> None:
    auth = Authenticator(SEED_SHA1)
    uri = auth.provisioning_uri("dr.li", "medcollab")
    assert uri.startswith("otpauth://totp/medcollab:dr.li?")
    assert f"secret={auth.secret_base32}" in uri
    assert "issuer=medcollab" in uri
    svg = qr_svg(uri)
    assert svg.lstrip().startswith("<?xml") or svg.lstrip().startswith("<svg")
    assert "<title>Authenticator enrolment QR code</title>" in svg
