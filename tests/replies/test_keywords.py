"""SMS keywords and voice key presses (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.replies.keywords import (
    KEYWORDS,
    Intent,
    Reply,
    classify,
    classify_digits,
    normalise,
)

CTIA_OPT_OUT = ["STOP", "STOPALL", "UNSUBSCRIBE", "END", "QUIT", "CANCEL", "OPTOUT"]


class TestOptOut:
    @pytest.mark.parametrize("word", [*CTIA_OPT_OUT, "OPT OUT", "OPT-OUT", "REVOKE", "STOP ALL"])
    def test_every_ctia_word_opts_out(self, word: str) -> None:
        """CTIA's opt-out words (and Twilio's REVOKE) opt out, in English."""
        reply = classify(word)
        assert (reply.intent, reply.language) == (Intent.OPT_OUT, "en")
        assert reply.keyword in KEYWORDS

    @pytest.mark.parametrize("word", ["ALTO", "PARAR", "DETENER", "CANCELAR", "BAJA", "FIN",
                                      "Dar de baja", "no más"])
    def test_spanish_forms_opt_out_in_spanish(self, word: str) -> None:
        reply = classify(word)
        assert (reply.intent, reply.language) == (Intent.OPT_OUT, "es")

    @pytest.mark.parametrize("text", ["Stop.", " stop ", "STOP!", "stop\n", "'Stop'", "¡Alto!",
                                      "sToP", "Unsubscribe...", "opt_out"])
    def test_punctuation_case_and_spaces_do_not_matter(self, text: str) -> None:
        """Carriers also take "Stop." as STOP: the whole message, folded."""
        assert classify(text).intent is Intent.OPT_OUT

    @pytest.mark.parametrize("text", ["stop texting me about the dog", "please stop it",
                                      "don't stop", "STOP STOP", "stopped"])
    def test_longer_free_text_is_not_a_keyword(self, text: str) -> None:
        assert classify(text).intent is Intent.UNKNOWN


class TestAppointmentWords:
    def test_x_cancels_the_appointment_but_cancel_opts_out(self) -> None:
        """CANCEL is a CTIA opt-out word, so the appointment is cancelled with X."""
        assert classify("X").intent is Intent.CANCEL
        assert classify("x").intent is Intent.CANCEL
        assert classify("CANCEL").intent is Intent.OPT_OUT
        assert classify("Cancelar").intent is Intent.OPT_OUT

    @pytest.mark.parametrize(("text", "intent", "language"), [
        ("C", Intent.CONFIRM, ""), ("c.", Intent.CONFIRM, ""), ("Confirm", Intent.CONFIRM, "en"),
        ("YES", Intent.CONFIRM, "en"), ("Sí", Intent.CONFIRM, "es"), ("si", Intent.CONFIRM, "es"),
        ("CONFIRMAR", Intent.CONFIRM, "es"), ("confirmo", Intent.CONFIRM, "es"),
        ("R", Intent.RESCHEDULE, ""), ("Reschedule", Intent.RESCHEDULE, "en"),
        ("REPROGRAMAR", Intent.RESCHEDULE, "es"), ("cambiar", Intent.RESCHEDULE, "es"),
        ("X", Intent.CANCEL, ""),
    ])
    def test_actions(self, text: str, intent: Intent, language: str) -> None:
        reply = classify(text)
        assert (reply.intent, reply.language) == (intent, language)

    def test_single_letters_do_not_name_a_language(self) -> None:
        """C, R and X are the same in both languages: the touch's language answers."""
        assert {classify(w).language for w in "CRX"} == {""}


class TestOptInAndHelp:
    @pytest.mark.parametrize(("text", "language"), [
        ("START", "en"), ("Unstop", "en"), ("INICIO", "es"), ("comenzar", "es")])
    def test_opt_in(self, text: str, language: str) -> None:
        assert classify(text) == Reply(Intent.OPT_IN, language, normalise(text))

    @pytest.mark.parametrize(("text", "language"), [
        ("HELP", "en"), ("info", "en"), ("Ayuda", "es"), ("AUXILIO", "es"), ("help?", "en")])
    def test_help(self, text: str, language: str) -> None:
        assert (classify(text).intent, classify(text).language) == (Intent.HELP, language)

    def test_yes_carries_its_keyword(self) -> None:
        """YES confirms; the processor turns it into an opt-in for an opted-out number."""
        assert classify("yes!").keyword == "YES"
        assert classify("SÍ").keyword == "SI"


class TestFolding:
    def test_accents_fold(self) -> None:
        assert normalise("  Sí, ¡confírmo!  ") == "SI CONFIRMO"

    @pytest.mark.parametrize("text", ["", "   ", "...", "👍", "?"])
    def test_empty_or_symbols_are_unknown(self, text: str) -> None:
        assert classify(text) == Reply(Intent.UNKNOWN, "")

    @given(st.text(max_size=40))
    def test_classify_never_raises(self, text: str) -> None:
        assert isinstance(classify(text).intent, Intent)

    def test_keys_are_already_folded(self) -> None:
        """Every table key is its own normal form (no entry is unreachable)."""
        assert all(normalise(k) == k for k in KEYWORDS)


class TestDigits:
    @pytest.mark.parametrize(("digits", "intent"), [
        ("1", Intent.CONFIRM), ("2", Intent.CANCEL), ("3", Intent.REPEAT), (" 1 ", Intent.CONFIRM),
        ("", Intent.UNKNOWN), ("4", Intent.UNKNOWN), ("*", Intent.UNKNOWN), ("#", Intent.UNKNOWN),
        ("12", Intent.UNKNOWN)])
    def test_key_presses(self, digits: str, intent: Intent) -> None:
        assert classify_digits(digits) is intent
