"""The self-signed certificate issued on first start."""

from __future__ import annotations

import ipaddress
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from medcollab.crypto.tls import (
    MAX_VALIDITY,
    certificate_expiry,
    certificate_fingerprint,
    ensure_certificate,
)
from medcollab.errors import ConfigurationError

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "data" / "tls" / "cert.pem", tmp_path / "data" / "tls" / "key.pem"


def _load(cert_path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_path.read_bytes())


def test_creates_a_p256_sha256_server_certificate(paths: tuple[Path, Path]) -> None:
    cert_path, key_path = paths

    assert ensure_certificate(cert_path, key_path, now=NOW) is True

    cert = _load(cert_path)
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.issuer == cert.subject
    # The certificate verifies under its own key: it is self-signed, not signed by anything else.
    cert.verify_directly_issued_by(cert)

    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.key_encipherment
    extended = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(extended) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_names_the_loopback_host_and_addresses(paths: tuple[Path, Path]) -> None:
    cert_path, key_path = paths

    ensure_certificate(
        cert_path,
        key_path,
        hostnames=("localhost", "medcollab.example"),
        addresses=("127.0.0.1", "::1", "10.0.0.7"),
        now=NOW,
    )

    names = _load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "medcollab.example"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
    ]


def test_validity_is_at_most_397_days_and_starts_now(paths: tuple[Path, Path]) -> None:
    cert_path, key_path = paths

    ensure_certificate(cert_path, key_path, now=NOW)

    cert = _load(cert_path)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= timedelta(days=397)
    assert lifetime == MAX_VALIDITY
    # Back-dated by minutes only, to absorb clock skew.
    assert NOW - timedelta(hours=1) < cert.not_valid_before_utc <= NOW
    assert certificate_expiry(cert_path) == cert.not_valid_after_utc


def test_key_file_is_private_and_matches_the_certificate(paths: tuple[Path, Path]) -> None:
    cert_path, key_path = paths

    ensure_certificate(cert_path, key_path, now=NOW)

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_path.parent.parent.stat().st_mode) == 0o700
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    cert_key = _load(cert_path).public_key()
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # No temporary file is left behind next to the pair.
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["cert.pem", "key.pem"]


def test_key_mode_does_not_depend_on_the_umask(paths: tuple[Path, Path]) -> None:
    cert_path, key_path = paths
    previous = os.umask(0)
    try:
        ensure_certificate(cert_path, key_path, now=NOW)
    finally:
        os.umask(previous)

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700


def test_existing_directories_keep_their_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)

    ensure_certificate(shared / "cert.pem", shared / "key.pem", now=NOW)

    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


def test_never_overwrites_an_existing_pair(paths: tuple[Path, Path]) -> None:
    cert_path, key_path = paths
    ensure_certificate(cert_path, key_path, now=NOW)
    cert_before, key_before = cert_path.read_bytes(), key_path.read_bytes()

    assert ensure_certificate(cert_path, key_path, now=NOW + timedelta(days=1)) is False

    assert cert_path.read_bytes() == cert_before
    assert key_path.read_bytes() == key_before


@pytest.mark.parametrize("kept", ["cert", "key"])
def test_refuses_to_complete_half_a_pair(paths: tuple[Path, Path], kept: str) -> None:
    cert_path, key_path = paths
    ensure_certificate(cert_path, key_path, now=NOW)
    removed = key_path if kept == "cert" else cert_path
    present = cert_path if kept == "cert" else key_path
    removed.unlink()
    before = present.read_bytes()

    with pytest.raises(ConfigurationError) as caught:
        ensure_certificate(cert_path, key_path, now=NOW)

    assert str(removed) in caught.value.diagnostics()
    assert str(present) in caught.value.diagnostics()
    assert present.read_bytes() == before
    assert not removed.exists()


def test_refuses_a_naive_time(paths: tuple[Path, Path]) -> None:
    cert_path, key_path = paths
    with pytest.raises(ValueError, match="timezone-aware"):
        ensure_certificate(cert_path, key_path, now=NOW.replace(tzinfo=None))
    assert not cert_path.exists()
    assert not key_path.exists()


def test_refuses_a_certificate_without_names(paths: tuple[Path, Path]) -> None:
    cert_path, key_path = paths
    with pytest.raises(ValueError, match="at least one"):
        ensure_certificate(cert_path, key_path, hostnames=(), addresses=(), now=NOW)
    assert not key_path.exists()


def test_fingerprint_is_colon_separated_sha256(paths: tuple[Path, Path]) -> None:
    cert_path, key_path = paths
    ensure_certificate(cert_path, key_path, now=NOW)

    fingerprint = certificate_fingerprint(cert_path)

    expected = _load(cert_path).fingerprint(hashes.SHA256()).hex().upper()
    assert fingerprint.replace(":", "") == expected
    assert len(fingerprint.split(":")) == 32
    assert all(len(part) == 2 for part in fingerprint.split(":"))


def test_fingerprint_of_a_non_certificate_names_the_file(tmp_path: Path) -> None:
    bogus = tmp_path / "cert.pem"
    bogus.write_text("not a certificate", encoding="utf-8")

    with pytest.raises(ConfigurationError, match=r"cert\.pem is not a PEM certificate"):
        certificate_fingerprint(bogus)
