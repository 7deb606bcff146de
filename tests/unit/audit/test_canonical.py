"""RFC 8785 canonical JSON for the subset audit events use."""

from __future__ import annotations

import json

import pytest

from medcollab.audit.canonical import MAX_SAFE_INTEGER, NotCanonicalizable, canonical_json
from medcollab.errors import InvalidInput


def test_rfc8785_section_3_2_2_strings_and_literals() -> None:
    # The RFC's example without its "numbers" member: floating point is outside our subset.
    parsed = json.loads(
        r"""{
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"""
    )
    assert canonical_json(parsed) == (
        b'{"literals":[null,true,false],"string":"\xe2\x82\xac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )


def test_rfc8785_section_3_2_3_sorting_by_utf16_code_units() -> None:
    parsed = json.loads(
        r"""{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"""
    )
    expected = (
        '{"\\r":"Carriage Return","1":"One","\u0080":"Control",'
        '"\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign",'
        '"\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'
    )
    assert canonical_json(parsed) == expected.encode("utf-8")


def test_supplementary_characters_sort_by_their_leading_surrogate() -> None:
    # Code-point order would put U+FB33 first; UTF-16 order puts U+1F600 (0xD83D...) first.
    assert canonical_json({"\ufb33": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ufb33":1}'.encode()


def test_escapes_follow_ecmascript() -> None:
    value = '\x00\x08\t\n\x0c\r\x1f"\\/ \x7f\u2028\u2029 é'
    assert canonical_json(value) == (
        '"\\u0000\\b\\t\\n\\f\\r\\u001f\\"\\\\/ \x7f\u2028\u2029 é"'.encode()
    )


def test_structure_whitespace_and_order() -> None:
    value = {"b": [3, {"z": 1, "a": 2}, 1], "a": {"y": None, "x": True}, "c": (False, "s")}
    assert canonical_json(value) == (
        b'{"a":{"x":true,"y":null},"b":[3,{"a":2,"z":1},1],"c":[false,"s"]}'
    )
    reordered = {"c": (False, "s"), "a": {"x": True, "y": None}, "b": [3, {"a": 2, "z": 1}, 1]}
    assert canonical_json(reordered) == canonical_json(value)
    assert canonical_json({}) == b"{}"
    assert canonical_json([]) == b"[]"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, b"0"), (-1, b"-1"), (MAX_SAFE_INTEGER, b"9007199254740991"), (-MAX_SAFE_INTEGER, None)],
)
def test_integers_within_ijson_range(value: int, expected: bytes | None) -> None:
    assert canonical_json(value) == (expected or str(value).encode())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (MAX_SAFE_INTEGER + 1, "outside the I-JSON range"),
        (-(2**60), "outside the I-JSON range"),
        (1.5, "cannot canonicalise a float"),
        ({"a": 0.0}, "cannot canonicalise a float"),
        (b"bytes", "cannot canonicalise a bytes"),
        ({1: "x"}, "is not a string"),
        ("\ud800", "lone surrogate"),
        ({"\udfff": 1}, "lone surrogate"),
        ({1, 2}, "cannot canonicalise a set"),
    ],
)
def test_values_outside_the_subset_are_refused(value: object, message: str) -> None:
    with pytest.raises(NotCanonicalizable, match=message):
        canonical_json(value)  # type: ignore[arg-type]
    assert issubclass(NotCanonicalizable, InvalidInput)


def test_depth_is_limited() -> None:
    deep: object = "x"
    for _ in range(70):
        deep = [deep]
    with pytest.raises(NotCanonicalizable, match="nested deeper"):
        canonical_json(deep)  # type: ignore[arg-type]


def test_output_parses_back_to_the_input() -> None:
    value = {"reasons": ["密码错误", "a\tb"], "n": 42, "ok": False, "none": None}
    assert json.loads(canonical_json(value)) == value
