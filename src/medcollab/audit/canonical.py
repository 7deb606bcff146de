"""RFC 8785 JSON Canonicalization Scheme (JCS) for the values audit events are made of.

Audit leaves are hashed over bytes, so the same event must always give the same bytes, whatever
produced them. JCS fixes every choice JSON leaves open: no whitespace, object members sorted by the
UTF-16 code units of their names, strings escaped exactly as ECMAScript's ``JSON.stringify`` does,
and the output encoded as UTF-8.

Audit events use only strings, integers, booleans, null, arrays and objects, so this implementation
covers that subset and refuses everything else instead of guessing:

- floating-point numbers (JCS would need the ECMAScript double-to-string algorithm; no event has one);
- integers outside the I-JSON range ±(2**53 - 1), which a JavaScript verifier could not read exactly;
- strings with lone surrogates, which are not Unicode text and which RFC 8785 excludes;
- object names that are not strings.

A refusal is a bug in the event's producer, so it raises :class:`NotCanonicalizable` at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final, TypeAlias

from medcollab.errors import InvalidInput

JsonValue: TypeAlias = "bool | int | str | Sequence[JsonValue] | Mapping[str, JsonValue] | None"

#: The largest integer an IEEE 754 double represents exactly, and so the I-JSON limit (RFC 7493).
MAX_SAFE_INTEGER: Final = 2**53 - 1

# ECMAScript's JSON.stringify escapes exactly these characters with a short form; the other control
# characters become \u00xx with lower-case hexadecimal, and everything else is written as itself.
_SHORT_ESCAPES: Final = {
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
    '"': '\\"',
    "\\": "\\\\",
}
_ESCAPES: Final = {
    **{chr(c): f"\\u{c:04x}" for c in range(0x20)},
    **_SHORT_ESCAPES,
}


_ESCAPED: Final = re.compile('[\x00-\x1f"\\\\]')
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_SPECIAL: Final = re.compile('[\x00-\x1f"\\\\\ud800-\udfff]')


class NotCanonicalizable(InvalidInput):
    """The value holds something RFC 8785 (or this subset of it) cannot encode."""

    code = "not_canonicalizable"


def canonical_json(value: JsonValue) -> bytes:
    """The RFC 8785 canonical UTF-8 encoding of ``value``."""
    parts: list[str] = []
    _write(value, parts, depth=0)
    return "".join(parts).encode("utf-8")


_MAX_DEPTH: Final = 64


def _write(value: JsonValue, out: list[str], *, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise NotCanonicalizable(f"value is nested deeper than {_MAX_DEPTH} levels")
    # bool before int: in Python, True is an int.
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise NotCanonicalizable(f"integer {value} is outside the I-JSON range ±(2**53 - 1)")
        out.append(str(int(value)))
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, Mapping):
        _write_object(value, out, depth=depth)
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out, depth=depth + 1)
        out.append("]")
    else:
        raise NotCanonicalizable(
            f"cannot canonicalise a {type(value).__name__}: audit events hold only strings, "
            "integers, booleans, null, arrays and objects"
        )


def _write_object(value: Mapping[str, JsonValue], out: list[str], *, depth: int) -> None:
    for name in value:
        if not isinstance(name, str):
            raise NotCanonicalizable(f"object member name {name!r} is not a string")
    out.append("{")
    for i, name in enumerate(sorted(value, key=_utf16_key)):
        if i:
            out.append(",")
        out.append(_string(name))
        out.append(":")
        _write(value[name], out, depth=depth + 1)
    out.append("}")


def _utf16_key(name: str) -> bytes:
    # Big-endian UTF-16 bytes compare in the same order as the code units they encode, which is
    # the order RFC 8785 section 3.2.3 prescribes (it differs from code-point order above U+FFFF).
    return name.encode("utf-16-be", "surrogatepass")


def _string(value: str) -> str:
    if _SPECIAL.search(value) is None:
        # The common case (identifiers, codes, timestamps) needs no escaping at all.
        return '"' + value + '"'
    if _SURROGATE.search(value) is not None:
        raise NotCanonicalizable("string holds a lone surrogate, which is not Unicode text")
    return '"' + _ESCAPED.sub(lambda m: _ESCAPES[m.group()], value) + '"'
