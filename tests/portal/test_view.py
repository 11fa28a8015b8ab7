"""The page's pure parts: status in words, language choice, form checks, Accept-Language."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from integration.portal.i18n import language_name, negotiate, normalize
from integration.portal.page import _Invalid, validate
from integration.portal.view import appointment_status, form_version, page_language
from integration.replies.effects import CONFIRMED_TAG

V2 = {"meta": {"source": "urn:careloop:hl7v2:EPIC:MAIN#C1"},
      "participant": [{"actor": {"reference": "Patient/p"}, "status": "accepted"}]}
FHIR_NEEDS = {"participant": [{"actor": {"reference": "Patient/p"}, "status": "needs-action"}]}
FHIR_ACCEPTED = {"participant": [{"actor": {"reference": "Patient/p"}, "status": "accepted"}]}
TAGGED = {**V2, "meta": {**V2["meta"], "tag": [CONFIRMED_TAG]}}
AT = "2030-03-12T18:00:00+00:00"


class TestAppointmentStatus:
    @pytest.mark.parametrize(("status", "resource", "requests", "expected"), [
        ("booked", V2, [], "booked"),  # v2 says accepted from the start: not a confirmation
        ("booked", FHIR_NEEDS, [], "booked"),
        ("booked", FHIR_ACCEPTED, [], "confirmed"),
        ("booked", TAGGED, [("confirm", None)], "confirmed"),
        ("booked", V2, [("confirm", None)], "booked"),  # the EHR replaced the confirmed one
        ("booked", TAGGED, [("confirm", None), ("cancel", None)], "cancel-requested"),
        ("booked", TAGGED, [("cancel", None), ("confirm", None)], "confirmed"),
        ("booked", V2, [("reschedule", {"entry_time": AT})], "reschedule-requested"),
        ("booked", V2, [("reschedule", {"entry_time": "2030-03-01T10:00:00+00:00"})],
         "booked"),  # moved since: the request was answered
        ("booked", V2, [("survey", {"score": 3})], "booked"),
        ("cancelled", TAGGED, [("confirm", None)], "cancelled"),
        ("entered-in-error", V2, [], "cancelled"),
        ("fulfilled", V2, [("cancel", None)], "completed"),
        ("noshow", V2, [], "missed"),
        ("arrived", V2, [], "checked-in"),
        ("proposed", FHIR_NEEDS, [], "pending"),
    ])
    def test_status(self, status: str, resource: dict[str, Any],
                    requests: list[tuple[str, Any]], expected: str) -> None:
        assert appointment_status(status, resource, requests, AT) == expected


class TestLanguage:
    def test_order(self) -> None:
        assert page_language(None, "es", "en", "en") == "es"
        assert page_language(None, "es-MX", None, "en") == "es"
        assert page_language(None, "fr", "es", "en") == "es"  # no French page: the patient's
        assert page_language(None, "", "", "es") == "es"
        assert page_language("en", "es", "es", "es") == "en"
        assert page_language("zz", "es", None, "en") == "es"
        assert page_language(None, None, None, "fr") == "en"

    def test_negotiate(self) -> None:
        assert negotiate("es-MX,es;q=0.9,en;q=0.8", ("en", "es")) == "es"
        assert negotiate("fr;q=1, en;q=0.5, es;q=0.7", ("en", "es")) == "es"
        assert negotiate("es;q=0", ("en", "es")) is None
        assert negotiate("", ("en", "es")) is None
        assert negotiate("en;q=abc, es", ("en", "es")) == "es"

    def test_names(self) -> None:
        assert language_name("es") == "Español"
        assert language_name("en") == "English"
        assert normalize("ES_mx") == "es"


class TestValidate:
    LANGS = ("en", "es")

    def test_survey(self) -> None:
        assert validate("survey", {"score": ["0"]}, self.LANGS) == {"score": 0, "comment": ""}
        assert validate("survey", {"score": ["10"], "comment": [" ok\x00\r\n "]},
                        self.LANGS) == {"score": 10, "comment": "ok"}
        for bad in ("11", "-1", "", "x", "²", " 5 5"):
            with pytest.raises(_Invalid):
                validate("survey", {"score": [bad]}, self.LANGS)
        with pytest.raises(_Invalid):
            validate("survey", {}, self.LANGS)
        assert validate("survey", {"score": ["3"], "comment": ["é" * 1000]},
                        self.LANGS)["score"] == 3

    def test_preferences(self) -> None:
        assert validate("preferences", {}, self.LANGS) == {
            "channel": None, "language": None, "opted_out": []}
        got = validate("preferences", {"channel": ["sms"], "language": ["es"],
                                       "opted_out": ["voice", "email", "voice"]}, self.LANGS)
        assert got == {"channel": "sms", "language": "es", "opted_out": ["email", "voice"]}
        for bad in ({"channel": ["fax"]}, {"language": ["de"]}, {"opted_out": ["x"]},
                    {"channel": ["email"], "opted_out": ["email"]}):
            with pytest.raises(_Invalid):
                validate("preferences", bad, self.LANGS)

    def test_reschedule(self) -> None:
        assert validate("reschedule", {}, self.LANGS) == {"preferred": ""}
        assert validate("reschedule", {"preferred": ["a" * 500]}, self.LANGS)
        with pytest.raises(_Invalid):
            validate("reschedule", {"preferred": ["a" * 501]}, self.LANGS)


def test_form_version_changes_with_state() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    assert form_version(None, None) == form_version(0, None)
    assert form_version(1, None) != form_version(2, None)
    assert form_version(1, at) != form_version(1, None)
    assert form_version(1, at.replace(tzinfo=None)) == form_version(1, at)  # SQLite: naive UTC
