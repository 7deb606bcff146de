"""The audit log key: Ed25519 signing and the file-based key store."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from medcollab.crypto.signing import (
    LOG_KEY_FILENAME,
    Ed25519Signer,
    LogSigner,
    SignatureInvalid,
    load_log_key,
    load_or_create_log_key,
    log_key_path,
    verify_ed25519,
)
from medcollab.errors import ConfigurationError


def test_sign_and_verify() -> None:
    signer = Ed25519Signer.generate()
    assert isinstance(signer, LogSigner)
    signature = signer.sign(b"tree head")
    assert len(signature) == 64
    assert len(signer.public_key_bytes()) == 32
    verify_ed25519(signer.public_key_bytes(), signature, b"tree head")
    for key, sig, data in (
        (signer.public_key_bytes(), signature, b"tree heaD"),
        (Ed25519Signer.generate().public_key_bytes(), signature, b"tree head"),
        (signer.public_key_bytes(), signature[:-1], b"tree head"),
        (signer.public_key_bytes()[:31], signature, b"tree head"),
        (bytes(32), signature, b"tree head"),
    ):
        with pytest.raises(SignatureInvalid):
            verify_ed25519(key, sig, data)


def test_repr_shows_no_private_material() -> None:
    seed = bytes(range(32))
    signer = Ed25519Signer.from_seed(seed)
    assert seed.hex() not in repr(signer)
    assert signer.public_key_bytes().hex() in repr(signer)
    with pytest.raises(ValueError, match="32 bytes"):
        Ed25519Signer.from_seed(b"short")


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = log_key_path(tmp_path / "keys")
    assert path.name == LOG_KEY_FILENAME
    first = load_or_create_log_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(path.read_bytes()) == 32
    assert load_or_create_log_key(path).public_key_bytes() == first.public_key_bytes()
    assert load_log_key(path).public_key_bytes() == first.public_key_bytes()
    assert [p.name for p in path.parent.iterdir()] == [LOG_KEY_FILENAME]


def test_unsafe_or_missing_key_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / LOG_KEY_FILENAME
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_log_key(path)
    path.write_bytes(bytes(32))
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by other users"):
        load_log_key(path)
    path.chmod(0o600)
    path.write_bytes(bytes(31))
    with pytest.raises(ConfigurationError, match="not an Ed25519 seed"):
        load_or_create_log_key(path)
