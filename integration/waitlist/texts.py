"""What the waitlist tells patients, in English and Spanish: the offer of a freed slot (SMS,
email, voice), "it was taken", and the answer the patient page shows after an accept or a
decline.

Like :mod:`integration.replies.texts`, a text is a sequence of sentences and a sentence may be
a tuple of alternatives: the first whose placeholders all have a value is used, so a message
never says "call ." or "at ." when the organisation has no phone or the slot no place. Dates
and times are written with Babel in the patient's language and time zone, as the outreach
templates do ("jueves, 5 de marzo de 2026, 10:00").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, tzinfo
from enum import StrEnum

from babel.core import Locale
from babel.dates import format_date, format_time

from integration.outreach.pathways import Organization
from integration.replies.texts import Sentence, answer_language, render_sentences

__all__ = [
    "LANGUAGES",
    "Outcome",
    "clock_text",
    "offer_message",
    "outcome_text",
    "taken_message",
    "text_language",
    "when_text",
]

LANGUAGES = ("en", "es")


class Outcome(StrEnum):
    """What the page says after the patient answered an offer."""

    BOOKED = "booked"
    REQUESTED = "requested"
    TAKEN = "taken"
    EXPIRED = "expired"
    INVALID = "invalid"
    DECLINED = "declined"



_OFFER: Mapping[str, Sequence[Sentence]] = {
    "en": (
        ("{org}: An earlier {service} appointment is free on {when}.",
         "{org}: An earlier appointment is free on {when}.",
         "An earlier {service} appointment is free on {when}.",
         "An earlier appointment is free on {when}."),
        ("Place: {location}.",),
        "The first to accept gets it.",
        ("Accept here: {link}",),
        ("The offer is open until {until}.",),
    ),
    "es": (
        ("{org}: Hay una cita de {service} antes, el {when}.",
         "{org}: Hay una cita antes, el {when}.",
         "Hay una cita de {service} antes, el {when}.",
         "Hay una cita antes, el {when}."),
        ("Lugar: {location}.",),
        "Se la queda la primera persona que acepte.",
        ("Acéptela aquí: {link}",),
        ("La oferta es válida hasta: {until}.",),
    ),
}

_OFFER_SUBJECT = {"en": "An earlier appointment is available",
                  "es": "Hay una cita disponible antes"}

_OFFER_EMAIL_END: Mapping[str, Sequence[Sentence]] = {
    "en": ("If you do not want it, there is nothing to do: you keep your appointment and stay "
           "on the waitlist.", ("Questions? Call {phone}.",)),
    "es": ("Si no la quiere, no tiene que hacer nada: conserva su cita y sigue en la lista de "
           "espera.", ("¿Preguntas? Llame al {phone}.",)),
}

_OFFER_VOICE: Mapping[str, Sequence[Sentence]] = {
    "en": (
        ("This is {org}.",),
        ("An earlier {service} appointment is available on {when}.",
         "An earlier appointment is available on {when}."),
        ("The place is {location}.",),
        "The first person to accept gets it.",
        ("To take it, please call {phone}.",
         "To take it, please contact the care team."),
        "Goodbye.",
    ),
    "es": (
        ("Le llama {org}.",),
        ("Hay una cita de {service} disponible antes, el {when}.",
         "Hay una cita disponible antes, el {when}."),
        ("El lugar es {location}.",),
        "Se la queda la primera persona que acepte.",
        ("Para aceptarla, llame al {phone}.",
         "Para aceptarla, póngase en contacto con el equipo."),
        "Adiós.",
    ),
}

_TAKEN: Mapping[str, Sequence[Sentence]] = {
    "en": (
        ("{org}: The {service} appointment on {when} that we offered you has been taken.",
         "{org}: The appointment on {when} that we offered you has been taken.",
         "The {service} appointment on {when} that we offered you has been taken.",
         "The appointment on {when} that we offered you has been taken."),
        "You keep your appointment and stay on the waitlist for an earlier one.",
    ),
    "es": (
        ("{org}: La cita de {service} del {when} que le ofrecimos ya está ocupada.",
         "{org}: La cita del {when} que le ofrecimos ya está ocupada.",
         "La cita de {service} del {when} que le ofrecimos ya está ocupada.",
         "La cita del {when} que le ofrecimos ya está ocupada."),
        "Conserva su cita y sigue en la lista de espera para una cita antes.",
    ),
}

_TAKEN_SUBJECT = {"en": "The appointment we offered has been taken",
                  "es": "La cita que le ofrecimos ya está ocupada"}

_OUTCOME: Mapping[str, Mapping[Outcome, Sequence[Sentence]]] = {
    "en": {
        Outcome.BOOKED: (("Your appointment is booked for {when}.",
                          "Your appointment is booked."),),
        Outcome.REQUESTED: (("Thank you. We asked the care team to move your appointment to "
                             "{when}; they will confirm it with you.",
                             "Thank you. We asked the care team to move your appointment; "
                             "they will confirm it with you."),),
        Outcome.TAKEN: ("Sorry, someone else took this appointment first.",
                        "You keep your appointment and stay on the waitlist."),
        Outcome.EXPIRED: ("This offer has expired.",
                          "You keep your appointment and stay on the waitlist."),
        Outcome.INVALID: ("This offer is no longer valid.",),
        Outcome.DECLINED: ("You turned this appointment down.",
                           "You keep your appointment and stay on the waitlist."),
    },
    "es": {
        Outcome.BOOKED: (("Su cita está reservada para el {when}.",
                          "Su cita está reservada."),),
        Outcome.REQUESTED: (("Gracias. Pedimos al equipo que cambie su cita al {when}; se lo "
                             "confirmarán.",
                             "Gracias. Pedimos al equipo que cambie su cita; se lo "
                             "confirmarán."),),
        Outcome.TAKEN: ("Lo sentimos, otra persona aceptó esta cita antes.",
                        "Conserva su cita y sigue en la lista de espera."),
        Outcome.EXPIRED: ("Esta oferta ha caducado.",
                          "Conserva su cita y sigue en la lista de espera."),
        Outcome.INVALID: ("Esta oferta ya no es válida.",),
        Outcome.DECLINED: ("Ha rechazado esta cita.",
                           "Conserva su cita y sigue en la lista de espera."),
    },
}

def text_language(language: str, default: str = "en") -> str:
    """``en`` or ``es`` for a BCP 47 tag (``es-MX`` → ``es``), else ``default`` / English."""
    return answer_language(language, default)


def _locale(language: str) -> Locale:
    return Locale.parse(text_language(language))


def _plain(text: str) -> str:
    # CLDR puts a narrow no-break space before AM/PM; one such character turns a whole SMS
    # into UCS-2 (70 characters a segment instead of 160).
    return text.replace("\u202f", " ").replace("\u00a0", " ")


def when_text(moment: datetime, language: str, tz: tzinfo) -> str:
    """Day and time in the patient's language and zone: "Thursday, March 5, 2026, 10:00 AM"."""
    locale = _locale(language)
    day = format_date(moment.astimezone(tz), "full", locale=locale)
    return _plain(f"{day}, {format_time(moment, 'short', tzinfo=tz, locale=locale)}")


def clock_text(moment: datetime, language: str, tz: tzinfo, *,
               today: datetime | None = None) -> str:
    """The time alone when ``moment`` is on the same local day as ``today``, else day and
    time (how long an offer stands)."""
    if today is not None and today.astimezone(tz).date() == moment.astimezone(tz).date():
        return _plain(format_time(moment, "short", tzinfo=tz, locale=_locale(language)))
    return when_text(moment, language, tz)


def _values(organization: Organization, **values: str) -> dict[str, str]:
    return {"org": organization.name, "phone": organization.phone, **values}


def offer_message(
    channel: str,
    language: str,
    organization: Organization,
    *,
    service: str,
    when: str,
    location: str,
    link: str,
    until: str,
) -> tuple[str, str]:
    """``(subject, body)`` of an offer on ``channel`` (``subject`` empty but for email)."""
    lang = text_language(language)
    values = _values(organization, service=service, when=when, location=location, link=link,
                     until=until)
    if channel == "voice":
        return "", render_sentences(_OFFER_VOICE[lang], values)
    body = render_sentences(_OFFER[lang], values)
    if channel == "email":
        return _OFFER_SUBJECT[lang], f"{body} {render_sentences(_OFFER_EMAIL_END[lang], values)}"
    return "", body


def taken_message(channel: str, language: str, organization: Organization, *, service: str,
                  when: str) -> tuple[str, str]:
    """``(subject, body)`` telling a patient the slot offered to them was taken."""
    lang = text_language(language)
    body = render_sentences(_TAKEN[lang], _values(organization, service=service, when=when))
    return (_TAKEN_SUBJECT[lang] if channel == "email" else ""), body


def outcome_text(outcome: Outcome | str, language: str, *, when: str = "") -> str:
    """What the patient page says after an accept (or a decline)."""
    lang = text_language(language)
    return render_sentences(_OUTCOME[lang][Outcome(outcome)], {"when": when})
