"""What careloop answers a reply with, in English and Spanish, as SMS text or spoken in a call.

Each answer is a few sentences; a sentence that needs the organisation's phone or a link is
left out (or replaced by its alternative) when there is none, so an answer never says
"call ." Opt-out, opt-in and help answers follow CTIA's sample wording (the organisation's
name first, how to opt back in, where help is, "Msg & data rates may apply").
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from enum import StrEnum

from integration.outreach.pathways import Organization

__all__ = [
    "LANGUAGES",
    "Answer",
    "Sentence",
    "Spoken",
    "answer_language",
    "render_sentences",
    "sms_text",
    "voice_text",
]

LANGUAGES = ("en", "es")


class Answer(StrEnum):
    OPTED_OUT = "opted-out"
    OPTED_IN = "opted-in"
    HELP = "help"
    CONFIRMED = "confirmed"
    CANCEL_RECEIVED = "cancel-received"
    RESCHEDULE_RECEIVED = "reschedule-received"
    UNKNOWN_SENDER = "unknown-sender"
    AMBIGUOUS = "ambiguous"
    NOT_UNDERSTOOD = "not-understood"
    NOTHING_OPEN = "nothing-open"


class Spoken(StrEnum):
    CONFIRMED = "confirmed"
    CANCEL_RECEIVED = "cancel-received"
    OPTIONS = "options"
    NOTHING_OPEN = "nothing-open"
    TROUBLE = "trouble"


# A text is a sequence of sentences; a sentence is a string or a tuple of alternatives, the
# first whose placeholders all have a value being used.
Sentence = str | tuple[str, ...]
"""A sentence, or choices of one: the first whose ``{fields}`` all have values is used
(:func:`render_sentences`)."""

_SMS: Mapping[str, Mapping[Answer, Sequence[Sentence]]] = {
    "en": {
        Answer.OPTED_OUT: ("{org}: You are unsubscribed and will receive no more messages.",
                           "Reply START to resubscribe."),
        Answer.OPTED_IN: ("{org}: You are subscribed again to appointment and care reminders.",
                          "Reply HELP for help, STOP to opt out."),
        Answer.HELP: ("{org}: appointment and care reminders.", "Reply STOP to opt out.",
                      ("Help: {phone}.", "Help: {link}."), "Msg & data rates may apply."),
        Answer.CONFIRMED: ("{org}: Thank you, your appointment is confirmed.",),
        Answer.CANCEL_RECEIVED: (
            "{org}: We received your request to cancel this appointment; no more reminders "
            "will be sent for it.",
            ("Questions? Call {phone}.",)),
        Answer.RESCHEDULE_RECEIVED: (
            "{org}: We received your request to reschedule.",
            ("Choose a new time at {link} or call {phone}.", "Choose a new time at {link}.",
             "Please call {phone} to choose a new time.",
             "The care team will contact you to choose a new time.")),
        Answer.UNKNOWN_SENDER: (
            "{org}: We could not find a message we sent to this number.",
            ("For help, call {phone}.",), "Reply STOP to opt out."),
        Answer.AMBIGUOUS: (
            "{org}: This number gets messages for more than one person, so we cannot tell "
            "whose appointment you mean.",
            ("Please use the link in your message or call {phone}.",
             "Please use the link in your message.")),
        Answer.NOT_UNDERSTOOD: (
            "{org}: Sorry, we did not understand.",
            "Reply C to confirm, R to reschedule, X to cancel your appointment, HELP for help "
            "or STOP to opt out."),
        Answer.NOTHING_OPEN: (
            "{org}: There is no upcoming appointment to confirm or change from your messages.",
            ("For help, call {phone}.",)),
    },
    "es": {
        Answer.OPTED_OUT: ("{org}: Se ha dado de baja y no recibirá más mensajes.",
                           "Responda INICIO para volver a suscribirse."),
        Answer.OPTED_IN: ("{org}: Se ha vuelto a suscribir a los recordatorios de citas y "
                          "cuidados.", "Responda AYUDA para obtener ayuda, ALTO para darse "
                          "de baja."),
        Answer.HELP: ("{org}: recordatorios de citas y cuidados.",
                      "Responda ALTO para darse de baja.",
                      ("Ayuda: {phone}.", "Ayuda: {link}."),
                      "Pueden aplicarse tarifas de mensajes y datos."),
        Answer.CONFIRMED: ("{org}: Gracias, su cita está confirmada.",),
        Answer.CANCEL_RECEIVED: (
            "{org}: Recibimos su solicitud de cancelar esta cita; no enviaremos más "
            "recordatorios sobre ella.",
            ("¿Preguntas? Llame al {phone}.",)),
        Answer.RESCHEDULE_RECEIVED: (
            "{org}: Recibimos su solicitud para cambiar la cita.",
            ("Elija otra hora en {link} o llame al {phone}.", "Elija otra hora en {link}.",
             "Llame al {phone} para elegir otra hora.",
             "El equipo se pondrá en contacto con usted para elegir otra hora.")),
        Answer.UNKNOWN_SENDER: (
            "{org}: No encontramos ningún mensaje enviado a este número.",
            ("Para obtener ayuda, llame al {phone}.",), "Responda ALTO para darse de baja."),
        Answer.AMBIGUOUS: (
            "{org}: Este número recibe mensajes de más de una persona y no sabemos a qué cita "
            "se refiere.",
            ("Use el enlace de su mensaje o llame al {phone}.", "Use el enlace de su mensaje.")),
        Answer.NOT_UNDERSTOOD: (
            "{org}: No entendimos su respuesta.",
            "Responda C para confirmar, R para cambiar, X para cancelar su cita, AYUDA para "
            "obtener ayuda o ALTO para darse de baja."),
        Answer.NOTHING_OPEN: (
            "{org}: No hay ninguna cita próxima que confirmar o cambiar.",
            ("Para obtener ayuda, llame al {phone}.",)),
    },
}

_VOICE: Mapping[str, Mapping[Spoken, Sequence[Sentence]]] = {
    "en": {
        Spoken.CONFIRMED: ("Thank you. Your appointment is confirmed. Goodbye.",),
        Spoken.CANCEL_RECEIVED: (
            "Thank you. We received your request to cancel this appointment.",
            ("If you have questions, call {phone}.",), "Goodbye."),
        Spoken.OPTIONS: ("Press 1 to confirm, 2 to cancel, or 3 to hear the message again.",),
        Spoken.NOTHING_OPEN: ("There is no upcoming appointment to confirm or cancel.",
                              ("For help, call {phone}.",), "Goodbye."),
        Spoken.TROUBLE: ("Sorry, we could not take your answer right now.",
                         ("Please call {phone}.",), "Goodbye."),
    },
    "es": {
        Spoken.CONFIRMED: ("Gracias. Su cita está confirmada. Adiós.",),
        Spoken.CANCEL_RECEIVED: (
            "Gracias. Recibimos su solicitud de cancelar esta cita.",
            ("Si tiene preguntas, llame al {phone}.",), "Adiós."),
        Spoken.OPTIONS: ("Pulse 1 para confirmar, 2 para cancelar o 3 para volver a escuchar "
                         "el mensaje.",),
        Spoken.NOTHING_OPEN: ("No hay ninguna cita próxima que confirmar o cancelar.",
                              ("Para obtener ayuda, llame al {phone}.",), "Adiós."),
        Spoken.TROUBLE: ("Lo sentimos, no pudimos registrar su respuesta ahora.",
                         ("Llame al {phone}.",), "Adiós."),
    },
}

_FORMATTER = string.Formatter()


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in _FORMATTER.parse(template) if name}


def render_sentences(sentences: Sequence[Sentence], values: Mapping[str, str]) -> str:
    """The sentences joined, each the first choice whose fields all have values (a sentence
    whose fields are all missing is left out)."""
    out: list[str] = []
    for sentence in sentences:
        choices = (sentence,) if isinstance(sentence, str) else sentence
        for choice in choices:
            if all(values.get(name) for name in _fields(choice)):
                out.append(choice.format(**values))
                break
    return " ".join(out)


def answer_language(language: str, default: str = "en") -> str:
    """The answer language for a BCP 47 tag: ``es-MX`` → ``es``; one we have no texts in →
    ``default`` if we have it, else English."""
    base = language.strip().replace("_", "-").split("-")[0].lower()
    if base in LANGUAGES:
        return base
    fallback = default.strip().split("-")[0].lower()
    return fallback if fallback in LANGUAGES else "en"


def _values(organization: Organization, link: str) -> dict[str, str]:
    return {"org": organization.name, "phone": organization.phone,
            "link": link or organization.link}


def sms_text(answer: Answer, language: str, organization: Organization, *,
             link: str = "") -> str:
    """The SMS answer ``answer`` in ``language`` (``en`` or ``es``; others read as English).
    ``link``: where the patient can act (the portal page of the touch), else the
    organisation's own link."""
    texts = _SMS.get(answer_language(language)) or _SMS["en"]
    return render_sentences(texts[answer], _values(organization, link))


def voice_text(spoken: Spoken, language: str, organization: Organization) -> str:
    """What a call says back after a key press."""
    texts = _VOICE.get(answer_language(language)) or _VOICE["en"]
    return render_sentences(texts[spoken], _values(organization, ""))
