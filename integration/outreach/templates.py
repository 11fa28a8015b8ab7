"""Message templates: Jinja2 per step and language, Babel for dates in the patient's locale.

A template is one file, ``{name}.{language}.j2``, holding a block per channel: ``sms``,
``subject`` and ``text`` (and optionally ``html``) for email, ``voice`` for calls, ``portal``
for the patient page. A language without its own file falls back to the default language.
Dates are written with ``when(moment)``, ``day(moment)`` and ``clock(moment)``, which format in
the patient's locale and time zone ("martes, 3 de marzo de 2026, 10:30").

:meth:`TemplateCatalog.check` renders every template a pathway names, in every configured
language, with sample data, and is run at start: a missing file, a syntax error or an SMS past
its segment budget stops the start with the file and line, instead of failing at 3 a.m. when the
touch is due.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from babel.core import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime, format_time
from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
    select_autoescape,
)

from integration.outreach.pathways import Pathway
from integration.outreach.sms import sms_length

__all__ = ["BUILTIN", "CHANNEL_BLOCKS", "Rendered", "TemplateCatalog", "TemplateProblem"]

BUILTIN = Path(__file__).with_name("templates")
CHANNEL_BLOCKS = {
    "sms": ("sms",),
    "email": ("subject", "text"),
    "voice": ("voice",),
    "portal": ("portal",),
}


def _plain(text: str) -> str:
    return text.replace("\u202f", " ").replace("\u00a0", " ")


class TemplateProblem(ValueError):
    """A template that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Rendered:
    channel: str
    language: str
    parts: Mapping[str, str]
    """Block name → text (``sms``; ``subject``/``text``/``html``; ``voice``; ``portal``)."""

    @property
    def body(self) -> str:
        for name in ("sms", "text", "voice", "portal"):
            if name in self.parts:
                return self.parts[name]
        return ""


class TemplateCatalog:
    def __init__(
        self,
        folder: Path | None = None,
        *,
        default_language: str = "en",
        max_sms_segments: int = 3,
    ) -> None:
        self.folder = folder or BUILTIN
        self.default_language = default_language
        self.max_sms_segments = max_sms_segments
        self._env = Environment(
            loader=FileSystemLoader(str(self.folder)),
            undefined=StrictUndefined,
            autoescape=select_autoescape(default_for_string=False, default=False),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
        )

    def languages(self, name: str) -> list[str]:
        """The languages ``name`` has a file for."""
        return sorted(
            p.name.removeprefix(f"{name}.").removesuffix(".j2")
            for p in self.folder.glob(f"{name}.*.j2")
        )

    def _template(self, name: str, language: str) -> tuple[Template, str]:
        for lang in dict.fromkeys((language, self.default_language)):
            try:
                return self._env.get_template(f"{name}.{lang}.j2"), lang
            except TemplateNotFound:
                continue
        raise TemplateProblem(
            f"template {name!r}: no {name}.{language}.j2 nor {name}.{self.default_language}.j2 "
            f"in {self.folder}"
        )

    def render(
        self,
        name: str,
        channel: str,
        language: str,
        tz: tzinfo,
        values: Mapping[str, Any],
    ) -> Rendered:
        template, used = self._template(name, language)
        try:
            locale = Locale.parse(used.replace("-", "_"))
        except (UnknownLocaleError, ValueError):
            locale = Locale.parse(self.default_language)

        # CLDR puts a narrow no-break space before "AM"/"PM" (and no-break spaces elsewhere):
        # outside GSM-7, one of them turns a whole SMS into UCS-2 and doubles its segments.
        def when(moment: datetime, fmt: str = "full") -> str:
            day_part = format_date(moment.astimezone(tz), fmt, locale=locale)
            return _plain(f"{day_part}, {format_time(moment, 'short', tzinfo=tz, locale=locale)}")

        def day(moment: datetime, fmt: str = "full") -> str:
            return _plain(format_date(moment.astimezone(tz), fmt, locale=locale))

        def clock(moment: datetime) -> str:
            return _plain(format_time(moment, "short", tzinfo=tz, locale=locale))

        def stamp(moment: datetime, fmt: str = "medium") -> str:
            return _plain(format_datetime(moment, fmt, tzinfo=tz, locale=locale))

        context = template.new_context(
            {**values, "when": when, "day": day, "clock": clock, "stamp": stamp,
             "language": used, "channel": channel}
        )
        parts: dict[str, str] = {}
        wanted = [*CHANNEL_BLOCKS.get(channel, ()), *(("html",) if channel == "email" else ())]
        try:
            for block in wanted:
                if block in template.blocks:
                    text = "".join(template.blocks[block](context)).strip()
                    parts[block] = " ".join(text.split()) if block in ("sms", "subject") else text
        except UndefinedError as exc:
            raise TemplateProblem(f"{template.filename}: {exc.message}") from None
        missing = [b for b in CHANNEL_BLOCKS.get(channel, ()) if b not in parts]
        if missing:
            raise TemplateProblem(
                f"{template.filename}: no {{% block {missing[0]} %}} for the {channel} channel"
            )
        if channel == "sms":
            length = sms_length(parts["sms"])
            if length.segments > self.max_sms_segments:
                raise TemplateProblem(
                    f"{template.filename}: the SMS takes {length.segments} segments "
                    f"({length.units} {length.encoding} units); at most "
                    f"{self.max_sms_segments} allowed"
                )
        return Rendered(channel, used, parts)

    def check(self, pathways: Iterable[Pathway], languages: Iterable[str]) -> None:
        """Render every step's template for every channel and language with sample data."""
        sample = sample_values()
        for pathway in pathways:
            for step in pathway.steps:
                channels = (
                    pathway.fallback if step.channel == "preferred" else (step.channel,)
                )
                for language in dict.fromkeys((self.default_language, *languages)):
                    for channel in channels:
                        try:
                            self.render(step.template, channel, language, UTC, sample)
                        except TemplateSyntaxError as exc:
                            raise TemplateProblem(
                                f"{exc.filename or step.template}:{exc.lineno}: {exc.message}"
                            ) from None
                        except TemplateProblem as exc:
                            raise TemplateProblem(
                                f"pathway {pathway.name!r}: {exc}"
                            ) from None


def sample_values() -> dict[str, Any]:
    """What templates are given, with made-up values (used by :meth:`TemplateCatalog.check`
    and ``careloop outreach preview``)."""
    start = datetime(2026, 3, 3, 15, 30, tzinfo=UTC)
    return {
        "patient": {"given_name": "Alex"},
        "organization": {"name": "Example Clinic", "phone": "+1 555 0100"},
        "entry": {"kind": "appointment", "status": "booked", "summary": "Check-up",
                  "time": start, "end": start + timedelta(minutes=30)},
        "moment": start,
        "service": "Check-up",
        "location": "Main Street Clinic",
        "medication": "Metformin 500 mg",
        "activity": "Blood pressure check",
        "link": "https://careloop.hospital.example.org/p/t1234567.tpsd9w.O5Fm0-eRaFoKEJ_-",
    }
