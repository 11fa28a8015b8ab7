"""What patients said, honoured by the planner at reconcile time and again at send time:
address opt-outs (``address_optouts``) and cancel / reschedule requests (``patient_requests``),
read in bulk by :mod:`integration.outreach.state` (real PostgreSQL and SQLite)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, insert, update

from integration.db import write_lock
from integration.models import address_optouts, outreach_cursors, patient_requests
from integration.outreach.state import entry_time_key, load_snapshot
from tests.outreach.support import all_touches, config, entry_id, ny, receive, siu, stage, touch

T0 = ny(2026, 3, 1, 9, 0)
START = ny(2026, 3, 10, 14)


def book(engine: Engine, tmp_path: Path) -> str:
    s = stage(engine, tmp_path)
    receive(engine, siu("S12", "C1", filler="F1", start=START, sent=T0), T0)
    s.reconcile(T0)
    return entry_id(engine, "Appointment")


def replan(engine: Engine, tmp_path: Path) -> None:
    with write_lock(engine), engine.begin() as conn:
        conn.execute(update(outreach_cursors).values(last_id=0))
    stage(engine, tmp_path).reconcile(T0)


def request(engine: Engine, eid: str, action: str, detail: dict[str, str] | None = None,
            ) -> None:
    pid = touch(engine, "appointment-reminder|0|").patient_id
    with write_lock(engine), engine.begin() as conn:
        conn.execute(insert(patient_requests).values(
            entry_id=eid, patient_id=pid, action=action, source="portal", event_id=None,
            touch_key=None, detail=detail, created_at=T0))


class TestAddressOptOut:
    def test_loaded_onto_the_recipient(self, engine: Engine, tmp_path: Path) -> None:
        eid = book(engine, tmp_path)
        with write_lock(engine), engine.begin() as conn:
            conn.execute(insert(address_optouts).values(channel="sms", address="+15555550101",
                                                        at=T0, event_id=None))
        with engine.connect() as conn:
            snap = load_snapshot(conn, config(), [eid], T0)
        (recipient,) = snap.recipients.values()
        assert recipient.blocked == frozenset({("sms", "+15555550101")})

    def test_sender_honours_it_at_send_time(self, engine: Engine, tmp_path: Path) -> None:
        """An opt-out the reconciler has not seen yet still stops the SMS at send time; the
        re-plan moves the preferred step to email."""
        book(engine, tmp_path)
        with write_lock(engine), engine.begin() as conn:
            conn.execute(insert(address_optouts).values(channel="sms", address="+15555550101",
                                                        at=T0, event_id=None))
        s = stage(engine, tmp_path)
        sweep = s.send_due(ny(2026, 3, 7, 14, 0))
        assert sweep.sent == 0
        first = touch(engine, "appointment-reminder|0|")
        assert first.status == "scheduled" and first.channel == "email"
        assert s.send_due(ny(2026, 3, 7, 14, 1)).sent == 1
        assert not (tmp_path / "sms").exists() or not list((tmp_path / "sms").iterdir())

    def test_reconciler_skips_the_sms_step(self, engine: Engine, tmp_path: Path) -> None:
        book(engine, tmp_path)
        with write_lock(engine), engine.begin() as conn:
            conn.execute(insert(address_optouts).values(channel="sms", address="+15555550101",
                                                        at=T0, event_id=None))
        replan(engine, tmp_path)
        second = touch(engine, "appointment-reminder|1|")
        assert (second.status, second.reason) == ("cancelled", "opted out of sms")


class TestRequests:
    def test_cancel_request_holds_the_entry(self, engine: Engine, tmp_path: Path) -> None:
        eid = book(engine, tmp_path)
        request(engine, eid, "cancel")
        replan(engine, tmp_path)
        assert {(t.status, t.reason) for t in all_touches(engine)} == {
            ("cancelled", "the patient asked to cancel")}

    def test_sender_honours_a_request_at_send_time(self, engine: Engine,
                                                   tmp_path: Path) -> None:
        eid = book(engine, tmp_path)
        request(engine, eid, "reschedule", {"entry_time": entry_time_key(START)})
        s = stage(engine, tmp_path)
        assert s.send_due(ny(2026, 3, 7, 14, 0)).cancelled == 1
        first = touch(engine, "appointment-reminder|0|")
        assert (first.status, first.reason) == (
            "cancelled", "at send time: the patient asked to reschedule")

    def test_reschedule_for_another_time_no_longer_holds(self, engine: Engine,
                                                         tmp_path: Path) -> None:
        """A reschedule request made about an earlier time: the clinic has moved it since."""
        eid = book(engine, tmp_path)
        request(engine, eid, "reschedule", {"entry_time": entry_time_key(ny(2026, 3, 9, 9))})
        replan(engine, tmp_path)
        assert {t.status for t in all_touches(engine)} == {"scheduled"}

    def test_latest_request_decides(self, engine: Engine, tmp_path: Path) -> None:
        eid = book(engine, tmp_path)
        request(engine, eid, "cancel")
        request(engine, eid, "confirm")
        request(engine, eid, "survey")
        replan(engine, tmp_path)
        assert {t.status for t in all_touches(engine)} == {"scheduled"}
