"""The web app's languages: English (the source language) and Simplified Chinese, through gettext.

Every string a person reads is marked in the templates with ``_("...")`` and in Python with
:func:`N_` (a marker that returns its argument, translated later at render time). Babel extracts
them with ``babel.cfg`` beside this file into ``locale/zh_CN/LC_MESSAGES/messages.po``; the compiled
``messages.mo`` beside it is committed and loaded at run time. A unit test fails when a marked
string has no Chinese translation or when the ``.mo`` does not match the ``.po``.

Keeping the catalogue current::

    python -m medcollab.web.i18n update    # extract, merge into messages.po (new entries empty)
    # ... translate the empty entries ...
    python -m medcollab.web.i18n compile   # messages.po -> messages.mo

The language of a request is the one chosen with the switch (a cookie), else the browser's
``Accept-Language``, else English.
"""

from __future__ import annotations

import argparse
import functools
import gettext
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from babel.core import Locale
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po, write_po
from babel.support import Translations

HERE: Final = Path(__file__).parent
LOCALE_DIR: Final = HERE / "locale"
MAPPING_FILE: Final = HERE / "babel.cfg"
DOMAIN: Final = "messages"
#: The language tags the switch offers (BCP 47, as in ``<html lang>``), mapped to Babel locales.
LANGUAGES: Final = {"en": "en", "zh-CN": "zh_CN"}
#: Each language's name in itself, as the switch shows it (never translated).
LANGUAGE_NAMES: Final = {"en": "English", "zh-CN": "简体中文"}
DEFAULT_LANGUAGE: Final = "en"
#: The languages that have a catalogue; English is the source and needs none.
TRANSLATED: Final = ("zh_CN",)
LANG_COOKIE: Final = "__Host-medcollab_lang"


def N_(message: str) -> str:  # noqa: N802 - the conventional gettext marker name.
    """Mark ``message`` for extraction; it is translated where it is shown."""
    return message


def po_path(locale: str) -> Path:
    return LOCALE_DIR / locale / "LC_MESSAGES" / f"{DOMAIN}.po"


def mo_path(locale: str) -> Path:
    return LOCALE_DIR / locale / "LC_MESSAGES" / f"{DOMAIN}.mo"


@functools.cache
def translations(language: str) -> gettext.NullTranslations:
    """The catalogue for a language tag of :data:`LANGUAGES`.

    A missing catalogue is an error, not a silent fallback to English: "every string translated"
    is a promise the product makes.
    """
    locale = LANGUAGES[language]
    if locale not in TRANSLATED:
        return gettext.NullTranslations()
    with mo_path(locale).open("rb") as handle:
        return Translations(handle, domain=DOMAIN)


def babel_locale(language: str) -> Locale:
    return Locale.parse(LANGUAGES[language])


def negotiate(cookie: str | None, accept_language: str | None) -> str:
    """The request's language: the switch's cookie, else the browser's first supported choice."""
    if cookie in LANGUAGES:
        return cookie
    for tag in _accepted(accept_language or ""):
        if tag.startswith("zh"):
            return "zh-CN"
        if tag.startswith("en"):
            return "en"
    return DEFAULT_LANGUAGE


def _accepted(header: str) -> Iterator[str]:
    """Language tags of an ``Accept-Language`` header, most preferred first."""
    weighted: list[tuple[float, int, str]] = []
    for position, item in enumerate(header.split(",")[:20]):
        tag, _, params = item.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        if tag and quality > 0:
            weighted.append((-quality, position, tag.strip().lower()))
    for _quality, _position, tag in sorted(weighted):
        yield tag


# Catalogue maintenance ---------------------------------------------------------------------------


def extract_catalog() -> Catalog:
    """Every marked string in the web package's code and templates, as a template catalogue."""
    with MAPPING_FILE.open(encoding="utf-8") as handle:
        method_map, options_map = parse_mapping_cfg(handle)  # type: ignore[no-untyped-call]
    catalog = Catalog(project="medcollab", domain=DOMAIN, charset="utf-8")
    for filename, lineno, message, comments, context in extract_from_dir(
        str(HERE), method_map, options_map, strip_comment_tags=True
    ):
        catalog.add(
            message,
            None,
            [(filename, lineno)],
            auto_comments=comments,
            context=context,
        )
    return catalog


def read_catalog(locale: str) -> Catalog:
    with po_path(locale).open("rb") as handle:
        return read_po(handle, locale=locale, domain=DOMAIN)


def update_catalogs() -> None:
    """Merge newly marked strings into every ``.po`` (they arrive untranslated)."""
    template = extract_catalog()
    for locale in TRANSLATED:
        path = po_path(locale)
        if path.exists():
            catalog = read_catalog(locale)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            catalog = Catalog(locale=locale, domain=DOMAIN, charset="utf-8")
        catalog.update(template, no_fuzzy_matching=True, update_creation_date=False)
        catalog.project, catalog.version = "medcollab", "0.1"
        catalog.copyright_holder = "medcollab contributors"
        catalog.last_translator = catalog.language_team = "medcollab contributors"
        catalog.msgid_bugs_address = ""
        # A fuzzy header would be left out of the compiled catalogue, and with it the charset.
        catalog.fuzzy = False
        buffer = io.BytesIO()
        write_po(buffer, catalog, width=100, include_lineno=False, ignore_obsolete=True)
        path.write_bytes(buffer.getvalue())


def compiled(locale: str) -> bytes:
    """The ``.mo`` bytes for a locale's ``.po``, exactly as :func:`compile_catalogs` writes them."""
    buffer = io.BytesIO()
    write_mo(buffer, read_catalog(locale), use_fuzzy=False)
    return buffer.getvalue()


def compile_catalogs() -> None:
    for locale in TRANSLATED:
        mo_path(locale).write_bytes(compiled(locale))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Maintain the web app's translation catalogues.")
    parser.add_argument("command", choices=("update", "compile"))
    args = parser.parse_args(argv)
    if args.command == "update":
        update_catalogs()
    else:
        compile_catalogs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
