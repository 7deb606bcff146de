"""Envelope encryption of stored data with per-owner data keys, and blind indexes.

A :class:`DataKey` (DEK) is an AES-256-GCM key that belongs to one patient, one organisation or the
blind-index purpose; :mod:`medcollab.keys` stores it wrapped by a key-encryption key. This module only
does the data-side recipe:

* :func:`seal` / :func:`unseal` encrypt one stored value. The format is::

      version (1 byte, 0x01) || key id (16 bytes, the DEK's UUID) || nonce (12) || ciphertext || tag (16)

  The header (version and key id) is authenticated together with the caller's associated data, so
  neither can be changed without the read failing.
* :func:`aad_for` builds that associated data from the resource type, id, version and patient in an
  unambiguous length-prefixed encoding: a ciphertext copied into another row, another version or
  another patient's record does not open.
* :func:`blind_index` is a keyed HMAC-SHA256 of a normalised search value, so an identifying value can
  be found by equality without being stored.

Every failure to open collapses into one :class:`IntegrityError`, which says nothing about which check
failed.
"""

from __future__ import annotations

import hmac
import os
import struct
import unicodedata
import uuid
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medcollab.crypto.keys import SealedDataError

#: The format version of :func:`seal`'s output.
FORMAT_VERSION: Final = 1
KEY_BYTES: Final = 32
KEY_ID_BYTES: Final = 16
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
HEADER_BYTES: Final = 1 + KEY_ID_BYTES
#: The shortest valid sealed value: a header, a nonce and the tag of an empty plaintext.
MIN_SEALED_BYTES: Final = HEADER_BYTES + NONCE_BYTES + TAG_BYTES
#: Blind-index keys shorter than this are refused: HMAC keys should be as long as the hash.
MIN_INDEX_KEY_BYTES: Final = 32

_AAD_LABEL: Final = b"medcollab/record-aad/v1"
_ABSENT: Final = b"\x00"
_PRESENT: Final = b"\x01"
_MAX_FIELD_BYTES: Final = 0xFFFF_FFFF


class IntegrityError(SealedDataError):
    """A stored ciphertext did not open: wrong key, wrong row, unknown format or tampered bytes.

    Not to be confused with SQLAlchemy's ``IntegrityError``; refer to it as ``envelope.IntegrityError``.
    The message never says which check failed, so a forger learns nothing from it.
    """

    code = "integrity_error"


@dataclass(frozen=True, slots=True)
class DataKey:
    """An unwrapped AES-256 data key. Its repr shows the id only, never the material."""

    id: uuid.UUID
    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.material) != KEY_BYTES:
            raise ValueError("a data key is exactly 32 bytes (AES-256)")

    @classmethod
    def generate(cls) -> DataKey:
        """A new random data key with a new random id."""
        return cls(id=uuid.uuid4(), material=AESGCM.generate_key(bit_length=KEY_BYTES * 8))


def length_prefixed(*fields: bytes) -> bytes:
    """Concatenate ``fields``, each preceded by its length as a 4-byte big-endian integer.

    Plain concatenation is ambiguous (``"ab" + "c"`` equals ``"a" + "bc"``); with a length before each
    field, two different lists of fields never encode to the same bytes.
    """
    out = bytearray()
    for item in fields:
        if len(item) > _MAX_FIELD_BYTES:
            raise ValueError("a field is too long to encode")
        out += struct.pack(">I", len(item))
        out += item
    return bytes(out)


def aad_for(resource_type: str, resource_id: str, version: int, patient_id: str | None) -> bytes:
    """The associated data that binds a ciphertext to one version of one resource of one patient.

    ``patient_id`` is ``None`` for resources that belong to no patient (they are sealed with their
    organisation's key); absence is encoded differently from an empty string.
    """
    if not resource_type or not resource_id:
        raise ValueError("a resource type and id are required")
    if version < 0:
        raise ValueError("a resource version is never negative")
    patient = _ABSENT if patient_id is None else _PRESENT + patient_id.encode("utf-8")
    return length_prefixed(
        _AAD_LABEL,
        resource_type.encode("utf-8"),
        resource_id.encode("utf-8"),
        struct.pack(">Q", version),
        patient,
    )


def seal(key: DataKey, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` under ``key``, bound to ``aad`` (see :func:`aad_for`).

    The nonce is 96 random bits. One data key belongs to one patient and seals one value per stored
    version, far below the 2**32 messages NIST SP 800-38D allows for random nonces under one key.
    """
    header = bytes([FORMAT_VERSION]) + key.id.bytes
    nonce = os.urandom(NONCE_BYTES)
    return header + nonce + AESGCM(key.material).encrypt(nonce, plaintext, header + aad)


def key_id_of(blob: bytes) -> uuid.UUID:
    """The id of the data key that sealed ``blob``; raises :class:`IntegrityError` if malformed.

    The id is read from the header before the ciphertext is authenticated, so it only says which key
    to try; :func:`unseal` then authenticates it.
    """
    _check_shape(blob)
    return uuid.UUID(bytes=blob[1:HEADER_BYTES])


def unseal(key: DataKey, blob: bytes, aad: bytes) -> bytes:
    """Decrypt a value made by :func:`seal`; any failure raises :class:`IntegrityError`."""
    _check_shape(blob)
    header = blob[:HEADER_BYTES]
    # The key id is not secret, but a constant-time comparison costs nothing and removes a question.
    if not hmac.compare_digest(header[1:], key.id.bytes):
        raise IntegrityError("the stored value failed its integrity check")
    nonce = blob[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
    try:
        return AESGCM(key.material).decrypt(nonce, blob[HEADER_BYTES + NONCE_BYTES :], header + aad)
    except InvalidTag:
        raise IntegrityError("the stored value failed its integrity check") from None


def _check_shape(blob: bytes) -> None:
    if len(blob) < MIN_SEALED_BYTES or blob[0] != FORMAT_VERSION:
        raise IntegrityError("the stored value failed its integrity check")


# Blind indexes ------------------------------------------------------------------------------------


def normalise_for_index(value: str) -> str:
    """The form of a search value that is indexed: NFKC, case-folded, whitespace collapsed.

    NFKC maps compatibility characters to their plain form (full-width ``１２３`` to ``123``, the
    ideographic space to a space); case folding is Unicode's caseless matching (``ß`` matches ``SS``);
    NFKC is applied again because case folding can leave a string that is not normalised (Unicode's
    ``NFKC_Casefold`` does the same). Runs of any Unicode whitespace become one space, and leading and
    trailing whitespace is dropped.
    """
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", value).casefold())
    return " ".join(folded.split())


def blind_index(key: bytes, value: str, *, context: str = "") -> str:
    """A keyed HMAC-SHA256 of the normalised ``value``, as 64 lowercase hex characters.

    Equal values (after :func:`normalise_for_index`) give equal indexes under one key, so an index
    supports equality search and nothing else. ``context`` (e.g. ``"Patient.identifier"``) separates
    fields: the same value in two fields then gives unrelated indexes, so a reader of the table cannot
    link them. Hex matches :meth:`~medcollab.crypto.keys.KeyRing.keyed_hash`.
    """
    if len(key) < MIN_INDEX_KEY_BYTES:
        raise ValueError("a blind-index key is at least 32 bytes")
    message = length_prefixed(
        b"medcollab/blind-index/v1",
        context.encode("utf-8"),
        normalise_for_index(value).encode("utf-8"),
    )
    return hmac.new(key, message, sha256).hexdigest()
