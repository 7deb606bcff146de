"""Ed25519 signatures for the audit log's signed tree heads.

The log signs its checkpoints with one Ed25519 key. :class:`LogSigner` is the small interface the
audit log depends on, so that a key kept in an HSM (a PKCS#11 provider) can replace the file-based
:class:`Ed25519Signer` without the log noticing. The file-based default keeps the 32-byte RFC 8032
seed in ``settings.key_dir / "audit-log.ed25519"`` with mode 0600.

Verification is a function of the public key alone, because whoever checks a tree head (an auditor,
a witness, ``medcollab audit verify``) must never need the private key. Every failure raises the one
opaque :class:`SignatureInvalid`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medcollab.errors import ConfigurationError, MedcollabError

LOG_KEY_FILENAME: Final = "audit-log.ed25519"
SEED_SIZE: Final = 32
PUBLIC_KEY_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
_KEY_MODE: Final = 0o600
_DIR_MODE: Final = 0o700


class SignatureInvalid(MedcollabError):
    """A signature did not verify: wrong key, altered data, or a malformed signature."""

    code = "integrity_error"


@runtime_checkable
class LogSigner(Protocol):
    """Signs tree heads with the audit log's Ed25519 key, wherever that key lives."""

    def sign(self, data: bytes) -> bytes:
        """The 64-byte RFC 8032 Ed25519 signature of ``data``."""
        ...

    def public_key_bytes(self) -> bytes:
        """The 32-byte RFC 8032 encoding of the public key."""
        ...


class Ed25519Signer:
    """An Ed25519 key held in process memory (the file-based default)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self._public = private_key.public_key().public_bytes_raw()

    @classmethod
    def from_seed(cls, seed: bytes) -> Ed25519Signer:
        if len(seed) != SEED_SIZE:
            raise ValueError(f"an Ed25519 seed is {SEED_SIZE} bytes, not {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def public_key_bytes(self) -> bytes:
        return self._public

    def __repr__(self) -> str:
        # The private key never appears in a repr; the public key identifies the signer.
        return f"Ed25519Signer(public_key={self._public.hex()})"


def verify_ed25519(public_key: bytes, signature: bytes, data: bytes) -> None:
    """Raise :class:`SignatureInvalid` unless ``signature`` is ``public_key``'s signature of ``data``."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise SignatureInvalid("signature does not verify")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise SignatureInvalid("signature does not verify") from None


def log_key_path(key_dir: Path) -> Path:
    return key_dir / LOG_KEY_FILENAME


def load_log_key(path: Path) -> Ed25519Signer:
    """Read the log key's seed file; raises :class:`ConfigurationError` if it is absent or unsafe."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        raise ConfigurationError(
            f"no audit log key: {path} does not exist",
            hint="`medcollab audit checkpoint` creates it when the log issues its first tree head",
        ) from None
    if mode & 0o077:
        raise ConfigurationError(
            f"{path} is readable by other users (mode {mode:o})", hint=f"chmod 600 {path}"
        )
    seed = path.read_bytes()
    if len(seed) != SEED_SIZE:
        raise ConfigurationError(
            f"{path} is not an Ed25519 seed ({len(seed)} bytes, expected {SEED_SIZE})"
        )
    return Ed25519Signer.from_seed(seed)


def load_or_create_log_key(path: Path) -> Ed25519Signer:
    """The log key from ``path``, creating a fresh one (mode 0600) on first use.

    The seed is written to a private temporary file and then hard-linked into place, so a reader in
    another process never sees a half-written key, and two processes racing to create it agree on
    one key: the loser's link fails and it reads the winner's file.
    """
    if path.exists():
        return load_log_key(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _KEY_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(SEED_SIZE))
            handle.flush()
            os.fsync(handle.fileno())
        # If another process created the key first, its key wins and this one is discarded.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return load_log_key(path)
