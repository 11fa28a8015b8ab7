"""What a patient's reply means: SMS keywords (English and Spanish) and voice key presses.

Pure: text in, :class:`Reply` out. A message is matched whole, after trimming, case folding,
accent folding (``SÍ`` is ``SI``) and turning punctuation into spaces, so ``Stop.``,
`` stop `` and ``STOP!`` are STOP while ``stop texting me about the dog`` is not a keyword
(carriers and Twilio match the whole message the same way; a longer free text is kept for the
care team as the reply it is, never guessed at).

Opt-out and help follow CTIA (Messaging Principles and Best Practices; Short Code Monitoring
Handbook): STOP, STOPALL, UNSUBSCRIBE, END, QUIT, CANCEL, OPTOUT opt out, and Twilio also
honours REVOKE. Spanish programmes must answer ALTO and AYUDA (Twilio, "What are the
requirements for a Spanish-language short code?"); messaging platforms add PARAR, CANCELAR,
BAJA, and INICIO to opt back in, AUXILIO for help. START and UNSTOP opt back in.

Because CANCEL is an opt-out word, our messages ask for single letters for appointment actions:
``C`` confirm, ``R`` reschedule, ``X`` cancel (the templates say so in both languages). YES and
SÍ confirm too; a YES from a number that opted out is taken by the processor as an opt-in
(:data:`ALSO_OPT_IN`), as Twilio does.

Voice key presses (:func:`classify_digits`): 1 confirm, 2 cancel, 3 repeat.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "ALSO_OPT_IN",
    "KEYWORDS",
    "Intent",
    "Reply",
    "classify",
    "classify_digits",
    "normalise",
]


class Intent(StrEnum):
    OPT_OUT = "opt-out"
    OPT_IN = "opt-in"
    HELP = "help"
    CONFIRM = "confirm"
    CANCEL = "cancel"
    """Cancel the appointment (``X``, voice 2): never the word CANCEL, which opts out."""
    RESCHEDULE = "reschedule"
    REPEAT = "repeat"
    """Voice only: say the message again."""
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Reply:
    intent: Intent
    language: str
    """``en`` or ``es`` when the word belongs to a language, ``""`` when it does not tell
    (``C``, ``X``, ``1``, free text): then the touch's language is used to answer."""
    keyword: str = ""
    """The keyword as matched (folded, e.g. ``STOP``, ``SI``), ``""`` for free text."""


def _table() -> dict[str, tuple[Intent, str]]:
    words: dict[str, tuple[Intent, str]] = {}

    def add(intent: Intent, language: str, *entries: str) -> None:
        for entry in entries:
            words[entry] = (intent, language)

    # CTIA's opt-out words, Twilio's REVOKE, and the spellings people type.
    add(Intent.OPT_OUT, "en", "STOP", "STOPALL", "STOP ALL", "UNSUBSCRIBE", "END", "QUIT",
        "CANCEL", "OPTOUT", "OPT OUT", "REVOKE", "REMOVE")
    add(Intent.OPT_OUT, "es", "ALTO", "PARAR", "PARA", "DETENER", "CANCELAR", "BAJA",
        "DAR DE BAJA", "DARSE DE BAJA", "FIN", "NO MAS")
    add(Intent.OPT_IN, "en", "START", "UNSTOP", "SUBSCRIBE")
    add(Intent.OPT_IN, "es", "INICIO", "INICIAR", "COMENZAR", "REANUDAR")
    add(Intent.HELP, "en", "HELP", "INFO")
    add(Intent.HELP, "es", "AYUDA", "AUXILIO", "INFORMACION")
    add(Intent.CONFIRM, "", "C")
    add(Intent.CONFIRM, "en", "CONFIRM", "CONFIRMED", "YES")
    add(Intent.CONFIRM, "es", "CONFIRMAR", "CONFIRMO", "CONFIRMADO", "SI")
    add(Intent.CANCEL, "", "X")
    add(Intent.RESCHEDULE, "", "R")
    add(Intent.RESCHEDULE, "en", "RESCHEDULE")
    add(Intent.RESCHEDULE, "es", "REPROGRAMAR", "CAMBIAR", "CAMBIO")
    return words


KEYWORDS: dict[str, tuple[Intent, str]] = _table()
"""Folded keyword → (intent, language). Keys are upper case, without accents, single-spaced."""

ALSO_OPT_IN = frozenset({"YES", "SI"})
"""Confirm words that also opt a number back in when it had opted out (Twilio's YES)."""

_NOT_WORD = re.compile(r"[^0-9A-Z]+")


def normalise(text: str) -> str:
    """Upper case, accents folded (``sí`` → ``SI``), anything but letters and digits turned
    into single spaces, trimmed."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    folded = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _NOT_WORD.sub(" ", folded.upper()).strip()


def classify(text: str) -> Reply:
    """The meaning of a whole SMS reply (see the module docstring)."""
    word = normalise(text)
    if not word:
        return Reply(Intent.UNKNOWN, "")
    found = KEYWORDS.get(word) or KEYWORDS.get(word.replace(" ", ""))
    if found is None:
        return Reply(Intent.UNKNOWN, "")
    intent, language = found
    return Reply(intent, language, word if word in KEYWORDS else word.replace(" ", ""))


_DIGITS = {"1": Intent.CONFIRM, "2": Intent.CANCEL, "3": Intent.REPEAT}


def classify_digits(digits: str) -> Intent:
    """A key press from a call's ``<Gather>``: 1 confirm, 2 cancel, 3 repeat; anything else
    (nothing pressed, ``*``, another key) is UNKNOWN."""
    return _DIGITS.get(digits.strip(), Intent.UNKNOWN)
