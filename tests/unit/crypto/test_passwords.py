"""Argon2id parameters and behaviour."""

from __future__ import annotations

import pytest

from medcollab.crypto.passwords import (
    ASVS_MINIMUM,
    DEFAULT_PARAMETERS,
    Argon2Parameters,
    PasswordHasher,
    parameters_of,
)
from medcollab.errors import AuthenticationFailed


def test_parameters_meet_the_asvs_minimums(hasher: PasswordHasher) -> None:
    stored = parameters_of(hasher.hash("a long enough passphrase"))
    assert stored == DEFAULT_PARAMETERS
    # OWASP ASVS 5.0 appendix / Password Storage Cheat Sheet: Argon2id, m >= 19 MiB, t >= 2, p >= 1.
    assert stored.memory_cost_kib >= ASVS_MINIMUM.memory_cost_kib == 19 * 1024
    assert stored.time_cost >= ASVS_MINIMUM.time_cost == 2
    assert stored.parallelism >= ASVS_MINIMUM.parallelism == 1
    assert stored.salt_len >= 16
    assert stored.hash_len >= 32


def test_hash_is_argon2id_and_salted(hasher: PasswordHasher) -> None:
    first, second = hasher.hash("same password here"), hasher.hash("same password here")
    assert first.startswith("$argon2id$")
    assert first != second


def test_verify_accepts_exact_password_only(hasher: PasswordHasher) -> None:
    stored = hasher.hash("Exact Pass Phrase 42")
    hasher.verify(stored, "Exact Pass Phrase 42")
    for wrong in ("exact pass phrase 42", "Exact Pass Phrase 4", "Exact Pass Phrase 42 ", ""):
        with pytest.raises(AuthenticationFailed):
            hasher.verify(stored, wrong)


def test_no_truncation_of_long_passwords(hasher: PasswordHasher) -> None:
    base = "x" * 127
    stored = hasher.hash(base + "a")
    with pytest.raises(AuthenticationFailed):
        hasher.verify(stored, base + "b")


def test_garbage_hash_fails_closed(hasher: PasswordHasher) -> None:
    with pytest.raises(AuthenticationFailed):
        hasher.verify("not-a-hash", "anything at all")


def test_rehash_needed_when_parameters_change(hasher: PasswordHasher) -> None:
    weaker = PasswordHasher(Argon2Parameters(time_cost=2, memory_cost_kib=19 * 1024, parallelism=1))
    old = weaker.hash("a long enough passphrase")
    assert hasher.needs_rehash(old)
    assert not hasher.needs_rehash(hasher.hash("a long enough passphrase"))
