"""C2SP checkpoints in signed-note form: format, known answers, and what verification refuses."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from medcollab.audit.checkpoint import (
    Checkpoint,
    MalformedCheckpoint,
    key_id,
    parse_checkpoint,
    parse_verifier_key,
    sign_checkpoint,
    verifier_key,
)
from medcollab.crypto.signing import Ed25519Signer, SignatureInvalid
from medcollab.errors import InvalidInput

# The example key and note of the signed-note reference implementation (golang.org/x/mod/sumdb/note).
GO_SIGNER_KEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VERIFIER_KEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_SIGNATURE = (
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
)
# The example checkpoint of the C2SP tlog-checkpoint specification (its key is not published).
C2SP_EXAMPLE = (
    "example.com/behind-the-sofa\n"
    "20852163\n"
    "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    "\n"
    "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/"
    "Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
)
ORIGIN = "medcollab.example/audit-log/test"
ROOT = bytes(range(32))
MOMENT = datetime(2026, 11, 29, 10, 0, 0, 123_000, tzinfo=UTC)


@pytest.fixture(scope="module")
def signer() -> Ed25519Signer:
    return Ed25519Signer.generate()


def _go_signer() -> Ed25519Signer:
    material = base64.b64decode(GO_SIGNER_KEY.split("+", 4)[4])
    assert material[0] == 0x01
    return Ed25519Signer.from_seed(material[1:])


def test_signed_note_known_answer() -> None:
    go = _go_signer()
    assert verifier_key("PeterNeumann", go.public_key_bytes()) == GO_VERIFIER_KEY
    assert key_id("PeterNeumann", go.public_key_bytes()).hex() == "c74f20a3"
    # Ed25519 is deterministic, so the reference implementation's signature is reproduced exactly.
    blob = key_id("PeterNeumann", go.public_key_bytes()) + go.sign(GO_TEXT.encode())
    assert base64.b64encode(blob).decode() == GO_SIGNATURE


def test_parse_verifier_key() -> None:
    name, public_key = parse_verifier_key(GO_VERIFIER_KEY)
    assert name == "PeterNeumann"
    assert public_key == _go_signer().public_key_bytes()
    for bad in (
        "PeterNeumann",
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a3+AhOc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ):
        with pytest.raises(InvalidInput):
            parse_verifier_key(bad)


def test_checkpoint_text_format(signer: Ed25519Signer) -> None:
    signed = sign_checkpoint(Checkpoint(ORIGIN, 12, ROOT, MOMENT), signer)
    root_b64 = base64.b64encode(ROOT).decode()
    assert signed.text == f"{ORIGIN}\n12\n{root_b64}\ntimestamp 2026-11-29T10:00:00.123Z\n"
    body, signature_line = signed.note.split("\n\n")
    assert body + "\n" == signed.text
    assert signature_line.startswith(f"\u2014 {ORIGIN} ")
    assert signature_line.endswith("\n")
    raw = base64.b64decode(signature_line.split(" ")[2])
    assert raw[:4] == key_id(ORIGIN, signer.public_key_bytes())
    assert len(raw) == 4 + 64


def test_round_trip_and_verify(signer: Ed25519Signer) -> None:
    signed = sign_checkpoint(Checkpoint(ORIGIN, 12, ROOT, MOMENT), signer)
    parsed = parse_checkpoint(signed.note)
    assert parsed == signed
    checkpoint = parsed.verify(key_name=ORIGIN, public_key=signer.public_key_bytes())
    assert (checkpoint.origin, checkpoint.size, checkpoint.root_hash) == (ORIGIN, 12, ROOT)
    assert checkpoint.timestamp == MOMENT
    assert parse_checkpoint(signed.note.encode()) == signed


def test_the_c2sp_example_parses() -> None:
    parsed = parse_checkpoint(C2SP_EXAMPLE)
    assert parsed.checkpoint.origin == "example.com/behind-the-sofa"
    assert parsed.checkpoint.size == 20852163
    assert parsed.checkpoint.timestamp is None
    assert parsed.signatures[0].key_name == "example.com/behind-the-sofa"


def test_an_empty_tree_checkpoint(signer: Ed25519Signer) -> None:
    signed = sign_checkpoint(Checkpoint(ORIGIN, 0, bytes(32)), signer)
    assert parse_checkpoint(signed.note).checkpoint.size == 0


def test_other_keys_signatures_are_ignored_but_ours_must_verify(signer: Ed25519Signer) -> None:
    signed = sign_checkpoint(Checkpoint(ORIGIN, 3, ROOT, MOMENT), signer)
    witness = Ed25519Signer.generate()
    cosigned_blob = key_id("witness.example", witness.public_key_bytes()) + witness.sign(
        signed.text.encode()
    )
    cosigned = signed.note + f"\u2014 witness.example {base64.b64encode(cosigned_blob).decode()}\n"
    parse_checkpoint(cosigned).verify(key_name=ORIGIN, public_key=signer.public_key_bytes())


@pytest.mark.parametrize(
    "tamper",
    [
        lambda note: note.replace("\n3\n", "\n4\n"),
        lambda note: note.replace("10:00:00.123Z", "10:00:00.124Z"),
        lambda note: note.replace(
            base64.b64encode(ROOT).decode(), base64.b64encode(bytes(32)).decode()
        ),
    ],
    ids=["size", "timestamp", "root"],
)
def test_altered_content_fails(signer: Ed25519Signer, tamper: object) -> None:
    note = sign_checkpoint(Checkpoint(ORIGIN, 3, ROOT, MOMENT), signer).note
    altered = tamper(note)  # type: ignore[operator]
    assert altered != note
    with pytest.raises(SignatureInvalid):
        parse_checkpoint(altered).verify(key_name=ORIGIN, public_key=signer.public_key_bytes())


def test_another_key_or_name_fails(signer: Ed25519Signer) -> None:
    note = sign_checkpoint(Checkpoint(ORIGIN, 3, ROOT, MOMENT), signer).note
    other = Ed25519Signer.generate()
    forged = sign_checkpoint(Checkpoint(ORIGIN, 3, ROOT, MOMENT), other).note
    with pytest.raises(SignatureInvalid, match="no signature by the log key"):
        parse_checkpoint(forged).verify(key_name=ORIGIN, public_key=signer.public_key_bytes())
    with pytest.raises(SignatureInvalid):
        parse_checkpoint(note).verify(key_name="someone.else", public_key=signer.public_key_bytes())
    # Right name and key ID, wrong signature bytes: a known key's signature must verify.
    line = note.split("\n\n")[1]
    raw = bytearray(base64.b64decode(line.split(" ")[2]))
    raw[10] ^= 1
    broken = (
        note.split("\n\n")[0] + f"\n\n\u2014 {ORIGIN} {base64.b64encode(bytes(raw)).decode()}\n"
    )
    with pytest.raises(SignatureInvalid):
        parse_checkpoint(broken).verify(key_name=ORIGIN, public_key=signer.public_key_bytes())


GOOD = sign_checkpoint(Checkpoint(ORIGIN, 3, ROOT, MOMENT), Ed25519Signer.generate()).note
GOOD_TEXT, GOOD_SIGNATURE = GOOD.split("\n\n")


@pytest.mark.parametrize(
    ("note", "message"),
    [
        ("", "does not end with a newline"),
        (GOOD.rstrip("\n"), "does not end with a newline"),
        (GOOD_TEXT + "\n" + GOOD_SIGNATURE, "no blank line"),
        (GOOD_TEXT + "\n\n", "no signature lines"),
        (GOOD.replace("\n3\n", "\n03\n"), "not a decimal number"),
        (GOOD.replace("\n3\n", "\n-3\n"), "not a decimal number"),
        (GOOD.replace("\n3\n", "\nthree\n"), "not a decimal number"),
        (GOOD.replace(base64.b64encode(ROOT).decode(), "not base64!"), "root hash is not standard"),
        (
            GOOD.replace(base64.b64encode(ROOT).decode(), base64.b64encode(ROOT[:16]).decode()),
            "16 bytes",
        ),
        (GOOD.replace("timestamp ", "timestamp x"), "is not YYYY-MM-DD"),
        (GOOD.replace("T10:00:00.123Z", "T25:00:00.123Z"), "not a valid time"),
        (GOOD.replace("=\ntimestamp", "=\n\ntimestamp", 1), "must not be empty"),
        (GOOD.replace("\u2014", "-"), "does not start with"),
        (GOOD.replace("\u2014 " + ORIGIN + " ", "\u2014 " + ORIGIN), "has no signature"),
        (GOOD_TEXT + "\n\n\u2014 " + ORIGIN + " AAAA\n", "too short"),
        (GOOD_TEXT + "\n\n\u2014 " + ORIGIN + " !!!!\n", "not standard base64"),
        (GOOD.replace(ORIGIN + "\n", "a b\n", 1), "without spaces"),
        ("x\x01y\n1\nAAAA\n\n", "control characters"),
        ("origin\n1\n\n\u2014 k AAAAAAAA\n", "needs an origin, a tree size and a root hash"),
    ],
)
def test_malformed_checkpoints_are_refused(note: str, message: str) -> None:
    with pytest.raises(MalformedCheckpoint, match=message):
        parse_checkpoint(note)


def test_malformed_bytes_are_refused() -> None:
    with pytest.raises(MalformedCheckpoint, match="not valid UTF-8"):
        parse_checkpoint(b"\xff\xfe\n")
    with pytest.raises(MalformedCheckpoint, match="larger than"):
        parse_checkpoint(b"a" * 70_000)
    with pytest.raises(MalformedCheckpoint, match="larger than"):
        parse_checkpoint("a" * 70_000)
    assert issubclass(MalformedCheckpoint, InvalidInput)


def test_checkpoint_refuses_bad_fields() -> None:
    with pytest.raises(ValueError, match="negative"):
        Checkpoint(ORIGIN, -1, ROOT)
    with pytest.raises(ValueError, match="32 bytes"):
        Checkpoint(ORIGIN, 1, b"short")
    with pytest.raises(ValueError, match="UTC"):
        Checkpoint(ORIGIN, 1, ROOT, datetime(2026, 1, 1))  # noqa: DTZ001 - the point of the test.
    with pytest.raises(ValueError, match="origin"):
        Checkpoint("has+plus", 1, ROOT)
