"""The password policy (NIST SP 800-63B-4 §3.1.1.2, OWASP ASVS 5.0 V6.2).

Length is the rule: at least 12 characters when the account has a second factor and 15 when it does
not, at most 128, any characters at all, never truncated or case-changed. Composition rules are not
used. Passwords are refused when they are, or are built from, a common password, a context word
(the product, the username) or a trivial sequence.
"""

from __future__ import annotations

import unicodedata
from functools import cache
from importlib import resources
from itertools import pairwise

from medcollab.errors import PasswordPolicyViolation

MIN_LENGTH_WITH_MFA = 12
MIN_LENGTH_WITHOUT_MFA = 15
MAX_LENGTH = 128
_CONTEXT_WORDS = ("medcollab", "medical", "hospital", "password", "patient", "doctor")
#: Shortest run of a blocklisted word that makes a password "built from" it.
_MIN_WORD = 4
_MIN_DISTINCT = 4


@cache
def common_passwords() -> frozenset[str]:
    text = (
        resources.files("medcollab.identity")
        .joinpath("data/common-passwords.txt")
        .read_text(encoding="utf-8")
    )
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def _length(password: str) -> int:
    # NIST counts each Unicode code point as one character after normalisation (NFC here, as the
    # verifier compares the exact string it received).
    return len(unicodedata.normalize("NFC", password))


def _strip_decoration(text: str) -> str:
    """Remove the digits and symbols people wrap around a common word: ``!Password2024``."""
    start, end = 0, len(text)
    while start < end and not text[start].isalpha():
        start += 1
    while end > start and not text[end - 1].isalpha():
        end -= 1
    return text[start:end]


def _is_repetition(text: str) -> str | None:
    """The unit repeated to make ``text`` (``abcabcabc`` -> ``abc``), if it is one."""
    for size in range(1, len(text) // 2 + 1):
        if len(text) % size == 0 and text[:size] * (len(text) // size) == text:
            return text[:size]
    return None


def _is_sequence(text: str) -> bool:
    """True for runs like ``123456789012`` or ``abcdefghijkl`` (each step +1 or -1, wrapping digits)."""
    if len(text) < 2:
        return False
    steps = {ord(b) - ord(a) for a, b in pairwise(text)}
    if steps in ({1}, {-1}):
        return True
    # Digits may wrap around: 7890123 counts up, 3210987 counts down.
    return text.isdigit() and (steps <= {1, -9} or steps <= {-1, 9})


def check_password(
    password: str, *, has_mfa: bool, username: str | None = None, display_name: str | None = None
) -> None:
    """Raise :class:`PasswordPolicyViolation` naming the rule the password breaks."""
    minimum = MIN_LENGTH_WITH_MFA if has_mfa else MIN_LENGTH_WITHOUT_MFA
    length = _length(password)
    if length < minimum:
        reason = "" if has_mfa else " for an account without a second factor"
        raise PasswordPolicyViolation(
            f"password must be at least {minimum} characters{reason}",
            hint="a passphrase of several unrelated words is easy to remember and hard to guess",
        )
    if length > MAX_LENGTH:
        raise PasswordPolicyViolation(f"password must be at most {MAX_LENGTH} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in password):
        raise PasswordPolicyViolation("password must not contain control characters")

    folded = unicodedata.normalize("NFKC", password).casefold()
    compact = "".join(folded.split())
    blocklist = common_passwords()
    core = _strip_decoration(compact)
    unit = _is_repetition(compact) or _is_repetition(core) or ""
    candidates = {compact, core, unit}
    context = set(_CONTEXT_WORDS)
    for value in (username, display_name):
        if value:
            context.add(unicodedata.normalize("NFKC", value).casefold().replace(" ", ""))

    if any(c in blocklist for c in candidates if len(c) >= _MIN_WORD):
        raise PasswordPolicyViolation(
            "password is too common: it is, or is built from, a frequently used password"
        )
    if any(c and c in context for c in candidates) or any(
        len(word) >= _MIN_WORD
        and compact.replace(word, "")
        and len(_strip_decoration(compact.replace(word, ""))) < _MIN_WORD
        for word in context
        if word in compact
    ):
        raise PasswordPolicyViolation(
            "password is built from the username, the product name or another context word"
        )
    if len(set(compact)) < _MIN_DISTINCT or _is_sequence(compact):
        raise PasswordPolicyViolation("password is a repeated or sequential pattern")
