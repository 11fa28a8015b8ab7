"""The outcome report's figures on a seeded history (tests/outcomes/history.py), on SQLite and
PostgreSQL: every count and rate checked against the figures computed by hand."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, literal, select

from integration.outcomes import OutcomeReport, outcome_report, scrub_reason
from integration.outcomes.report import REASON_LENGTH, _reason_sql
from integration.outreach.pathways import Pathway
from tests.outcomes import history as h


def _pathways() -> list[Pathway]:
    return [Pathway.model_validate(p) for p in h.PATHWAYS]


def _report(engine: Engine, since: datetime = h.SINCE, until: datetime = h.UNTIL,
            pathways: list[Pathway] | None = None) -> OutcomeReport:
    with engine.connect() as conn:
        return outcome_report(conn, since=since, until=until,
                              pathways=_pathways() if pathways is None else pathways)


@pytest.fixture
def seeded(engine: Engine) -> Engine:
    h.seed(engine)
    return engine


def _by_step(report: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(s["pathway"], s["step"]): s for s in report["steps"]}


class TestFigures:
    def test_each_step(self, seeded: Engine) -> None:
        got = _by_step(_report(seeded).to_json())
        want = _by_step({"steps": h.EXPECTED_STEPS})
        assert list(got) == list(want)
        for step, figures in want.items():
            assert got[step] == figures, step

    def test_appointment_reminder_step_0_in_words(self, seeded: Engine) -> None:
        """The same figures, spelled out for the busiest step."""
        s = _by_step(_report(seeded).to_json())[h.AR, 0]
        assert (s["touches"], s["sent"], s["delivered"], s["failed"], s["attempted"]) == (
            11, 6, 5, 2, 7)
        assert (s["skipped"], s["held"], s["pending"]) == (2, 1, 1)
        assert (s["replies"], s["replied"]) == (5, 4)
        assert (s["confirmations"], s["cancellations"], s["reschedules"]) == (1, 1, 1)
        assert s["rebookings"] == {"portal": 1, "waitlist": 0, "total": 1}
        assert s["opt_outs"] == 1
        assert s["rates"]["delivery"] == {"numerator": 5, "denominator": 6, "value": 0.8333}
        assert s["rates"]["failure"] == {"numerator": 2, "denominator": 7, "value": 0.2857}
        assert s["rates"]["reply"] == {"numerator": 4, "denominator": 6, "value": 0.6667}
        assert s["reasons"][0] == {"status": "skipped",
                                   "reason": "its time … had passed when planned", "count": 2}

    def test_survey(self, seeded: Engine) -> None:
        """One answer per touch (the latest: 10, not 9, for T30); the answer to a touch of
        May is left out. Mean (10+6+8+9)/4; NPS (2 promoters - 1 detractor) / 4."""
        s = _by_step(_report(seeded).to_json())[h.SV, 0]
        assert s["survey"] == h.SURVEY
        assert s["survey"]["mean_score"] == 8.25
        assert s["survey"]["nps"] == 25.0
        assert _by_step(_report(seeded).to_json())[h.AR, 0]["survey"] is None

    def test_totals(self, seeded: Engine) -> None:
        assert _report(seeded).to_json()["totals"] == h.EXPECTED_TOTALS

    def test_appointments(self, seeded: Engine) -> None:
        a = _report(seeded).to_json()["appointments"]
        assert a == h.EXPECTED_APPOINTMENTS
        assert a["reminded"]["noshow_rate"] == {"numerator": 1, "denominator": 4,
                                                "value": 0.25}
        assert a["not_reminded"]["noshow_rate"] == {"numerator": 1, "denominator": 2,
                                                    "value": 0.5}

    def test_appointments_without_pathways(self, seeded: Engine) -> None:
        """Without the configuration, a touch sent before the start counts as a reminder:
        the survey sent after A5 does not, so the figures are the same here."""
        report = _report(seeded, pathways=[]).to_json()
        a = report["appointments"]
        assert a["reminded"] == h.EXPECTED_APPOINTMENTS["reminded"]
        assert a["not_reminded"] == h.EXPECTED_APPOINTMENTS["not_reminded"]
        assert a["by_pathway"] == h.EXPECTED_APPOINTMENTS["by_pathway"]
        assert a["reminder_pathways"] == []
        assert "before its start" in a["reminded_means"]
        assert {s["trigger"] for s in report["steps"]} == {None}
        assert len(report["steps"]) == 4

    def test_waitlist(self, seeded: Engine) -> None:
        w = _report(seeded).to_json()["waitlist"]
        assert w == h.EXPECTED_WAITLIST

    def test_bookings(self, seeded: Engine) -> None:
        assert _report(seeded).to_json()["bookings"] == h.EXPECTED_BOOKINGS

    def test_the_whole_report(self, seeded: Engine) -> None:
        assert _report(seeded).to_json() == h.expected_json()


class TestPeriod:
    def test_bounds_in_another_zone_or_naive_are_the_same_instants(
        self, seeded: Engine
    ) -> None:
        plus2 = timezone(timedelta(hours=2))
        shifted = _report(seeded, h.SINCE.astimezone(plus2), h.UNTIL.astimezone(plus2))
        naive = _report(seeded, h.SINCE.replace(tzinfo=None), h.UNTIL.replace(tzinfo=None))
        assert shifted.to_json() == naive.to_json() == h.expected_json()

    def test_two_days(self, seeded: Engine) -> None:
        """[10 June, 12 June): the bounds include the start and exclude the end (slot 2 freed
        at 12 June 00:00 is out); what patients did is counted with the touch it answered."""
        report = _report(seeded, datetime(2024, 6, 10, tzinfo=UTC),
                         datetime(2024, 6, 12, tzinfo=UTC)).to_json()
        steps = _by_step(report)
        assert steps[h.AR, 0]["touches"] == 0
        ar1 = steps[h.AR, 1]
        assert (ar1["touches"], ar1["sent"], ar1["replies"], ar1["confirmations"]) == (
            1, 1, 1, 1)
        assert ar1["rebookings"]["waitlist"] == 1
        assert ar1["opt_outs"] == 1
        survey = steps[h.SV, 0]
        assert (survey["sent"], survey["replies"], survey["replied"]) == (1, 2, 1)
        assert survey["survey"]["answers"] == 1
        assert survey["survey"]["nps"] == 100.0
        vf = steps[h.VF, 0]
        assert (vf["sent"], vf["failed"], vf["delivered"]) == (1, 1, 0)
        a = report["appointments"]
        assert (a["reminded"]["noshow"], a["reminded"]["attended"]) == (1, 1)  # A2, A1
        assert a["not_reminded"]["total"] == 0
        w = report["waitlist"]
        assert (w["slots_freed"], w["slots_filled"], w["hours_to_fill"]["median"]) == (
            1, 1, 3.0)
        assert (w["offers"], w["accepted"], w["taken"]) == (2, 1, 1)
        assert report["bookings"] == [{"source": "waitlist", "status": "booked", "count": 1}]

    def test_an_empty_period(self, seeded: Engine) -> None:
        report = _report(seeded, datetime(2023, 1, 1, tzinfo=UTC),
                         datetime(2023, 2, 1, tzinfo=UTC), pathways=[]).to_json()
        assert report["steps"] == []
        assert report["totals"]["sent"] == 0
        assert report["totals"]["rates"]["delivery"] == {"numerator": 0, "denominator": 0,
                                                          "value": None}
        assert report["appointments"]["reminded"]["total"] == 0
        assert report["waitlist"]["hours_to_fill"] == {"count": 0, "median": None,
                                                       "mean": None}

    def test_configured_steps_are_listed_when_idle(self, engine: Engine) -> None:
        report = _report(engine).to_json()
        assert [(s["pathway"], s["step"], s["touches"]) for s in report["steps"]] == [
            (h.AR, 0, 0), (h.AR, 1, 0), (h.SV, 0, 0), (h.VF, 0, 0)]

    def test_since_must_be_before_until(self, engine: Engine) -> None:
        with pytest.raises(ValueError, match="before"):
            _report(engine, h.UNTIL, h.SINCE)


class TestCsv:
    def test_steps_one_row_each(self, seeded: Engine) -> None:
        rows = _report(seeded).to_csv_rows()
        header, body = rows[0], rows[1:]
        assert header[:6] == ["pathway", "step", "trigger", "touches", "sent", "delivered"]
        assert [(r[0], r[1]) for r in body] == [(h.AR, 0), (h.AR, 1), (h.SV, 0), (h.VF, 0)]
        first = dict(zip(header, body[0], strict=True))
        assert (first["sent"], first["delivered"], first["delivery_rate"]) == (6, 5, 0.8333)
        assert first["top_reasons"] == ("skipped: its time … had passed when planned (2); "
                                        "cancelled: opted out by reply (1)")
        survey = dict(zip(header, body[2], strict=True))
        assert (survey["survey_answers"], survey["survey_mean_score"], survey["nps"]) == (
            4, 8.25, 25.0)

    def test_other_tables(self, seeded: Engine) -> None:
        report = _report(seeded)
        assert report.to_csv_rows("appointments") == [
            ["group", "noshow", "attended", "total", "noshow_rate"],
            ["reminded", 1, 3, 4, 0.25],
            ["not reminded", 1, 1, 2, 0.5],
            [f"reminded by {h.AR}", 1, 3, 4, 0.25],
        ]
        waitlist = {r[0]: r[1:] for r in report.to_csv_rows("waitlist")[1:]}
        assert waitlist["fill rate"] == [0.6, 3, 5]
        assert waitlist["hours to fill (median)"] == [6.0, None, 3]
        assert report.to_csv_rows("bookings")[1:] == [
            ["portal", "booked", 2], ["portal", "conflict", 1], ["waitlist", "booked", 1]]
        with pytest.raises(ValueError, match="table"):
            report.to_csv_rows("patients")


class TestNoIdentifiers:
    def test_json_and_csv(self, seeded: Engine) -> None:
        report = _report(seeded)
        texts = [json.dumps(report.to_json(), ensure_ascii=False)] + [
            repr(report.to_csv_rows(t)) for t in ("steps", "appointments", "waitlist",
                                                   "bookings")]
        for text in texts:
            for secret in h.identifiers():
                assert secret not in text, secret


SAMPLES = [
    "its time (2026-03-02T09:00:00+00:00) had passed when planned",
    "too late: due 2026-03-02T09:00:00+00:00",
    "cap: 1 touch(es) already on 2026-03-02",
    "cap: more than 3 touches within seven days",
    "channel: HTTP 400 The 'To' number +1 (555) 010-0001 is not valid",
    "bounced for pat@example.org, try again",
    "opted out of sms",
    "",
    "a1b2 c3 word 4d",
]


def test_scrub_in_python() -> None:
    assert scrub_reason(SAMPLES[0]) == "its time … had passed when planned"
    assert scrub_reason(SAMPLES[2]) == "cap: … touch(es) already on …"
    assert scrub_reason(SAMPLES[4]) == "channel: HTTP … The 'To' number … is not valid"
    assert scrub_reason(SAMPLES[5]) == "bounced for … try again"
    assert scrub_reason(SAMPLES[6]) == "opted out of sms"
    assert scrub_reason(None) == ""
    assert scrub_reason("cap: # touch(es) already on ####-##-##") == (
        "cap: … touch(es) already on …")


def test_scrub_in_sql_then_python_is_the_same(engine: Engine) -> None:
    """What the database groups by (PostgreSQL masks digits, SQLite scrubs), scrubbed once
    more in Python, is the scrub of the reason itself."""
    long = "word " * 40 + "at 2026-03-02"
    with engine.connect() as conn:
        got = [scrub_reason(conn.execute(select(_reason_sql(conn, literal(s)))).scalar())
               for s in [*SAMPLES, long]]
    assert got == [scrub_reason(s) for s in [*SAMPLES, long]]
    assert len(got[-1]) == REASON_LENGTH
