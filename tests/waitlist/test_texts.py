"""What the waitlist tells patients, in English and Spanish."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from integration.outreach.pathways import Organization
from integration.waitlist.texts import (
    Outcome,
    clock_text,
    offer_message,
    outcome_text,
    taken_message,
    text_language,
    when_text,
)

ORG = Organization(name="Example Clinic", phone="+1 555 0100")
BARE = Organization(name="Example Clinic")
NY = ZoneInfo("America/New_York")
START = datetime(2026, 3, 5, 15, 0, tzinfo=UTC)
VALUES = {"service": "Check-up", "when": "Thursday", "location": "Main Street",
          "link": "https://c.example/p/o1.x.y", "until": "11:10 AM"}


class TestTexts:
    @pytest.mark.parametrize("language", ["en", "es"])
    @pytest.mark.parametrize("channel", ["sms", "email", "voice"])
    def test_offer_in_every_channel_and_language(self, channel: str, language: str) -> None:
        subject, body = offer_message(channel, language, ORG, **VALUES)
        assert "{" not in body and "  " not in body
        assert bool(subject) == (channel == "email")
        if channel != "voice":
            assert "https://c.example/p/o1.x.y" in body
            assert body.startswith("Example Clinic:")
        else:
            assert "+1 555 0100" in body

    @pytest.mark.parametrize("language", ["en", "es"])
    def test_missing_values_leave_sentences_out(self, language: str) -> None:
        """No service, no place, no phone: no empty "at ." or "call ." sentence."""
        _, body = offer_message("sms", language, BARE, service="", when="Thursday",
                                location="", link="https://c.example/p/o1", until="")
        assert "Check-up" not in body and ": ." not in body and "  " not in body
        _, voice = offer_message("voice", language, BARE, service="", when="Thursday",
                                 location="", link="", until="")
        assert "call ." not in voice and "llame al ." not in voice

    @pytest.mark.parametrize("language", ["en", "es"])
    def test_taken(self, language: str) -> None:
        subject, body = taken_message("email", language, ORG, service="Check-up",
                                      when="Thursday")
        assert subject and "Check-up" in body and "Thursday" in body
        assert taken_message("sms", language, ORG, service="", when="X")[0] == ""

    @pytest.mark.parametrize("language", ["en", "es"])
    @pytest.mark.parametrize("outcome", list(Outcome))
    def test_every_outcome(self, outcome: Outcome, language: str) -> None:
        text = outcome_text(outcome, language, when="Thursday")
        assert text and "{" not in text
        assert "{" not in outcome_text(outcome, language)

    def test_dates_in_the_patients_language_and_zone(self) -> None:
        assert when_text(START, "en", NY) == "Thursday, March 5, 2026, 10:00 AM"
        assert when_text(START, "es-MX", NY) == "jueves, 5 de marzo de 2026, 10:00"
        assert "\u202f" not in when_text(START, "en", NY)
        assert clock_text(START, "en", NY, today=START) == "10:00 AM"
        assert clock_text(START, "es", NY, today=datetime(2026, 3, 4, tzinfo=UTC)) == (
            "jueves, 5 de marzo de 2026, 10:00")

    def test_language_fallback(self) -> None:
        assert text_language("es-MX") == "es"
        assert text_language("fr", "es") == "es"
        assert text_language("", "de") == "en"
