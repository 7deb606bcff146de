"""The password policy: length rules, no composition rules, blocklist and context words."""

from __future__ import annotations

import pytest

from medcollab.errors import PasswordPolicyViolation
from medcollab.identity.passwords import check_password, common_passwords


def test_blocklist_ships_with_the_package() -> None:
    words = common_passwords()
    assert len(words) >= 3000  # ASVS 5.0 V6.2.4: at least the top 3000.
    assert {"password", "123456", "qwerty", "iloveyou"} <= words


@pytest.mark.parametrize(
    "password",
    [
        "zebra lantern quietly folds",  # spaces are characters
        "长城脚下的小红马跑得很快",  # 12 Chinese characters count as 12
        "n0 c0mp0s1t10n rul3s",
        "x" * 2 + "7Fq!mZ2pLw9#vR",
        "a" * 3 + "bcdfghjklmnpq" + "é" * 112,  # 128 characters, the maximum
    ],
)
def test_acceptable_passwords(password: str) -> None:
    check_password(password, has_mfa=True)


def test_length_depends_on_mfa() -> None:
    eleven, twelve, fourteen = "tq8#Lw2!vZ4", "tq8#Lw2!vZ4m", "tq8#Lw2!vZ4mRk"
    with pytest.raises(PasswordPolicyViolation, match="at least 12"):
        check_password(eleven, has_mfa=True)
    check_password(twelve, has_mfa=True)
    with pytest.raises(PasswordPolicyViolation, match=r"at least 15 .*without a second factor"):
        check_password(fourteen, has_mfa=False)
    check_password(fourteen + "p", has_mfa=False)


def test_maximum_length_is_128() -> None:
    check_password("Kq7" + "w" * 125, has_mfa=True)
    with pytest.raises(PasswordPolicyViolation, match="at most 128"):
        check_password("Kq7" + "w" * 126, has_mfa=True)


@pytest.mark.parametrize(
    "password",
    ["password1234", "Password2024!!", "!!iloveyou!!2024", "qwertyqwertyqwerty", "monkeymonkey"],
)
def test_common_passwords_and_decorations_are_refused(password: str) -> None:
    with pytest.raises(PasswordPolicyViolation, match="too common"):
        check_password(password, has_mfa=True)


@pytest.mark.parametrize(
    "password", ["123456789012345", "bcdefghijklmnopq", "zzzzzzzzzzzzzz", "8901234567890123"]
)
def test_patterns_are_refused(password: str) -> None:
    with pytest.raises(PasswordPolicyViolation, match="pattern"):
        check_password(password, has_mfa=True)


def test_context_words_are_refused() -> None:
    with pytest.raises(PasswordPolicyViolation, match="context word"):
        check_password("Zhang Wei 2026!!", has_mfa=True, display_name="Zhang Wei")
    with pytest.raises(PasswordPolicyViolation, match="context word"):
        check_password("dr.zhangwei#1", has_mfa=True, username="dr.zhangwei")


def test_control_characters_are_refused() -> None:
    with pytest.raises(PasswordPolicyViolation, match="control"):
        check_password("tab\tseparated words", has_mfa=True)
