"""The TLS certificate of an embedded deployment.

:func:`ensure_certificate` issues a self-signed server certificate on first start so that
medcollab never has to serve plain HTTP, even on a single machine without a PKI. It follows the
CA/Browser Forum baseline for leaf certificates where it applies to a self-signed one: an ECDSA
P-256 key signed with SHA-256, names only in the SubjectAltName, no CA rights, ``serverAuth`` only
and at most 397 days of validity. It never overwrites an existing file: an operator who replaces
the generated pair with a real certificate must not lose it on the next restart.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medcollab.errors import ConfigurationError

#: The longest validity the CA/Browser Forum allows for a server certificate (398 days), less one
#: day so that clients that count boundaries differently never see it as too long.
MAX_VALIDITY: Final = timedelta(days=397)
#: Back-dating absorbs clock skew between this server and its first clients.
_BACKDATE: Final = timedelta(minutes=5)
_KEY_MODE: Final = 0o600
_CERT_MODE: Final = 0o644
_DIR_MODE: Final = 0o700


def ensure_certificate(
    cert_path: Path,
    key_path: Path,
    *,
    hostnames: Sequence[str] = ("localhost",),
    addresses: Sequence[str] = ("127.0.0.1", "::1"),
    now: datetime | None = None,
) -> bool:
    """Create a self-signed certificate and its key unless both files exist.

    Returns ``True`` when it created them and ``False`` when both were already there. Raises
    :class:`~medcollab.errors.ConfigurationError` when only one of the two exists: generating the
    other would pair a certificate with a key it was not made for, and replacing the existing one
    would destroy an operator's file.
    """
    cert_exists, key_exists = cert_path.exists(), key_path.exists()
    if cert_exists and key_exists:
        return False
    if cert_exists or key_exists:
        present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
        raise ConfigurationError(
            f"TLS file {present} exists but {missing} does not",
            hint=f"restore {missing}, or remove {present} to have a new self-signed pair generated",
        )
    issued_at = now if now is not None else datetime.now(UTC)
    if issued_at.tzinfo is None:
        raise ValueError("now must be timezone-aware")

    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _self_signed(key, hostnames=hostnames, addresses=addresses, now=issued_at)
    key_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        # The server reads the key unattended at start, so it cannot be passphrase-protected; the
        # file mode (0600) and the data directory (0700) protect it instead.
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    # The key is written first and the certificate last, so an interrupted run leaves a key without
    # a certificate, which the next start reports, and never a certificate without its key.
    _write_new_file(key_path, key_pem, _KEY_MODE)
    _write_new_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
    return True


def certificate_fingerprint(cert_path: Path) -> str:
    """The SHA-256 fingerprint of a PEM certificate as colon-separated upper-case hex.

    This is the form browsers and ``openssl x509 -fingerprint -sha256`` show, so a person can
    compare it when they accept a self-signed certificate.
    """
    digest = _load(cert_path).fingerprint(hashes.SHA256())
    return ":".join(f"{byte:02X}" for byte in digest)


def certificate_expiry(cert_path: Path) -> datetime:
    """When the PEM certificate at ``cert_path`` stops being valid (timezone-aware, UTC)."""
    return _load(cert_path).not_valid_after_utc


def _load(cert_path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise ConfigurationError(
            f"{cert_path} is not a PEM certificate",
            hint="point MEDCOLLAB_TLS_CERT_FILE at the PEM certificate file",
        ) from None


def _self_signed(
    key: ec.EllipticCurvePrivateKey,
    *,
    hostnames: Sequence[str],
    addresses: Sequence[str],
    now: datetime,
) -> x509.Certificate:
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in hostnames]
    alt_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
    if not alt_names:
        raise ValueError("a certificate needs at least one host name or address")
    common_name = hostnames[0] if hostnames else addresses[0]
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medcollab self-signed"),
        ]
    )
    public_key = key.public_key()
    not_before = now - _BACKDATE
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + MAX_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # Strict verifiers (Python 3.13's default context among them) want the key identifiers
        # even on a self-signed certificate.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents with mode 0700; leave existing ones alone."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=_DIR_MODE)
            # mkdir's mode is filtered by the umask, which may only remove bits; chmod makes the
            # mode exact whatever the umask.
            path.chmod(_DIR_MODE)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file at ``path``; fail if anything exists there.

    The bytes go to a temporary file created with ``O_EXCL`` and the final mode (so the key is never
    readable by others, not even for a moment), are flushed to disk, and are then hard-linked into
    place: ``link`` fails instead of replacing an existing file, and the final name only ever refers
    to a complete file.
    """
    _make_private_dirs(path.parent)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            # The mode given to open() is filtered by the umask; fchmod makes it exact.
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory_fd = os.open(path.parent, os.O_RDONLY)
    try:
        # The new directory entry must survive a power cut as well as the bytes it names.
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
