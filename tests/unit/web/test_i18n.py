"""Every string of the web app is translated into Simplified Chinese, and the compiled catalogue
the server loads is the one the translators wrote."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from babel.messages.mofile import read_mo

from medcollab.web import i18n

TEMPLATES = Path(i18n.HERE) / "templates"
#: Attributes whose values a person reads or hears (screen readers), so must be translated.
READ_ATTRIBUTES = frozenset({"alt", "title", "placeholder", "aria-label", "aria-description"})
#: Data attributes that carry messages for app.js to show.
MESSAGE_ATTRIBUTES = frozenset(
    {"data-checking", "data-verified", "data-failed", "data-unavailable", "data-template"}
)
_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)


def test_every_marked_string_has_a_chinese_translation() -> None:
    extracted = i18n.extract_catalog()
    translated = i18n.read_catalog("zh_CN")
    assert len(extracted) > 250
    missing = []
    for message in extracted:
        if not message.id:
            continue
        entry = translated.get(message.id, context=message.context)
        if entry is None or not entry.string or entry.fuzzy:
            missing.append(message.id)
    assert not missing, f"untranslated (run python -m medcollab.web.i18n update): {missing}"
    stale = {m.id for m in translated if m.id} - {m.id for m in extracted if m.id}
    assert not stale, f"translations of strings no longer used: {sorted(stale)}"


def test_translations_keep_their_placeholders() -> None:
    problems = [(m.id, errors) for m, errors in i18n.read_catalog("zh_CN").check()]
    assert not problems


def test_compiled_catalogue_matches_the_po_file() -> None:
    with i18n.mo_path("zh_CN").open("rb") as handle:
        compiled = read_mo(handle)
    written = i18n.read_catalog("zh_CN")
    assert {m.id: m.string for m in compiled if m.id} == {m.id: m.string for m in written if m.id}
    # Byte for byte, too: the committed .mo is exactly what `i18n compile` writes.
    assert i18n.mo_path("zh_CN").read_bytes() == i18n.compiled("zh_CN")
    assert i18n.translations("zh-CN").gettext("Sign in") == "登录"


class _TextFinder(HTMLParser):
    """Text and read attributes of a template whose Jinja expressions were blanked out."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("code", "pre", "script", "style"):
            self._skip += 1
        for name, value in attrs:
            if name in READ_ATTRIBUTES | MESSAGE_ATTRIBUTES and value and _words(value):
                self.found.append(f"{tag}[{name}]={value!r}")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("code", "pre", "script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and _words(data):
            self.found.append(repr(data.strip()))


def _words(text: str) -> bool:
    """Whether text holds something to read (letters), not punctuation or placeholders."""
    return bool(re.search(r"[A-Za-z\u4e00-\u9fff]", text.replace("medcollab", "")))


@pytest.mark.parametrize("template", sorted(TEMPLATES.glob("*.html")), ids=lambda p: p.name)
def test_templates_hold_no_untranslated_text(template: Path) -> None:
    source = _JINJA.sub("", template.read_text(encoding="utf-8"))
    finder = _TextFinder()
    finder.feed(source)
    assert not finder.found, f"literal text outside _() in {template.name}: {finder.found}"


def test_language_negotiation() -> None:
    assert i18n.negotiate(None, None) == "en"
    assert i18n.negotiate("zh-CN", "en") == "zh-CN"
    assert i18n.negotiate("fr", "zh-CN,zh;q=0.9") == "zh-CN"
    assert i18n.negotiate(None, "en-GB,en;q=0.9,zh;q=0.8") == "en"
    assert i18n.negotiate(None, "fr;q=1, zh-TW;q=0.8") == "zh-CN"
    assert i18n.negotiate(None, "zh;q=0, en") == "en"
    assert i18n.negotiate(None, "garbage;q=x") == "en"


def test_catalogue_update_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Running the upkeep command on a current catalogue changes nothing but the header date."""
    copy = tmp_path / "zh_CN" / "LC_MESSAGES"
    copy.mkdir(parents=True)
    (copy / "messages.po").write_bytes(i18n.po_path("zh_CN").read_bytes())
    monkeypatch.setattr(i18n, "LOCALE_DIR", tmp_path)
    i18n.update_catalogs()
    updated = (copy / "messages.po").read_bytes()
    original = (Path(i18n.HERE) / "locale/zh_CN/LC_MESSAGES/messages.po").read_bytes()
    strip = re.compile(rb'"(POT-Creation-Date|PO-Revision-Date): [^"]*"\n')
    assert strip.sub(b"", updated) == strip.sub(b"", original)


def test_the_text_finder_finds_literal_text() -> None:
    finder = _TextFinder()
    finder.feed(
        _JINJA.sub("", '<p>{{ _("ok") }}</p><p>Hello</p><img alt="A picture"><code>x1</code>')
    )
    assert finder.found == ["'Hello'", "img[alt]='A picture'"]
