"""Sealing with data keys: format, binding to the row, tamper detection, and blind indexes."""

from __future__ import annotations

import uuid

import pytest

from medcollab.crypto import envelope
from medcollab.crypto.envelope import DataKey, IntegrityError, aad_for, seal, unseal
from medcollab.crypto.keys import SealedDataError
from medcollab.errors import MedcollabError

ROW_A = ("Observation", "obs-1", 1, "pat-1")
ROW_B = ("Observation", "obs-2", 1, "pat-1")


@pytest.fixture
def key() -> DataKey:
    return DataKey.generate()


def test_round_trip(key: DataKey) -> None:
    aad = aad_for(*ROW_A)
    for plaintext in (b"", b"x", b'{"resourceType":"Observation"}' * 100):
        assert unseal(key, seal(key, plaintext, aad), aad) == plaintext


def test_format_carries_version_and_key_id(key: DataKey) -> None:
    blob = seal(key, b"hello", aad_for(*ROW_A))
    assert blob[0] == envelope.FORMAT_VERSION == 1
    assert blob[1:17] == key.id.bytes
    assert len(blob) == 1 + 16 + 12 + len(b"hello") + 16
    assert envelope.key_id_of(blob) == key.id
    assert b"hello" not in blob


def test_nonces_are_fresh(key: DataKey) -> None:
    aad = aad_for(*ROW_A)
    assert seal(key, b"same", aad) != seal(key, b"same", aad)


def test_data_key_repr_hides_material(key: DataKey) -> None:
    text = repr(key) + str(key)
    assert str(key.id) in text
    assert key.material.hex() not in text
    assert repr(key.material) not in text


def test_data_key_is_aes_256() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        DataKey(id=uuid.uuid4(), material=b"\x00" * 16)


@pytest.mark.parametrize(
    "other",
    [
        ("Condition", "obs-1", 1, "pat-1"),  # another resource type
        ("Observation", "obs-9", 1, "pat-1"),  # another resource id
        ("Observation", "obs-1", 2, "pat-1"),  # another version
        ("Observation", "obs-1", 1, "pat-2"),  # another patient
        ("Observation", "obs-1", 1, None),  # no patient (organisation data)
        ("Observation", "obs-1", 1, ""),  # an empty patient id is not "no patient"
    ],
)
def test_ciphertext_does_not_open_under_another_rows_aad(
    key: DataKey, other: tuple[str, str, int, str | None]
) -> None:
    blob = seal(key, b"secret", aad_for(*ROW_A))
    with pytest.raises(IntegrityError):
        unseal(key, blob, aad_for(*other))


def test_aad_encoding_is_unambiguous() -> None:
    assert aad_for("ab", "c", 1, None) != aad_for("a", "bc", 1, None)
    assert aad_for("Patient", "p", 1, "x") != aad_for("Patient", "p", 1, None)
    assert aad_for("Patient", "p", 1, "") != aad_for("Patient", "p", 1, None)
    assert aad_for("Patient", "p", 256, None) != aad_for("Patient", "p", 1, None)
    assert envelope.length_prefixed(b"ab", b"c") != envelope.length_prefixed(b"a", b"bc")


def test_aad_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="type and id"):
        aad_for("", "x", 1, None)
    with pytest.raises(ValueError, match="negative"):
        aad_for("Patient", "x", -1, None)


def test_swapped_ciphertexts_fail_closed_both_ways(key: DataKey) -> None:
    rows = {ROW_A: seal(key, b"A's result", aad_for(*ROW_A))}
    rows[ROW_B] = seal(key, b"B's result", aad_for(*ROW_B))
    rows[ROW_A], rows[ROW_B] = rows[ROW_B], rows[ROW_A]
    for row, blob in rows.items():
        with pytest.raises(IntegrityError):
            unseal(key, blob, aad_for(*row))


def test_every_flipped_byte_is_detected(key: DataKey) -> None:
    aad = aad_for(*ROW_A)
    blob = seal(key, b"tamper me", aad)
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(IntegrityError):
            unseal(key, bytes(tampered), aad)


def test_truncated_extended_and_empty_values_fail(key: DataKey) -> None:
    aad = aad_for(*ROW_A)
    blob = seal(key, b"payload", aad)
    for broken in (b"", blob[:1], blob[:17], blob[:-1], blob[: envelope.MIN_SEALED_BYTES - 1]):
        with pytest.raises(IntegrityError):
            unseal(key, broken, aad)
    with pytest.raises(IntegrityError):
        unseal(key, blob + b"\x00", aad)
    with pytest.raises(IntegrityError):
        envelope.key_id_of(blob[:10])


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version_byte_fails(key: DataKey, version: int) -> None:
    aad = aad_for(*ROW_A)
    blob = bytes([version]) + seal(key, b"payload", aad)[1:]
    with pytest.raises(IntegrityError):
        unseal(key, blob, aad)
    with pytest.raises(IntegrityError):
        envelope.key_id_of(blob)


def test_another_key_does_not_open(key: DataKey) -> None:
    aad = aad_for(*ROW_A)
    blob = seal(key, b"payload", aad)
    with pytest.raises(IntegrityError):
        unseal(DataKey.generate(), blob, aad)
    # The same id with other material: the header matches, the tag does not.
    with pytest.raises(IntegrityError):
        unseal(DataKey(id=key.id, material=DataKey.generate().material), blob, aad)


def test_failures_are_one_opaque_error(key: DataKey) -> None:
    aad = aad_for(*ROW_A)
    blob = seal(key, b"payload", aad)
    messages = set()
    for attempt in (
        lambda: unseal(key, blob[:-1], aad),
        lambda: unseal(key, blob, aad_for(*ROW_B)),
        lambda: unseal(DataKey.generate(), blob, aad),
        lambda: unseal(key, b"\x02" + blob[1:], aad),
    ):
        with pytest.raises(IntegrityError) as caught:
            attempt()
        messages.add(caught.value.message)
    assert len(messages) == 1
    assert issubclass(IntegrityError, SealedDataError)
    assert issubclass(IntegrityError, MedcollabError)
    assert IntegrityError.code == "integrity_error"


# Blind indexes ------------------------------------------------------------------------------------

INDEX_KEY = bytes(range(32))


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("１２３４５６", "123456"),  # full-width digits (NFKC)
        ("ＺＨＡＮＧ", "zhang"),  # full-width letters, then case-folded
        ("Zhang San", "zhang san"),
        ("  zhang \t\n san  ", "zhang san"),  # whitespace collapsed and trimmed
        ("zhang\u3000san", "zhang san"),  # the ideographic space
        ("Straße", "strasse"),  # full case folding, not lower()
        ("张三", "张三"),
        ("ﬁle", "file"),  # a compatibility ligature
    ],
)
def test_normalisation(raw: str, normal: str) -> None:
    assert envelope.normalise_for_index(raw) == normal


def test_equivalent_values_share_an_index() -> None:
    variants = ["Zhang San", "zhang san", "  ZHANG   SAN ", "ＺＨＡＮＧ\u3000ＳＡＮ"]
    indexes = {envelope.blind_index(INDEX_KEY, v) for v in variants}
    assert len(indexes) == 1
    assert envelope.blind_index(INDEX_KEY, "１１０１０５") == envelope.blind_index(
        INDEX_KEY, "110105"
    )


def test_index_is_hex_hmac_and_hides_the_value() -> None:
    index = envelope.blind_index(INDEX_KEY, "13800138000")
    assert len(index) == 64
    assert int(index, 16) >= 0
    assert "13800138000" not in index


def test_different_keys_values_and_contexts_give_different_indexes() -> None:
    other_key = bytes(reversed(range(32)))
    value = "Zhang San"
    assert envelope.blind_index(INDEX_KEY, value) != envelope.blind_index(other_key, value)
    assert envelope.blind_index(INDEX_KEY, value) != envelope.blind_index(INDEX_KEY, "Li Si")
    assert envelope.blind_index(INDEX_KEY, value, context="Patient.name") != (
        envelope.blind_index(INDEX_KEY, value, context="RelatedPerson.name")
    )


def test_short_index_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        envelope.blind_index(b"short", "value")
