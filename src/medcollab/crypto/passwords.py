"""Password hashing with Argon2id.

Parameters follow RFC 9106's "second recommended option" (t=3, m=64 MiB, p=4), which is above the
OWASP ASVS 5.0 / OWASP Password Storage Cheat Sheet minimums (m=19 MiB, t=2, p=1, or any configuration
of equal cost). Stored hashes carry their parameters, so raising them later only needs
:meth:`PasswordHasher.needs_rehash` at the next successful login.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Final

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from medcollab.errors import AuthenticationFailed


@dataclass(frozen=True, slots=True)
class Argon2Parameters:
    time_cost: int
    memory_cost_kib: int
    parallelism: int
    hash_len: int = 32
    salt_len: int = 16


#: The ASVS 5.0 appendix minimum for Argon2id, used by the tests as the floor.
ASVS_MINIMUM: Final = Argon2Parameters(time_cost=2, memory_cost_kib=19 * 1024, parallelism=1)
DEFAULT_PARAMETERS: Final = Argon2Parameters(time_cost=3, memory_cost_kib=64 * 1024, parallelism=4)

_MISMATCH = "invalid credentials"


class PasswordHasher:
    """Hashes and verifies passwords; verification failures raise one opaque error."""

    def __init__(self, parameters: Argon2Parameters = DEFAULT_PARAMETERS) -> None:
        self.parameters = parameters
        self._hasher = argon2.PasswordHasher(
            time_cost=parameters.time_cost,
            memory_cost=parameters.memory_cost_kib,
            parallelism=parameters.parallelism,
            hash_len=parameters.hash_len,
            salt_len=parameters.salt_len,
            type=argon2.Type.ID,
        )
        # Verifying against this hash costs exactly what a real verification costs, so an unknown
        # username takes as long as a known one with a wrong password.
        self._dummy_hash = self._hasher.hash("medcollab-dummy-password-for-timing-equality")

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored_hash: str, password: str) -> None:
        """Return if ``password`` matches; raise :class:`AuthenticationFailed` otherwise."""
        try:
            self._hasher.verify(stored_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            raise AuthenticationFailed(_MISMATCH) from None

    def burn(self, password: str) -> None:
        """Spend one verification's worth of work for a user that does not exist."""
        with contextlib.suppress(VerifyMismatchError, VerificationError, InvalidHashError):
            self._hasher.verify(self._dummy_hash, password)

    def needs_rehash(self, stored_hash: str) -> bool:
        return self._hasher.check_needs_rehash(stored_hash)


def parameters_of(stored_hash: str) -> Argon2Parameters:
    """Read the parameters a stored hash was made with (for tests and the admin report)."""
    params = argon2.extract_parameters(stored_hash)
    if params.type is not argon2.Type.ID:
        raise ValueError("not an Argon2id hash")
    return Argon2Parameters(
        time_cost=params.time_cost,
        memory_cost_kib=params.memory_cost,
        parallelism=params.parallelism,
        hash_len=params.hash_len,
        salt_len=params.salt_len,
    )
