"""Two acceptances of one freed slot at once: one booking, one "taken", never two bookings.

On PostgreSQL two threads, each with its own engine (so its own connection), are released
together by a barrier; on SQLite the same, and once more one after the other."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from integration.db import create_db_engine, write_lock
from integration.settings import Settings
from integration.waitlist import accept, offer_round, slot_freed
from tests.outreach.support import ny
from tests.waitlist.support import (
    T0,
    FakeScheduling,
    book,
    channels,
    join_waitlist,
    make_settings,
    offers,
    slots,
    waitlist,
)

SLOTS = ny(2026, 3, 5, 10, 0)


def _offered_twice(engine: Engine, db_url: str, tmp_path: Path, n: int) -> Settings:
    """``n`` freed FHIR slots of ``n`` services, each offered to the two patients waiting for
    an earlier slot of that service."""
    settings = make_settings(db_url, tmp_path, waitlist={"wave": 2}, connections=[{
        "name": "ehr1", "fhir_base": "http://ehr.invalid/fhir", "client_id": "careloop",
        "mode": "classic", "scheduling": "slots"}])
    for i in range(n):
        for name, phone in (("A", f"55501{i}1"), ("B", f"55501{i}2")):
            entry = book(engine, filler=f"F{name}{i}", mrn=f"MRN{name}{i}",
                         start=ny(2026, 3, 20, 10, 0), phone=phone,
                         service=f"SVC{i}^Service {i}^L")
            join_waitlist(engine, settings, entry)
        location = waitlist(engine)[0].location
        with write_lock(engine), engine.begin() as conn:
            slot_freed(conn, key=f"Slot/s{i}", source="fhir", connection="ehr1",
                       slot_ref=f"Slot/s{i}", service=f"SVC{i}", location=location,
                       start=SLOTS + timedelta(hours=i), end=None, now=T0)
    assert offer_round(engine, settings, channels(tmp_path), now=T0).offered == 2 * n
    return settings


def _check(engine: Engine, slot_index: int, outcomes: list[Any],
           scheduling: FakeScheduling) -> None:
    assert sorted(o.status for o in outcomes) == ["booked", "taken"]
    slot = slots(engine)[slot_index]
    winners = [o for o in offers(engine) if o.slot_id == slot.id and o.status == "accepted"]
    assert len(winners) == 1
    assert (slot.status, slot.filled_by) == ("filled", winners[0].id)
    assert [c["slot"] for c in scheduling.calls].count(slot.slot_ref) == 1


def _together(db_url: str, settings: Settings, tmp_path: Path, scheduling: FakeScheduling,
              offer_ids: list[int]) -> tuple[list[Any], list[BaseException]]:
    """Accept ``offer_ids`` at once: one thread each, each with its own engine, released
    together by a barrier."""
    barrier = threading.Barrier(len(offer_ids))
    outcomes: list[Any] = [None] * len(offer_ids)
    errors: list[BaseException] = []

    def run(k: int, offer_id: int) -> None:
        own = create_db_engine(db_url)
        try:
            barrier.wait(10)
            outcomes[k] = asyncio.run(accept(own, settings, channels(tmp_path), scheduling,
                                             offer_id=offer_id, now=T0))
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=run, args=(k, oid)) for k, oid in enumerate(offer_ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes, errors


class TestRace:
    def test_two_threads_at_once(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        rounds = 3
        settings = _offered_twice(engine, db_url, tmp_path, rounds)
        for i in range(rounds):
            scheduling = FakeScheduling(delay_s=0.05)
            slot = slots(engine)[i]
            pair = [o.id for o in offers(engine) if o.slot_id == slot.id]
            outcomes, errors = _together(db_url, settings, tmp_path, scheduling, pair)
            assert errors == []
            _check(engine, i, outcomes, scheduling)
            assert len(scheduling.calls) == 1
        statuses = sorted(w.status for w in waitlist(engine))
        assert statuses == ["active"] * rounds + ["booked"] * rounds

    def test_one_after_the_other(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        settings = _offered_twice(engine, db_url, tmp_path, 1)
        scheduling = FakeScheduling()
        first, second = (o.id for o in offers(engine))
        outcomes = [asyncio.run(accept(engine, settings, channels(tmp_path), scheduling,
                                       offer_id=oid, now=T0)) for oid in (first, second)]
        assert [o.status for o in outcomes] == ["booked", "taken"]
        _check(engine, 0, outcomes, scheduling)
        assert [o.status for o in offers(engine)] == ["accepted", "taken"]

    @pytest.mark.parametrize("status", ["conflict", "failed"])
    def test_refused_then_nobody_gets_it(self, engine: Engine, db_url: str, tmp_path: Path,
                                         status: str) -> None:
        """The winner's booking is refused: the slot is withdrawn, the other acceptance is
        still "taken" (the EHR said the slot is gone)."""
        settings = _offered_twice(engine, db_url, tmp_path, 1)
        scheduling = FakeScheduling(status=status)
        first, second = (o.id for o in offers(engine))
        outcomes = [asyncio.run(accept(engine, settings, channels(tmp_path), scheduling,
                                       offer_id=oid, now=T0)) for oid in (first, second)]
        assert [o.status for o in outcomes] == ["taken", "taken"]
        assert len(scheduling.calls) == 1
        assert slots(engine)[0].status == "withdrawn"
        assert [w.status for w in waitlist(engine)] == ["active", "active"]


def test_two_rounds_at_once_offer_once(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """Two runners (two replicas) offering at the same moment: each patient is offered the
    slot once, and one wave goes out."""
    settings = make_settings(db_url, tmp_path, waitlist={"wave": 2})
    for name, phone in (("A", "5550101"), ("B", "5550102"), ("C", "5550103")):
        join_waitlist(engine, settings, book(engine, filler=f"F{name}", mrn=f"MRN{name}",
                                             start=ny(2026, 3, 20, 10, 0), phone=phone))
    with write_lock(engine), engine.begin() as conn:
        slot_freed(conn, key="k", source="hl7v2", connection=None, slot_ref=None,
                   service="CHECKUP", location="", start=SLOTS, end=None, now=T0)
    barrier = threading.Barrier(2)
    counts: list[int] = []

    def run() -> None:
        own = create_db_engine(db_url)
        try:
            barrier.wait(10)
            counts.append(offer_round(own, settings, channels(tmp_path), now=T0).offered)
        finally:
            own.dispose()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(counts) == [0, 2]
    assert len(offers(engine)) == 2
    assert len({o.patient_id for o in offers(engine)}) == 2
