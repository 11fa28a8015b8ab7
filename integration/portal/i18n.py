"""The patient page in the patient's language: gettext catalogues read from ``.po`` files.

Every visible string goes through ``_()`` (in the templates and, marked with :func:`N_`, in the
Python code), and ``locale/<language>/LC_MESSAGES/messages.po`` holds its translation. The
``.po`` files are read at run time (Babel's ``read_po``, compiled in memory): there is no build
step and no ``.mo`` file to forget. A language without a catalogue shows the English source
strings. Dates and times are formatted by Babel in the same locale.

To add a language: copy ``locale/es`` to ``locale/<code>``, translate the ``msgstr`` lines,
and list the code in ``[outreach] languages``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from functools import lru_cache
from io import BytesIO
from pathlib import Path

from babel.core import Locale, UnknownLocaleError
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import NullTranslations, Translations
from jinja2 import Environment, FileSystemLoader, StrictUndefined

__all__ = [
    "LOCALE_DIR",
    "N_",
    "SOURCE_LANGUAGE",
    "STATIC_DIR",
    "TEMPLATES_DIR",
    "PageText",
    "available_languages",
    "language_name",
    "negotiate",
    "normalize",
    "translations",
]

LOCALE_DIR = Path(__file__).with_name("locale")
TEMPLATES_DIR = Path(__file__).with_name("templates")
STATIC_DIR = Path(__file__).with_name("static")
SOURCE_LANGUAGE = "en"
"""The language the msgids are written in."""


def N_(message: str) -> str:
    """Marks a string for extraction; it is translated where it is shown."""
    return message


def normalize(tag: str | None) -> str:
    """``es-MX`` / ``es_MX`` / ``ES`` → ``es`` (the catalogues are per language)."""
    if not tag:
        return ""
    return tag.strip().replace("_", "-").split("-")[0].lower()


@lru_cache(maxsize=1)
def available_languages() -> tuple[str, ...]:
    """The languages the page can be shown in: English plus every catalogue present."""
    found = {SOURCE_LANGUAGE}
    if LOCALE_DIR.is_dir():
        found.update(p.parent.parent.name for p in LOCALE_DIR.glob("*/LC_MESSAGES/messages.po"))
    return tuple(sorted(found))


@lru_cache(maxsize=32)
def translations(language: str) -> NullTranslations:
    """The catalogue for ``language`` (read once), or the source strings when there is none."""
    path = LOCALE_DIR / language / "LC_MESSAGES" / "messages.po"
    if not path.is_file():
        return NullTranslations()
    with path.open("rb") as fh:
        catalog = read_po(fh, locale=language)
    buf = BytesIO()
    write_mo(buf, catalog, use_fuzzy=False)
    buf.seek(0)
    return Translations(fp=buf, domain="messages")


def language_name(code: str) -> str:
    """A language's name in that language ("English", "Español"), for choosing it."""
    try:
        name = Locale.parse(code.replace("-", "_")).get_display_name(code.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return code
    return (name or code)[:1].upper() + (name or code)[1:]


def negotiate(accept_language: str, languages: Iterable[str]) -> str | None:
    """The best of ``languages`` for an ``Accept-Language`` header, if any fits."""
    wanted: list[tuple[float, int, str]] = []
    for index, part in enumerate(accept_language.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if tag and quality > 0:
            wanted.append((-quality, index, normalize(tag)))
    offered = set(languages)
    for _q, _i, tag in sorted(wanted):
        if tag in offered:
            return tag
    return None


class PageText:
    """One Jinja2 environment per language, with that language's gettext installed."""

    def __init__(self, templates: Path = TEMPLATES_DIR) -> None:
        self._templates = templates
        self._envs: dict[str, Environment] = {}
        self._guard = threading.Lock()

    def environment(self, language: str) -> Environment:
        with self._guard:
            env = self._envs.get(language)
            if env is None:
                env = Environment(
                    loader=FileSystemLoader(str(self._templates)),
                    autoescape=True,
                    undefined=StrictUndefined,
                    extensions=["jinja2.ext.i18n"],
                    trim_blocks=True,
                    lstrip_blocks=True,
                )
                env.install_gettext_translations(  # type: ignore[attr-defined]
                    translations(language), newstyle=True
                )
                self._envs[language] = env
            return env

    def gettext(self, language: str) -> Callable[[str], str]:
        return translations(language).gettext

    def render(self, template: str, language: str, /, **values: object) -> str:
        return self.environment(language).get_template(template).render(**values)
