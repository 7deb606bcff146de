"""Per-purpose keys derived from the application secret, keyed hashes and sealed small secrets.

Every purpose has its own key (HKDF-SHA256 with a purpose label), so a key that leaks from one use
cannot forge another. :class:`SecretBox` seals small secrets such as TOTP seeds with AES-256-GCM; its
ciphertexts carry a version byte and a key id, and the associated data binds a ciphertext to its row,
so one moved to another row does not open.
"""

from __future__ import annotations

import hmac
import os
from enum import StrEnum
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medcollab.errors import MedcollabError


class Purpose(StrEnum):
    """HKDF labels, one per use of a derived key (labels, not secrets)."""

    SESSION_TOKEN = "medcollab/v1/session-token"  # noqa: S105
    MFA_CHALLENGE = "medcollab/v1/mfa-challenge"
    RECOVERY_CODE = "medcollab/v1/recovery-code"
    CSRF_TOKEN = "medcollab/v1/csrf-token"  # noqa: S105
    THROTTLE_KEY = "medcollab/v1/throttle-key"
    AUDIT_PSEUDONYM = "medcollab/v1/audit-pseudonym"
    TOTP_SEED = "medcollab/v1/totp-seed"
    PROFILE_FIELD = "medcollab/v1/profile-field"
    BREAK_GLASS_REASON = "medcollab/v1/break-glass-reason"
    SOURCE_REFERENCE = "medcollab/v1/source-reference"


class SealedDataError(MedcollabError):
    """A sealed value could not be opened: wrong key, wrong row, or tampered bytes."""

    code = "integrity_error"


_VERSION = 1
_NONCE_LEN = 12
_KEY_ID_LEN = 4
_MIN_SECRET_LEN = 16


class KeyRing:
    """Derives one key per :class:`Purpose` from the application secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < _MIN_SECRET_LEN:
            raise ValueError("the application secret must be at least 16 bytes")
        self._secret = secret
        self._cache: dict[Purpose, bytes] = {}

    def key(self, purpose: Purpose) -> bytes:
        key = self._cache.get(purpose)
        if key is None:
            key = HKDF(
                algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.value.encode()
            ).derive(self._secret)
            self._cache[purpose] = key
        return key

    def key_id(self, purpose: Purpose) -> bytes:
        """A short public identifier of the key for ``purpose`` (not secret, not the key)."""
        return sha256(b"key-id:" + self.key(purpose)).digest()[:_KEY_ID_LEN]

    def keyed_hash(self, purpose: Purpose, value: str | bytes) -> str:
        """HMAC-SHA256 of ``value`` under the purpose key, hex-encoded (64 characters)."""
        data = value.encode("utf-8") if isinstance(value, str) else value
        return hmac.new(self.key(purpose), data, sha256).hexdigest()

    def box(self, purpose: Purpose) -> SecretBox:
        return SecretBox(self.key(purpose), self.key_id(purpose))


class SecretBox:
    """AES-256-GCM sealing: ``version(1) || key_id(4) || nonce(12) || ciphertext+tag``."""

    def __init__(self, key: bytes, key_id: bytes) -> None:
        self._aead = AESGCM(key)
        self._key_id = key_id

    def seal(self, plaintext: bytes, *, associated_data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        header = bytes([_VERSION]) + self._key_id
        return header + nonce + self._aead.encrypt(nonce, plaintext, header + associated_data)

    def open(self, sealed: bytes, *, associated_data: bytes) -> bytes:
        header_len = 1 + _KEY_ID_LEN
        if len(sealed) < header_len + _NONCE_LEN + 16 or sealed[0] != _VERSION:
            raise SealedDataError("sealed value is malformed or of an unknown version")
        header, nonce = sealed[:header_len], sealed[header_len : header_len + _NONCE_LEN]
        if not hmac.compare_digest(header[1:], self._key_id):
            raise SealedDataError("sealed value was made with another key")
        try:
            return self._aead.decrypt(
                nonce, sealed[header_len + _NONCE_LEN :], header + associated_data
            )
        except InvalidTag:
            raise SealedDataError("sealed value failed its integrity check") from None
