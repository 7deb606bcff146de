"""Signed tree heads as C2SP checkpoints (https://c2sp.org/tlog-checkpoint), in signed-note form.

A checkpoint is a note whose text is::

    <origin>                       the log's identity, also the signing key's name
    <tree size>                    decimal, no leading zeros
    <base64 root hash>             RFC 6962 root of the first <tree size> leaves
    timestamp <RFC 3339 time>      extension line: when the log issued the head (UTC, milliseconds)

followed by a blank line and one signature line per signer (https://c2sp.org/signed-note)::

    — <key name> <base64(key ID || Ed25519 signature of the note text)>

with ``key ID = SHA-256(key name || 0x0A || 0x01 || public key)[:4]``. The timestamp is an
extension line, which the checkpoint specification allows but does not recommend because monitors
cannot audit it; witnesses ignore it, and our verifier only uses it to check that heads are issued in
order. Standard witness tooling reads everything else as it would any other log's checkpoint.

Parsing is strict about our fields and lenient where the specification asks for leniency: signatures
from unknown keys are ignored (witness cosignatures may sit next to ours), and unknown extension
lines are kept but not interpreted.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from typing import Final

from medcollab.audit.merkle import HASH_SIZE
from medcollab.crypto.signing import (
    PUBLIC_KEY_SIZE,
    LogSigner,
    SignatureInvalid,
    verify_ed25519,
)
from medcollab.errors import InvalidInput

ED25519_SIGNATURE_TYPE: Final = 0x01
KEY_ID_SIZE: Final = 4
TIMESTAMP_PREFIX: Final = "timestamp "
#: Checkpoints are a few hundred bytes; anything much larger is not one.
MAX_CHECKPOINT_BYTES: Final = 64 * 1024
#: The signed-note specification asks verifiers to accept at least 16 signatures.
MAX_SIGNATURES: Final = 100
_SIGNATURE_PREFIX: Final = "\u2014 "
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]*")
_TIMESTAMP: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


class MalformedCheckpoint(InvalidInput):
    """The text is not a well-formed C2SP checkpoint in signed-note form."""

    code = "malformed_checkpoint"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The signed content of a tree head."""

    origin: str
    size: int
    root_hash: bytes
    timestamp: datetime | None = None
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_key_name(self.origin, what="origin")
        if self.size < 0:
            raise ValueError("a tree size is never negative")
        if len(self.root_hash) != HASH_SIZE:
            raise ValueError(f"a root hash is {HASH_SIZE} bytes")
        if self.timestamp is not None and self.timestamp.tzinfo is None:
            raise ValueError("checkpoint timestamps are UTC")

    def text(self) -> str:
        """The note text that is signed, ending in a newline."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode("ascii")]
        if self.timestamp is not None:
            lines.append(TIMESTAMP_PREFIX + format_timestamp(self.timestamp))
        lines.extend(self.extensions)
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class NoteSignature:
    key_name: str
    key_id: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    signatures: tuple[NoteSignature, ...]
    #: The signed note text exactly as it was read or issued (what the signatures cover).
    text: str
    #: The whole note: the text, a blank line and the signature lines.
    note: str

    def verify(self, *, key_name: str, public_key: bytes) -> Checkpoint:
        """Return the checkpoint if ``public_key`` (named ``key_name``) signed it; else raise.

        Per the signed-note specification, signatures from other keys are ignored, and a signature
        whose name and key ID match ours must verify.
        """
        expected_id = key_id(key_name, public_key)
        ours = [s for s in self.signatures if s.key_name == key_name and s.key_id == expected_id]
        if not ours:
            raise SignatureInvalid(f"the checkpoint carries no signature by the log key {key_name}")
        text = self.text.encode("utf-8")
        for signature in ours:
            verify_ed25519(public_key, signature.signature, text)
        return self.checkpoint


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, the precision every database keeps exactly."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def truncate_to_milliseconds(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def key_id(key_name: str, public_key: bytes) -> bytes:
    """The signed-note key ID of an Ed25519 key: ``SHA-256(name || 0x0A || 0x01 || key)[:4]``."""
    material = key_name.encode("utf-8") + b"\n" + bytes([ED25519_SIGNATURE_TYPE]) + public_key
    return sha256(material).digest()[:KEY_ID_SIZE]


def verifier_key(key_name: str, public_key: bytes) -> str:
    """The note verifier key string (``name+hexid+base64(0x01||key)``) witnesses are configured with."""
    encoded = base64.b64encode(bytes([ED25519_SIGNATURE_TYPE]) + public_key).decode("ascii")
    return f"{key_name}+{key_id(key_name, public_key).hex()}+{encoded}"


def parse_verifier_key(text: str) -> tuple[str, bytes]:
    """The key name and Ed25519 public key of a note verifier key string."""
    name, sep1, rest = text.strip().partition("+")
    hex_id, sep2, encoded = rest.partition("+")
    if not (sep1 and sep2 and name) or any(ch.isspace() for ch in name):
        raise InvalidInput("a verifier key is NAME+KEYID+BASE64KEY")
    material = _b64(encoded, what="verifier key")
    if len(material) != 1 + PUBLIC_KEY_SIZE or material[0] != ED25519_SIGNATURE_TYPE:
        raise InvalidInput("the verifier key is not an Ed25519 key")
    public_key = material[1:]
    if hex_id != key_id(name, public_key).hex():
        raise InvalidInput("the verifier key's ID does not match its name and key")
    return name, public_key


def sign_checkpoint(checkpoint: Checkpoint, signer: LogSigner) -> SignedCheckpoint:
    """Sign ``checkpoint`` with the log key, named after the checkpoint's origin."""
    text = checkpoint.text()
    public_key = signer.public_key_bytes()
    signature = NoteSignature(
        key_name=checkpoint.origin,
        key_id=key_id(checkpoint.origin, public_key),
        signature=signer.sign(text.encode("utf-8")),
    )
    note = text + "\n" + _signature_line(signature)
    return SignedCheckpoint(checkpoint, (signature,), text, note)


def _signature_line(signature: NoteSignature) -> str:
    blob = base64.b64encode(signature.key_id + signature.signature).decode("ascii")
    return f"{_SIGNATURE_PREFIX}{signature.key_name} {blob}\n"


def parse_checkpoint(note: str | bytes) -> SignedCheckpoint:
    """Parse a signed checkpoint; raises :class:`MalformedCheckpoint` naming the first problem.

    Parsing checks the form only. Call :meth:`SignedCheckpoint.verify` before trusting the content.
    """
    if isinstance(note, bytes):
        if len(note) > MAX_CHECKPOINT_BYTES:
            raise MalformedCheckpoint(f"larger than {MAX_CHECKPOINT_BYTES} bytes")
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedCheckpoint("not valid UTF-8") from None
    if len(note.encode("utf-8", "surrogatepass")) > MAX_CHECKPOINT_BYTES:
        raise MalformedCheckpoint(f"larger than {MAX_CHECKPOINT_BYTES} bytes")
    if any(ch < " " and ch != "\n" for ch in note):
        raise MalformedCheckpoint("contains control characters other than newline")
    if not note.endswith("\n"):
        raise MalformedCheckpoint("does not end with a newline")
    # The text ends at the last blank line; signature lines follow it.
    split = note.rfind("\n\n")
    if split < 0:
        raise MalformedCheckpoint("no blank line between the checkpoint and its signatures")
    text, signature_block = note[: split + 1], note[split + 2 :]
    signatures = _parse_signatures(signature_block)
    return SignedCheckpoint(_parse_text(text), signatures, text, note)


def _parse_signatures(block: str) -> tuple[NoteSignature, ...]:
    lines = block.split("\n")[:-1]  # The block ends with a newline.
    if not lines:
        raise MalformedCheckpoint("no signature lines")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedCheckpoint(f"more than {MAX_SIGNATURES} signatures")
    signatures = []
    for number, line in enumerate(lines, start=1):
        if not line.startswith(_SIGNATURE_PREFIX):
            raise MalformedCheckpoint(f"signature line {number} does not start with '— '")
        name, sep, blob = line[len(_SIGNATURE_PREFIX) :].partition(" ")
        if not sep:
            raise MalformedCheckpoint(f"signature line {number} has no signature")
        try:
            _check_key_name(name, what="key name")
        except ValueError as exc:
            raise MalformedCheckpoint(f"signature line {number}: {exc}") from None
        raw = _b64(blob, what=f"signature line {number}")
        if len(raw) <= KEY_ID_SIZE:
            raise MalformedCheckpoint(f"signature line {number} is too short")
        signatures.append(NoteSignature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:]))
    return tuple(signatures)


def _parse_text(text: str) -> Checkpoint:
    lines = text.split("\n")[:-1]
    if len(lines) < 3:
        raise MalformedCheckpoint("the checkpoint needs an origin, a tree size and a root hash")
    origin, size_text, root_text, *extensions = lines
    if not _DECIMAL.fullmatch(size_text):
        raise MalformedCheckpoint(f"tree size {size_text!r} is not a decimal number")
    root_hash = _b64(root_text, what="root hash")
    if len(root_hash) != HASH_SIZE:
        raise MalformedCheckpoint(f"root hash is {len(root_hash)} bytes, not {HASH_SIZE}")
    if any(not line for line in extensions):
        raise MalformedCheckpoint("extension lines must not be empty")
    timestamp: datetime | None = None
    others: list[str] = []
    for line in extensions:
        if line.startswith(TIMESTAMP_PREFIX) and timestamp is None:
            value = line[len(TIMESTAMP_PREFIX) :]
            if not _TIMESTAMP.fullmatch(value):
                raise MalformedCheckpoint(f"timestamp {value!r} is not YYYY-MM-DDTHH:MM:SS.mmmZ")
            try:
                timestamp = datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            except ValueError:
                raise MalformedCheckpoint(f"timestamp {value!r} is not a valid time") from None
        else:
            others.append(line)
    try:
        return Checkpoint(origin, int(size_text), root_hash, timestamp, tuple(others))
    except ValueError as exc:
        raise MalformedCheckpoint(str(exc)) from None


def _b64(text: str, *, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise MalformedCheckpoint(f"{what} is not standard base64") from None
    # Only the canonical encoding is accepted, so one checkpoint has exactly one text.
    if base64.b64encode(raw).decode("ascii") != text:
        raise MalformedCheckpoint(f"{what} is not canonical base64")
    return raw


def _check_key_name(name: str, *, what: str) -> None:
    if not name or any(ch.isspace() or ch == "+" for ch in name):
        raise ValueError(f"{what} {name!r} must be non-empty, without spaces or '+'")
