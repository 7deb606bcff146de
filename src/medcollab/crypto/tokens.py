"""Random tokens and codes from the operating system's CSPRNG."""

from __future__ import annotations

import secrets

#: 32 bytes = 256 bits of entropy, above NIST SP 800-63B-4's 64-bit floor for session secrets.
TOKEN_BYTES = 32
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # No 0/o, 1/l/i: read aloud, typed by hand.
RECOVERY_CODE_GROUPS = 3
RECOVERY_CODE_GROUP_LEN = 4


def new_token(prefix: str) -> str:
    """An opaque bearer secret such as ``mcs_…``; the prefix helps secret scanners, adds no entropy."""
    return f"{prefix}_{secrets.token_urlsafe(TOKEN_BYTES)}"


def new_recovery_code() -> str:
    """A one-time recovery code like ``k7qm-2xhd-9tnw`` (12 symbols from 31, about 59 bits)."""
    groups = (
        "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(RECOVERY_CODE_GROUP_LEN))
        for _ in range(RECOVERY_CODE_GROUPS)
    )
    return "-".join(groups)


def normalise_recovery_code(code: str) -> str:
    """Accept codes typed with spaces, without dashes or in capitals."""
    compact = "".join(ch for ch in code.lower() if ch.isalnum())
    size = RECOVERY_CODE_GROUP_LEN
    return "-".join(compact[i : i + size] for i in range(0, len(compact), size))


def new_totp_seed() -> bytes:
    """A 160-bit TOTP seed, the size RFC 4226 recommends for HMAC-SHA1."""
    return secrets.token_bytes(20)
