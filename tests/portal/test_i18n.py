"""The page's text catalogues: every string the templates and code mark is translated, with
the same placeholders, and read from the .po files at run time."""

from __future__ import annotations

import re
from pathlib import Path

from babel.messages.extract import extract_from_file
from babel.messages.pofile import read_po

from integration.portal.i18n import (
    LOCALE_DIR,
    TEMPLATES_DIR,
    PageText,
    available_languages,
    translations,
)

KEYWORDS = {"_": None, "N_": None, "gettext": None}
PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def used_msgids() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(TEMPLATES_DIR.glob("*.html")):
        for lineno, msg, _c, _x in extract_from_file(
                "jinja2.ext.babel_extract", str(path), keywords=KEYWORDS,
                options={"extensions": "jinja2.ext.i18n"}):
            found.setdefault(str(msg), f"{path.name}:{lineno}")
    for path in sorted(Path(TEMPLATES_DIR.parent).glob("*.py")):
        for lineno, msg, _c, _x in extract_from_file("python", str(path), keywords=KEYWORDS):
            found.setdefault(str(msg), f"{path.name}:{lineno}")
    return found


def catalogue(language: str) -> dict[str, str]:
    with (LOCALE_DIR / language / "LC_MESSAGES" / "messages.po").open("rb") as fh:
        cat = read_po(fh, locale=language)
    return {str(m.id): str(m.string) for m in cat if m.id}


def test_languages() -> None:
    assert available_languages() == ("en", "es")


def test_every_string_is_in_both_catalogues() -> None:
    used = used_msgids()
    assert len(used) > 50
    for language in ("en", "es"):
        cat = catalogue(language)
        missing = {m: where for m, where in used.items() if not cat.get(m)}
        assert not missing, f"{language}: untranslated {missing}"
        stale = set(cat) - set(used)
        assert not stale, f"{language}: not used any more {stale}"
        for msgid, msgstr in cat.items():
            assert set(PLACEHOLDER.findall(msgid)) == set(PLACEHOLDER.findall(msgstr)), msgid
    spanish = catalogue("es")
    assert all(spanish[m] != m for m in used if len(m) > 12), "English left in Spanish"


def test_translations_are_read_from_po() -> None:
    assert translations("es").gettext("Your appointment") == "Su cita"
    assert translations("en").gettext("Your appointment") == "Your appointment"
    assert translations("xx").gettext("Your appointment") == "Your appointment"


def test_newstyle_gettext_escapes_values() -> None:
    env = PageText().environment("es")
    html = env.from_string('{{ _("Hello, %(name)s.", name=n) }}').render(n="<b>Ana</b>")
    assert html == "Hola, &lt;b&gt;Ana&lt;/b&gt;."
