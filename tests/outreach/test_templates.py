"""Templates, Babel dates, SMS length."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from integration.outreach.pathways import Pathway
from integration.outreach.sms import sms_length
from integration.outreach.templates import TemplateCatalog, TemplateProblem, sample_values

MADRID = ZoneInfo("Europe/Madrid")


class TestBuiltinTemplates:
    def test_spanish_dates_in_the_patients_zone(self) -> None:
        """15:30 UTC on 3 March 2026 is 16:30 in Madrid, written the Spanish way."""
        r = TemplateCatalog().render("appointment-reminder", "email", "es", MADRID,
                                     sample_values())
        assert "martes, 3 de marzo de 2026, 16:30" in r.parts["text"]
        assert r.parts["subject"] == "Su cita del 3 de marzo de 2026"

    def test_language_falls_back_to_default(self) -> None:
        r = TemplateCatalog().render("survey", "sms", "fr", MADRID, sample_values())
        assert r.language == "en" and r.body.startswith("Example Clinic: how was")

    def test_every_builtin_renders_on_every_channel(self) -> None:
        pathways = [
            Pathway.model_validate({"name": name, "on": "appointment",
                                    "steps": [{"at": "-P1D", "template": name}]})
            for name in ("appointment-reminder", "appointment-reminder-short",
                         "visit-followup", "refill-reminder", "careplan-step", "survey")
        ]
        TemplateCatalog().check(pathways, ["en", "es"])


class TestCheckAtStart:
    def test_missing_template_named(self, tmp_path: Path) -> None:
        pathway = Pathway.model_validate({"name": "p", "on": "appointment",
                                          "steps": [{"at": "-P1D", "template": "nope"}]})
        with pytest.raises(TemplateProblem, match="nope"):
            TemplateCatalog(tmp_path).check([pathway], ["en"])

    def test_syntax_error_names_file_and_line(self, tmp_path: Path) -> None:
        (tmp_path / "t.en.j2").write_text("{% block sms %}\nHello {{ patient.given_name \n"
                                          "{% endblock %}")
        pathway = Pathway.model_validate({"name": "p", "on": "appointment",
                                          "steps": [{"at": "-P1D", "channel": "sms",
                                                     "template": "t"}]})
        with pytest.raises(TemplateProblem, match=r"t\.en\.j2:\d+: "):
            TemplateCatalog(tmp_path).check([pathway], ["en"])

    def test_unknown_variable_caught(self, tmp_path: Path) -> None:
        (tmp_path / "t.en.j2").write_text("{% block sms %}{{ patient.surname }}{% endblock %}")
        pathway = Pathway.model_validate({"name": "p", "on": "appointment",
                                          "steps": [{"at": "-P1D", "channel": "sms",
                                                     "template": "t"}]})
        with pytest.raises(TemplateProblem, match="surname"):
            TemplateCatalog(tmp_path).check([pathway], ["en"])

    def test_sms_too_long(self, tmp_path: Path) -> None:
        (tmp_path / "t.en.j2").write_text("{% block sms %}" + "ü—" * 120 + "{% endblock %}")
        with pytest.raises(TemplateProblem, match="segments"):
            TemplateCatalog(tmp_path, max_sms_segments=3).render(
                "t", "sms", "en", MADRID, sample_values())


class TestSmsLength:
    @pytest.mark.parametrize(("text", "encoding", "segments"), [
        ("a" * 160, "GSM-7", 1), ("a" * 161, "GSM-7", 2), ("{" * 80, "GSM-7", 1),
        ("{" * 81, "GSM-7", 2), ("ñ" * 160, "GSM-7", 1), ("ç" * 70, "UCS-2", 1),
        ("ç" * 71, "UCS-2", 2), ("😀" * 35, "UCS-2", 1), ("", "GSM-7", 0),
    ])
    def test_segments(self, text: str, encoding: str, segments: int) -> None:
        length = sms_length(text)
        assert (length.encoding, length.segments) == (encoding, segments)


def test_times_in_sms_stay_in_gsm7() -> None:
    """Babel writes "3:00\u202fPM"; that one character would make the SMS UCS-2."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from integration.outreach.sms import sms_length
    from integration.outreach.templates import TemplateCatalog, sample_values

    catalog = TemplateCatalog()
    values = sample_values()
    values["moment"] = datetime(2026, 3, 10, 19, 0, tzinfo=UTC)
    rendered = catalog.render("appointment-reminder-short", "sms", "en",
                              ZoneInfo("America/New_York"), values)
    assert "3:00 PM" in rendered.body, rendered.body  # EDT from 8 March
    assert sms_length(rendered.body).encoding == "GSM-7"
