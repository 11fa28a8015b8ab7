"""Answer texts in English and Spanish."""

from __future__ import annotations

import pytest

from integration.outreach.pathways import Organization
from integration.replies.texts import Answer, Spoken, answer_language, sms_text, voice_text

ORG = Organization(name="Example Clinic", phone="+1 555 0100", link="https://portal.example")
BARE = Organization(name="Example Clinic")


class TestTexts:
    @pytest.mark.parametrize("language", ["en", "es"])
    @pytest.mark.parametrize("answer", list(Answer))
    def test_every_answer_in_both_languages(self, answer: Answer, language: str) -> None:
        text = sms_text(answer, language, ORG)
        assert text.startswith("Example Clinic:")
        assert "{" not in text and "  " not in text
        assert sms_text(answer, language, BARE).startswith("Example Clinic:")

    @pytest.mark.parametrize("language", ["en", "es"])
    def test_no_phone_no_empty_sentence(self, language: str) -> None:
        """Without a phone or link the sentence that needs them is left out."""
        for answer in Answer:
            text = sms_text(answer, language, BARE)
            assert "llame al ." not in text and "call ." not in text and "Help: ." not in text

    def test_ctia_wording(self) -> None:
        assert sms_text(Answer.OPTED_OUT, "en", ORG) == (
            "Example Clinic: You are unsubscribed and will receive no more messages. "
            "Reply START to resubscribe.")
        assert sms_text(Answer.HELP, "en", ORG) == (
            "Example Clinic: appointment and care reminders. Reply STOP to opt out. "
            "Help: +1 555 0100. Msg & data rates may apply.")

    def test_reschedule_mentions_link_and_phone(self) -> None:
        text = sms_text(Answer.RESCHEDULE_RECEIVED, "es", ORG, link="https://c.example/p/t1")
        assert "https://c.example/p/t1" in text and "+1 555 0100" in text
        assert "portal.example" in sms_text(Answer.RESCHEDULE_RECEIVED, "en", ORG)

    def test_not_understood_lists_the_words(self) -> None:
        text = sms_text(Answer.NOT_UNDERSTOOD, "en", ORG)
        for word in ("C ", "R ", "X ", "HELP", "STOP"):
            assert word in text
        assert "ALTO" in sms_text(Answer.NOT_UNDERSTOOD, "es", ORG)

    @pytest.mark.parametrize("spoken", list(Spoken))
    def test_voice(self, spoken: Spoken) -> None:
        assert voice_text(spoken, "es-MX", ORG) != voice_text(spoken, "en", ORG)

    @pytest.mark.parametrize(("tag", "default", "expected"), [
        ("es-MX", "en", "es"), ("ES", "en", "es"), ("fr", "en", "en"), ("fr", "es", "es"),
        ("", "de", "en"), ("en_US", "es", "en")])
    def test_answer_language(self, tag: str, default: str, expected: str) -> None:
        assert answer_language(tag, default) == expected
