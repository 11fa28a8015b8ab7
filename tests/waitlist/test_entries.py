"""Joining and leaving the waitlist, and which freed slots fit a waitlist entry."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from integration.db import write_lock
from integration.waitlist import active_for, join, offer_round, slot_freed, withdraw
from tests.outreach.support import ny, utc
from tests.waitlist.support import (
    T0,
    book,
    cancel,
    channels,
    join_waitlist,
    make_settings,
    offers,
    patient_of,
    waitlist,
)

LATER = ny(2026, 3, 20, 10, 0)
EARLY = ny(2026, 3, 5, 10, 0)


def _free(engine: Engine, *, service: str = "CHECKUP", location: str = "",
          start: datetime = EARLY) -> int | None:
    with write_lock(engine), engine.begin() as conn:
        return slot_freed(conn, key="k1", source="hl7v2", connection=None, slot_ref=None,
                          service=service, location=location, start=start, end=None, now=T0)


class TestJoin:
    def test_join_reads_the_appointment(self, engine: Engine, db_url: str,
                                        tmp_path: Path) -> None:
        """Service, location and window come from the appointment; the window ends at its
        start and opens min_notice from now."""
        settings = make_settings(db_url, tmp_path)
        entry_id = book(engine, filler="F1", mrn="MRN1", start=LATER)
        wid = join_waitlist(engine, settings, entry_id)
        (row,) = waitlist(engine)
        assert row.id == wid and row.status == "active" and row.entry_id == entry_id
        assert row.service == "CHECKUP"
        assert row.location.startswith("Location/")
        assert utc(row.latest) == LATER
        assert utc(row.earliest) == T0 + timedelta(hours=2)
        assert row.connection is None  # an HL7 v2 appointment

    def test_join_is_idempotent(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        """Joining twice for the same appointment gives the same entry, not a second one."""
        settings = make_settings(db_url, tmp_path)
        entry_id = book(engine, filler="F1", mrn="MRN1", start=LATER)
        first = join_waitlist(engine, settings, entry_id)
        second = join_waitlist(engine, settings, entry_id, T0 + timedelta(hours=1))
        assert first == second
        (row,) = waitlist(engine)
        assert utc(row.earliest) == T0 + timedelta(hours=3)

    def test_join_refuses_what_is_not_the_patients_appointment(
            self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        settings = make_settings(db_url, tmp_path)
        mine = book(engine, filler="F1", mrn="MRN1", start=LATER)
        other = book(engine, filler="F2", mrn="MRN2", start=LATER)
        cancelled = book(engine, filler="F3", mrn="MRN1", start=LATER)
        cancel(engine, filler="F3", mrn="MRN1", start=LATER, at=T0 + timedelta(minutes=1))
        with write_lock(engine), engine.begin() as conn:
            with pytest.raises(ValueError, match="not an appointment of patient"):
                join(conn, settings, patient_id=patient_of(engine, mine), entry_id=other,
                     now=T0)
            with pytest.raises(ValueError, match="cancelled"):
                join(conn, settings, patient_id=patient_of(engine, mine), entry_id=cancelled,
                     now=T0)
            with pytest.raises(ValueError, match="not an appointment on the timeline"):
                join(conn, settings, patient_id=patient_of(engine, mine), entry_id="nope",
                     now=T0)
        assert waitlist(engine) == []

    def test_withdraw(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        """Withdrawn entries leave the patient's list; withdrawing twice is a no-op; joining
        again makes a new entry."""
        settings = make_settings(db_url, tmp_path)
        entry_id = book(engine, filler="F1", mrn="MRN1", start=LATER)
        wid = join_waitlist(engine, settings, entry_id)
        pid = patient_of(engine, entry_id)
        with engine.connect() as conn:
            assert [r["id"] for r in active_for(conn, pid)] == [wid]
        with write_lock(engine), engine.begin() as conn:
            assert withdraw(conn, waitlist_id=wid, now=T0) is True
            assert withdraw(conn, waitlist_id=wid, now=T0) is False
        with engine.connect() as conn:
            assert active_for(conn, pid) == []
        assert join_waitlist(engine, settings, entry_id) != wid


class TestFit:
    """Which waitlist entries a freed slot is offered to."""

    def _setup(self, engine: Engine, db_url: str, tmp_path: Path, **values: str) -> None:
        """Patient MRN1 holds a check-up on the 20th and waits for an earlier one."""
        settings = make_settings(db_url, tmp_path)
        entry_id = book(engine, filler="F1", mrn="MRN1", start=LATER, **values)
        join_waitlist(engine, settings, entry_id)

    def _offered(self, engine: Engine, db_url: str, tmp_path: Path) -> int:
        settings = make_settings(db_url, tmp_path)
        return offer_round(engine, settings, channels(tmp_path), now=T0).offered

    def test_same_service_and_place(self, engine: Engine, db_url: str,
                                    tmp_path: Path) -> None:
        self._setup(engine, db_url, tmp_path)
        location = waitlist(engine)[0].location
        _free(engine, location=location)
        assert self._offered(engine, db_url, tmp_path) == 1

    def test_other_service_is_not_offered(self, engine: Engine, db_url: str,
                                          tmp_path: Path) -> None:
        self._setup(engine, db_url, tmp_path)
        _free(engine, service="XRAY")
        assert self._offered(engine, db_url, tmp_path) == 0
        assert offers(engine) == []

    def test_unknown_service_or_place_fits(self, engine: Engine, db_url: str,
                                           tmp_path: Path) -> None:
        """A slot that names no service or place fits any entry (and vice versa)."""
        self._setup(engine, db_url, tmp_path)
        _free(engine, service="", location="")
        assert self._offered(engine, db_url, tmp_path) == 1

    def test_names_of_the_service_and_place_fit(self, engine: Engine, db_url: str,
                                                tmp_path: Path) -> None:
        """A slot freed by a rebooking may name the service and place by their displays."""
        self._setup(engine, db_url, tmp_path)
        _free(engine, service="check-up", location="Main Street Clinic")
        assert self._offered(engine, db_url, tmp_path) == 1

    def test_other_place_is_not_offered(self, engine: Engine, db_url: str,
                                        tmp_path: Path) -> None:
        self._setup(engine, db_url, tmp_path)
        _free(engine, location="Location/elsewhere")
        assert self._offered(engine, db_url, tmp_path) == 0

    def test_entry_without_service_fits_any_slot(self, engine: Engine, db_url: str,
                                                 tmp_path: Path) -> None:
        self._setup(engine, db_url, tmp_path, service="")
        assert waitlist(engine)[0].service == ""
        _free(engine, service="XRAY")
        assert self._offered(engine, db_url, tmp_path) == 1

    @pytest.mark.parametrize(("start", "fits"), [
        (ny(2026, 3, 1, 10, 30), False),   # before earliest (min notice from joining)
        (ny(2026, 3, 1, 11, 30), True),
        (ny(2026, 3, 19, 10, 0), True),
        (LATER, False),                    # not earlier than the appointment held
        (ny(2026, 3, 21, 10, 0), False),   # later than the appointment held
    ])
    def test_window(self, engine: Engine, db_url: str, tmp_path: Path, start: datetime,
                    fits: bool) -> None:
        """Offered from the waitlist entry's earliest time, and only before the appointment
        held."""
        self._setup(engine, db_url, tmp_path)
        settings = make_settings(db_url, tmp_path, waitlist={"min_notice": "PT1H"})
        _free(engine, start=start)
        assert offer_round(engine, settings, channels(tmp_path), now=T0).offered == int(fits)

    def test_appointment_moved_earlier_since(self, engine: Engine, db_url: str,
                                             tmp_path: Path) -> None:
        """The window follows the appointment as it is now: moved before the slot, no
        offer."""
        self._setup(engine, db_url, tmp_path)
        book(engine, filler="F1", mrn="MRN1", start=ny(2026, 3, 3, 10, 0),
             at=T0 + timedelta(minutes=1))
        _free(engine)
        assert self._offered(engine, db_url, tmp_path) == 0
