"""Freed slots: recorded once per key, found on the timeline from SIU S15 cancellations and
FHIR Appointment changes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, select

from integration.db import write_lock
from integration.models import outreach_cursors
from integration.waitlist import consume_cancellations, freed_key, slot_freed
from tests.outreach.support import ny, utc
from tests.waitlist.support import (
    T0,
    apply_fhir,
    book,
    cancel,
    fhir_appointment,
    fhir_patient,
    join_waitlist,
    make_settings,
    slots,
    waitlist,
)

START = ny(2026, 3, 5, 10, 0)


class TestSlotFreed:
    def test_once_per_key(self, engine: Engine) -> None:
        """A second notice of the same freed slot changes nothing."""
        values = {"source": "rebooking", "connection": "ehr1", "slot_ref": "Slot/s1",
                  "service": "CHECKUP", "location": "Location/l1", "start": START,
                  "end": START + timedelta(minutes=30), "now": T0}
        with write_lock(engine), engine.begin() as conn:
            first = slot_freed(conn, key="Slot/s1", **values)  # type: ignore[arg-type]
            again = slot_freed(conn, key="Slot/s1", **values)  # type: ignore[arg-type]
        assert first is not None and again is None
        (row,) = slots(engine)
        assert (row.status, row.source, row.slot_ref) == ("open", "rebooking", "Slot/s1")
        assert utc(row.start) == START and utc(row.freed_at) == T0

    def test_too_soon_is_not_recorded(self, engine: Engine) -> None:
        with write_lock(engine), engine.begin() as conn:
            assert slot_freed(conn, key="k", source="hl7v2", connection=None, slot_ref=None,
                              service="", location="", start=T0 + timedelta(hours=1),
                              end=None, now=T0, min_notice=timedelta(hours=2)) is None
            assert slot_freed(conn, key="k2", source="hl7v2", connection=None, slot_ref=None,
                              service="", location="", start=T0 - timedelta(days=1),
                              end=None, now=T0) is None
        assert slots(engine) == []

    def test_key(self) -> None:
        assert freed_key(entry_id="e1", start=START, slot_ref="Slot/9") == "Slot/9"
        assert freed_key(entry_id="e1", start=START) == "entry:e1:2026-03-05T15:00:00+00:00"


class TestConsumeCancellations:
    def test_s15_frees_the_slot(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        """An SIU S15 for an appointment ahead frees its time: keyed by entry and start,
        with the appointment's service and location; the cursor moves past it."""
        settings = make_settings(db_url, tmp_path)
        entry_id = book(engine, filler="F1", mrn="MRN1", start=START)
        assert consume_cancellations(engine, settings, now=T0) == 0
        cancel(engine, filler="F1", mrn="MRN1", start=START, at=T0 + timedelta(minutes=5))
        assert consume_cancellations(engine, settings, now=T0 + timedelta(minutes=5)) == 1
        (row,) = slots(engine)
        assert row.key == f"entry:{entry_id}:{START.astimezone(utc(T0).tzinfo).isoformat()}"
        assert (row.source, row.connection, row.slot_ref) == ("hl7v2", None, None)
        assert row.service == "CHECKUP" and row.location.startswith("Location/")
        assert utc(row.start) == START and utc(row.end) == START + timedelta(minutes=30)
        assert row.status == "open"
        assert consume_cancellations(engine, settings, now=T0 + timedelta(minutes=6)) == 0
        with engine.connect() as conn:
            cursor = conn.execute(select(outreach_cursors).where(
                outreach_cursors.c.name == "waitlist")).one()
        assert cursor.last_id > 0

    def test_redelivered_cancellation_is_one_slot(self, engine: Engine, db_url: str,
                                                  tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path)
        book(engine, filler="F1", mrn="MRN1", start=START)
        cancel(engine, filler="F1", mrn="MRN1", start=START, at=T0 + timedelta(minutes=5))
        consume_cancellations(engine, settings, now=T0 + timedelta(minutes=5))
        cancel(engine, filler="F1", mrn="MRN1", start=START, at=T0 + timedelta(minutes=9))
        assert consume_cancellations(engine, settings, now=T0 + timedelta(minutes=9)) == 0
        assert len(slots(engine)) == 1

    def test_past_or_imminent_cancellations_free_nothing(self, engine: Engine, db_url: str,
                                                         tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path)
        soon = T0 + timedelta(hours=1)  # within the default two hours of notice
        book(engine, filler="F1", mrn="MRN1", start=soon)
        cancel(engine, filler="F1", mrn="MRN1", start=soon, at=T0 + timedelta(minutes=5))
        assert consume_cancellations(engine, settings, now=T0 + timedelta(minutes=5)) == 0
        assert slots(engine) == []

    def test_rebooked_again_frees_nothing(self, engine: Engine, db_url: str,
                                          tmp_path: Path) -> None:
        """Cancelled, then booked again before the consumer ran: the entry is booked now."""
        settings = make_settings(db_url, tmp_path)
        book(engine, filler="F1", mrn="MRN1", start=START)
        cancel(engine, filler="F1", mrn="MRN1", start=START, at=T0 + timedelta(minutes=5))
        book(engine, filler="F1", mrn="MRN1", start=START, at=T0 + timedelta(minutes=7))
        assert consume_cancellations(engine, settings, now=T0 + timedelta(minutes=8)) == 0

    def test_fhir_cancellation_frees_the_slot(self, engine: Engine, db_url: str,
                                              tmp_path: Path) -> None:
        """A FHIR Appointment naming a Slot: the Slot reference is the key."""
        settings = make_settings(db_url, tmp_path)
        apply_fhir(engine, [fhir_patient("p1", "M1"),
                            fhir_appointment("a1", "p1", start=START)])
        apply_fhir(engine, [fhir_appointment("a1", "p1", start=START, status="cancelled",
                                             version="2", updated=T0 + timedelta(minutes=5))],
                   T0 + timedelta(minutes=5))
        assert consume_cancellations(engine, settings, now=T0 + timedelta(minutes=5)) == 1
        (row,) = slots(engine)
        assert (row.key, row.source, row.connection, row.slot_ref) == (
            "Slot/s1", "fhir", "ehr1", "Slot/s1")
        assert (row.service, row.location) == ("CHECKUP", "Location/loc1")

    def test_cancelled_appointment_leaves_the_waitlist(self, engine: Engine, db_url: str,
                                                       tmp_path: Path) -> None:
        """A patient waiting to move up an appointment that is now cancelled is taken off."""
        settings = make_settings(db_url, tmp_path)
        entry_id = book(engine, filler="F1", mrn="MRN1", start=START)
        join_waitlist(engine, settings, entry_id)
        cancel(engine, filler="F1", mrn="MRN1", start=START, at=T0 + timedelta(minutes=5))
        consume_cancellations(engine, settings, now=T0 + timedelta(minutes=5))
        assert [r.status for r in waitlist(engine)] == ["withdrawn"]
