"""Effects shared by SMS, voice and the portal: opt-outs per address, preferences, patient
requests (real PostgreSQL and SQLite)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from integration.db import write_lock
from integration.models import (
    address_optouts,
    ehr_outbox,
    patient_preferences,
    timeline_changes,
    touches,
)
from integration.replies.effects import (
    CONFIRMED_TAG,
    confirmed_resource,
    opt_in,
    opt_out,
    record_request,
    set_preferences,
)
from integration.settings import Settings
from tests.outreach.support import all_touches, entry_id, touch
from tests.replies.support import REPLY_AT, book, make_settings, requests


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return make_settings(db_url, tmp_path)


def changes(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(timeline_changes)).scalar_one())


class TestOptOut:
    def test_once_per_address_whatever_its_spelling(self, engine: Engine,
                                                    tmp_path: Path) -> None:
        """The record's ``+1 (555) 5550101`` and the provider's ``+15555550101`` are one
        number: opted out once, its scheduled SMS cancelled, other channels untouched."""
        book(engine, tmp_path, send_first=False)
        with write_lock(engine), engine.begin() as conn:
            assert opt_out(conn, "sms", "+1 555-555.0101", event_id=None, now=REPLY_AT)
            assert not opt_out(conn, "sms", "+15555550101", event_id=None, now=REPLY_AT)
            assert not opt_in(conn, "voice", "+15555550101", now=REPLY_AT)
        with engine.connect() as conn:
            assert [tuple(r) for r in conn.execute(
                select(address_optouts.c.channel, address_optouts.c.address))] == [
                ("sms", "+15555550101")]
        assert {t.status for t in all_touches(engine) if t.channel == "sms"} == {"cancelled"}

    def test_opt_in_removes_and_replans(self, engine: Engine, tmp_path: Path) -> None:
        book(engine, tmp_path, send_first=False)
        with write_lock(engine), engine.begin() as conn:
            opt_out(conn, "sms", "+15555550101", event_id=None, now=REPLY_AT)
        before = changes(engine)
        with write_lock(engine), engine.begin() as conn:
            assert opt_in(conn, "sms", "+1 (555) 5550101", now=REPLY_AT)
            assert not opt_in(conn, "sms", "+15555550101", now=REPLY_AT)
        assert changes(engine) == before + 1  # one patient nudged

    def test_email_addresses_fold_case(self, engine: Engine, tmp_path: Path) -> None:
        with write_lock(engine), engine.begin() as conn:
            assert opt_out(conn, "email", " Jane@Example.org", event_id=None, now=REPLY_AT)
            assert not opt_out(conn, "email", "jane@example.org", event_id=None, now=REPLY_AT)


    def test_email_opt_out_cancels_scheduled_email(self, engine: Engine,
                                                   tmp_path: Path) -> None:
        """An address with dots (``jane.doe@...``) is matched in SQL by the indexed key, which
        drops dots: the Python side must be keyed the same way, or nothing is cancelled."""
        book(engine, tmp_path, send_first=False)
        with write_lock(engine), engine.begin() as conn:
            conn.execute(touches.update().where(touches.c.channel == "sms").values(
                channel="email", address="Jane.Doe@Example.org"))
            assert opt_out(conn, "email", "jane.doe@example.org", event_id=None, now=REPLY_AT)
        assert {t.status for t in all_touches(engine) if t.channel == "email"} == {"cancelled"}


class TestPreferences:
    def test_upsert_leaves_what_is_not_given(self, engine: Engine, tmp_path: Path) -> None:
        book(engine, tmp_path, send_first=False)
        pid = touch(engine, "appointment-reminder|0|").patient_id
        before = changes(engine)
        with write_lock(engine), engine.begin() as conn:
            set_preferences(conn, pid, channel="email", language="es", now=REPLY_AT)
            set_preferences(conn, pid, opted_out=["voice", "sms", "sms"], now=REPLY_AT)
            set_preferences(conn, pid, channel="email", now=REPLY_AT)  # no change: no nudge
        with engine.connect() as conn:
            row = conn.execute(select(patient_preferences)).one()
        assert (row.patient_id, row.preferred_channel, row.language, row.opted_out) == (
            pid, "email", "es", ["sms", "voice"])
        assert changes(engine) == before + 2

    def test_the_planner_sees_them(self, engine: Engine, tmp_path: Path) -> None:
        """A preference set here is read by the next plan (the nudge re-plans the patient)."""
        s = book(engine, tmp_path, send_first=False)
        pid = touch(engine, "appointment-reminder|0|").patient_id
        with write_lock(engine), engine.begin() as conn:
            set_preferences(conn, pid, channel="email", now=REPLY_AT - timedelta(days=6))
        s.reconcile(REPLY_AT - timedelta(days=6))
        assert touch(engine, "appointment-reminder|0|").channel == "email"


class TestRequests:
    def test_once_per_event_and_action(self, engine: Engine, settings: Settings,
                                       tmp_path: Path) -> None:
        book(engine, tmp_path)
        eid = entry_id(engine, "Appointment")
        pid = touch(engine, "appointment-reminder|0|").patient_id
        args = {"entry_id": eid, "patient_id": pid, "source": "portal", "touch_key": None,
                "detail": None, "now": REPLY_AT}
        with write_lock(engine), engine.begin() as conn:
            first = record_request(conn, settings, action="confirm", event_id=7, **args)
            assert first is not None
            assert record_request(conn, settings, action="confirm", event_id=7, **args) is None
            assert record_request(conn, settings, action="cancel", event_id=7, **args)
            assert record_request(conn, settings, action="confirm", event_id=None, **args)
            assert record_request(conn, settings, action="confirm", event_id=None, **args)
        assert [r.action for r in requests(engine)] == ["confirm", "cancel", "confirm",
                                                        "confirm"]

    def test_survey_is_only_stored(self, engine: Engine, settings: Settings,
                                   tmp_path: Path) -> None:
        book(engine, tmp_path)
        eid = entry_id(engine, "Appointment")
        pid = touch(engine, "appointment-reminder|0|").patient_id
        before = [tuple(t) for t in all_touches(engine)]
        with write_lock(engine), engine.begin() as conn:
            rid = record_request(conn, settings, entry_id=eid, patient_id=pid, action="survey",
                                 source="portal", event_id=None, touch_key=None,
                                 detail={"answers": {"q1": 5}}, now=REPLY_AT)
        assert rid is not None
        (req,) = requests(engine)
        assert req.detail == {"answers": {"q1": 5}}
        assert [tuple(t) for t in all_touches(engine)] == before
        with engine.connect() as conn:
            assert conn.execute(select(ehr_outbox)).all() == []

    def test_unknown_action_is_refused(self, engine: Engine, settings: Settings) -> None:
        with engine.begin() as conn, pytest.raises(ValueError, match="action must be"):
            record_request(conn, settings, entry_id="e", patient_id="p", action="delete",
                           source="sms", event_id=None, touch_key=None, detail=None,
                           now=REPLY_AT)


class TestConfirmedResource:
    def test_patient_participant_accepted_others_kept(self) -> None:
        res = {"resourceType": "Appointment", "participant": [
            {"actor": {"reference": "Practitioner/1"}, "status": "needs-action"},
            {"actor": {"reference": "Patient/9"}, "status": "needs-action"}]}
        out = confirmed_resource(res)
        assert [p["status"] for p in out["participant"]] == ["needs-action", "accepted"]
        assert out["meta"]["tag"] == [CONFIRMED_TAG]
        assert res["participant"][1]["status"] == "needs-action"  # not changed in place

    def test_absolute_patient_reference(self) -> None:
        res = {"participant": [{"actor": {"reference": "https://ehr/fhir/Patient/9"},
                                "status": "tentative"}]}
        assert confirmed_resource(res)["participant"][0]["status"] == "accepted"

    def test_patient_participant_added_when_none(self) -> None:
        out = confirmed_resource({"participant": [{"actor": {"reference": "Location/1"}}]})
        assert out["participant"][-1] == {"actor": {"type": "Patient"},
                                          "required": "required", "status": "accepted"}

    def test_idempotent(self) -> None:
        once = confirmed_resource({"participant": []})
        assert confirmed_resource(once) == once
