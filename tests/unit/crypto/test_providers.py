"""Key providers: wrapping under versioned KEKs, rotation, failure modes, and the HSM's guarantees.

Tests that take ``key_provider`` run with the file provider and with a SoftHSM2 token.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute

from medcollab.config import Settings
from medcollab.crypto.envelope import IntegrityError
from medcollab.crypto.providers import (
    WRAPPED_BYTES,
    FileKeyProvider,
    KeyProvider,
    KeyProviderUnavailable,
    Pkcs11KeyProvider,
    WrappedKey,
    provider_from_settings,
)
from medcollab.errors import ConfigurationError, ServiceUnavailable
from tests.support import softhsm

CONTEXT = b"data-key-row-1"


def _dek() -> bytes:
    return secrets.token_bytes(32)


def test_wrap_round_trip(key_provider: KeyProvider) -> None:
    dek = _dek()
    wrapped = key_provider.wrap(dek, context=CONTEXT)
    assert wrapped.kek_id == key_provider.current_kek_id()
    assert wrapped.kek_id.startswith(f"{key_provider.name}:v")
    assert len(wrapped.blob) == WRAPPED_BYTES
    assert dek not in wrapped.blob
    assert key_provider.unwrap(wrapped, context=CONTEXT) == dek
    # Random nonces: wrapping the same key twice gives different bytes.
    assert key_provider.wrap(dek, context=CONTEXT).blob != wrapped.blob


def test_wrapped_key_repr_shows_no_bytes(key_provider: KeyProvider) -> None:
    wrapped = key_provider.wrap(_dek())
    assert wrapped.blob.hex() not in repr(wrapped)
    assert repr(wrapped.blob) not in repr(wrapped)


def test_only_32_byte_keys_are_wrapped(key_provider: KeyProvider) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        key_provider.wrap(b"\x00" * 16)


def test_another_rows_context_does_not_unwrap(key_provider: KeyProvider) -> None:
    wrapped = key_provider.wrap(_dek(), context=CONTEXT)
    with pytest.raises(IntegrityError):
        key_provider.unwrap(wrapped, context=b"data-key-row-2")


def test_tampered_wrapped_keys_fail_closed(key_provider: KeyProvider) -> None:
    wrapped = key_provider.wrap(_dek(), context=CONTEXT)
    for index in (0, 1, 13, WRAPPED_BYTES - 1):
        blob = bytearray(wrapped.blob)
        blob[index] ^= 0x80
        with pytest.raises(IntegrityError):
            key_provider.unwrap(WrappedKey(wrapped.kek_id, bytes(blob)), context=CONTEXT)
    for blob in (b"", wrapped.blob[:-1], wrapped.blob + b"\x00"):
        with pytest.raises(IntegrityError):
            key_provider.unwrap(WrappedKey(wrapped.kek_id, blob), context=CONTEXT)
    # The provider still works after the failures.
    assert key_provider.unwrap(wrapped, context=CONTEXT)


def test_kek_rotation_keeps_old_versions_for_unwrapping(key_provider: KeyProvider) -> None:
    dek = _dek()
    old = key_provider.wrap(dek, context=CONTEXT)
    new_id = key_provider.new_kek_version()
    assert new_id != old.kek_id
    assert key_provider.current_kek_id() == new_id
    assert key_provider.kek_ids()[-1] == new_id
    assert old.kek_id in key_provider.kek_ids()
    rewrapped = key_provider.wrap(dek, context=CONTEXT)
    assert rewrapped.kek_id == new_id
    assert key_provider.unwrap(old, context=CONTEXT) == dek
    assert key_provider.unwrap(rewrapped, context=CONTEXT) == dek
    # A wrapped key relabelled with another KEK version does not unwrap.
    with pytest.raises((IntegrityError, KeyProviderUnavailable)):
        key_provider.unwrap(WrappedKey(new_id, old.blob), context=CONTEXT)


def test_destroying_an_old_kek_makes_its_wrapped_keys_unreadable(
    key_provider: KeyProvider,
) -> None:
    old = key_provider.wrap(_dek(), context=CONTEXT)
    with pytest.raises(ConfigurationError, match="current"):
        key_provider.destroy_kek(old.kek_id)
    key_provider.new_kek_version()
    key_provider.destroy_kek(old.kek_id)
    assert old.kek_id not in key_provider.kek_ids()
    with pytest.raises(KeyProviderUnavailable) as caught:
        key_provider.unwrap(old, context=CONTEXT)
    assert isinstance(caught.value, ServiceUnavailable)
    key_provider.destroy_kek(old.kek_id)  # Destroying twice is harmless.


def test_kek_ids_of_another_provider_are_refused(key_provider: KeyProvider) -> None:
    wrapped = key_provider.wrap(_dek())
    other = "pkcs11" if key_provider.name == "file" else "file"
    with pytest.raises(KeyProviderUnavailable, match="does not belong"):
        key_provider.unwrap(WrappedKey(f"{other}:v1", wrapped.blob))


def test_a_fresh_provider_instance_unwraps_what_another_wrapped(
    key_provider: KeyProvider, tmp_path: Path
) -> None:
    dek = _dek()
    wrapped = key_provider.wrap(dek, context=CONTEXT)
    second = softhsm.provider(key_provider.name, tmp_path / "keys")
    try:
        assert second.current_kek_id() == key_provider.current_kek_id()
        assert second.unwrap(wrapped, context=CONTEXT) == dek
    finally:
        second.close()


# The file provider --------------------------------------------------------------------------------


def test_file_keks_are_private_random_files(tmp_path: Path) -> None:
    provider = FileKeyProvider(tmp_path / "keys")
    first = provider.current_kek_id()
    second = provider.new_kek_version()
    assert (first, second) == ("file:v1", "file:v2")
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    files = sorted((tmp_path / "keys").glob("kek-v*.key"))
    assert [f.name for f in files] == ["kek-v1.key", "kek-v2.key"]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(path.read_bytes()) == 32
    assert files[0].read_bytes() != files[1].read_bytes()


def test_file_kek_creation_never_overwrites(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    provider = FileKeyProvider(key_dir)
    provider.current_kek_id()
    before = (key_dir / "kek-v1.key").read_bytes()
    # Another process created version 2 first: this one takes version 3 and leaves 2 alone.
    fd = os.open(key_dir / "kek-v2.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secrets.token_bytes(32))
    os.close(fd)
    assert provider.new_kek_version() == "file:v3"
    assert (key_dir / "kek-v1.key").read_bytes() == before


def test_file_provider_refuses_readable_keys(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    provider = FileKeyProvider(key_dir)
    wrapped = provider.wrap(_dek())
    (key_dir / "kek-v1.key").chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by other users"):
        FileKeyProvider(key_dir).unwrap(wrapped)
    (key_dir / "kek-v1.key").chmod(0o600)
    key_dir.chmod(0o755)
    with pytest.raises(ConfigurationError, match="accessible to other users"):
        FileKeyProvider(key_dir).current_kek_id()


def test_file_provider_fails_closed_on_missing_or_damaged_keks(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    wrapped = FileKeyProvider(key_dir).wrap(_dek())
    (key_dir / "kek-v1.key").write_bytes(b"short")
    with pytest.raises(KeyProviderUnavailable, match="damaged"):
        FileKeyProvider(key_dir).unwrap(wrapped)
    (key_dir / "kek-v1.key").unlink()
    with pytest.raises(KeyProviderUnavailable, match="missing"):
        FileKeyProvider(key_dir).unwrap(wrapped)


# The PKCS#11 provider -----------------------------------------------------------------------------


@pytest.fixture
def hsm() -> softhsm.SoftHsmToken:
    try:
        return softhsm.token()
    except softhsm.SoftHsmUnavailable as exc:
        pytest.fail(f"SoftHSM2 is needed: {exc}", pytrace=False)


@pytest.fixture
def hsm_provider(hsm: softhsm.SoftHsmToken) -> Pkcs11KeyProvider:
    return Pkcs11KeyProvider(hsm.module, hsm.label, hsm.pin)


def test_pkcs11_kek_never_leaves_the_token(hsm_provider: Pkcs11KeyProvider) -> None:
    kek_id = hsm_provider.current_kek_id()
    key = hsm_provider.key_object(kek_id)
    try:
        assert key.label == f"medcollab-kek-v{kek_id.split(':v')[1]}"
        assert key.key_length == 256
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        # Both say the key was generated inside the token and never was exportable.
        assert key[Attribute.ALWAYS_SENSITIVE] is True
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            key[Attribute.EXTRACTABLE] = True
    finally:
        hsm_provider.close()


def test_pkcs11_errors_fail_closed(hsm: softhsm.SoftHsmToken) -> None:
    provider = Pkcs11KeyProvider(hsm.module, hsm.label, hsm.pin)
    keep_logged_in = Pkcs11KeyProvider(hsm.module, hsm.label, hsm.pin)
    try:
        wrapped = provider.wrap(_dek(), context=CONTEXT)
        # The token forgets the session, as after an HSM restart or a network cut.
        provider._session.close()
        with pytest.raises(KeyProviderUnavailable) as caught:
            provider.unwrap(wrapped, context=CONTEXT)
        assert caught.value.code == "key_provider_unavailable"
        assert isinstance(caught.value, ServiceUnavailable)
        provider.close()
        with pytest.raises(KeyProviderUnavailable, match="closed"):
            provider.unwrap(wrapped, context=CONTEXT)
        # Another provider on the same token is unaffected.
        assert keep_logged_in.unwrap(wrapped, context=CONTEXT)
    finally:
        provider.close()
        keep_logged_in.close()


def test_pkcs11_configuration_errors_are_named(hsm: softhsm.SoftHsmToken, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        Pkcs11KeyProvider(tmp_path / "missing.so", hsm.label, hsm.pin)
    with pytest.raises(ConfigurationError, match="no PKCS#11 token labelled"):
        Pkcs11KeyProvider(hsm.module, "no-such-token", hsm.pin)
    wrong = "wrong-pin-7f3a"
    # A token not logged in yet asks the token; one already logged in compares with the PIN used.
    for label in (hsm.other_label, hsm.label):
        with pytest.raises(ConfigurationError, match="PIN is wrong") as caught:
            Pkcs11KeyProvider(hsm.module, label, wrong)
        assert wrong not in caught.value.diagnostics()


def test_provider_from_settings(hsm: softhsm.SoftHsmToken, tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(32)
    file_provider = provider_from_settings(
        Settings(mode="dev", secret_key=secret, data_dir=tmp_path)
    )
    assert isinstance(file_provider, FileKeyProvider)
    assert file_provider.current_kek_id() == "file:v1"
    assert (tmp_path / "keys" / "kek-v1.key").is_file()

    with pytest.raises(ConfigurationError, match="needs a module"):
        provider_from_settings(
            Settings(mode="dev", secret_key=secret, data_dir=tmp_path, key_provider="pkcs11")
        )
    with pytest.raises(ConfigurationError, match="PIN"):
        provider_from_settings(
            Settings(
                mode="dev",
                secret_key=secret,
                data_dir=tmp_path,
                key_provider="pkcs11",
                pkcs11_module=hsm.module,
                pkcs11_token_label=hsm.label,
            )
        )
    hsm_provider = provider_from_settings(
        Settings(
            mode="dev",
            secret_key=secret,
            data_dir=tmp_path,
            key_provider="pkcs11",
            pkcs11_module=hsm.module,
            pkcs11_token_label=hsm.label,
            pkcs11_pin=hsm.pin,
        )
    )
    try:
        assert isinstance(hsm_provider, Pkcs11KeyProvider)
        assert hsm_provider.current_kek_id().startswith("pkcs11:v")
    finally:
        hsm_provider.close()
