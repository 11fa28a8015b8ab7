"""The scheduling service against a respx EHR, on both databases: slot searches, the three ways
to book (``$book``, a transaction, ordered writes), conflicts with alternatives, the bookings
row, the timeline and the outreach plan at once, the write-back, the waitlist hand-over."""

from __future__ import annotations

import sys
import types
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, insert, select

from integration.db import write_lock
from integration.models import bookings, freed_slots, touches
from integration.outreach.reconciler import reconcile
from integration.scheduling import FreeSlot, SchedulingService
from integration.waitlist import consume_cancellations
from integration.writeback import flush
from tests.outreach.support import config as outreach_config
from tests.scheduling.fake_ehr import FakeEHR, mocked, outcome
from tests.scheduling.support import (
    CHECKUP,
    EHR,
    FREE,
    NOW,
    World,
    booking_rows,
    client_factory,
    connection,
    entry_for,
    ingest,
    outbox_rows,
    seed,
    settings,
)

WEEK_START = datetime(2030, 2, 1, 5, 0, tzinfo=UTC)


@pytest.fixture
def ehr() -> Iterator[FakeEHR]:
    fake = FakeEHR()
    seed(fake)
    yield fake


@pytest.fixture
def router(ehr: FakeEHR) -> Iterator[Any]:
    yield from mocked(ehr)


@pytest.fixture
async def world(engine: Engine, ehr: FakeEHR, router: Any) -> AsyncIterator[World]:
    cfg = settings(str(engine.url.render_as_string(hide_password=False)))
    ingest(engine, ehr, "Patient/p1", "Appointment/a1")
    entry = entry_for(engine, "Appointment/a1")
    service = SchedulingService(engine, cfg, client_factory=client_factory, clock=lambda: NOW)
    yield World(ehr, engine, cfg, service, str(entry.patient_id), str(entry.id))
    await service.aclose()


async def _rebook(world: World, slot: FreeSlot | str, **kw: Any) -> Any:
    kw.setdefault("entry_id", world.entry_id)
    return await world.service.rebook(patient_id=world.patient_id, slot=slot, source="portal",
                                      now=NOW, **kw)


async def _offer(world: World) -> list[FreeSlot]:
    return await world.service.free_slots(world.entry_id, start=WEEK_START, days=7)


def _assert_rebooked(world: World, new_ref: str, slot: str) -> None:
    ehr = world.ehr
    new = ehr.get(new_ref)
    assert new["status"] == "booked"
    assert new["slot"] == [{"reference": f"Slot/{slot}"}]
    assert ehr.get(f"Slot/{slot}")["status"] == "busy"
    old = ehr.get("Appointment/a1")
    assert old["status"] == "cancelled"
    assert old["cancelationReason"]["coding"][0]["code"] == "pat"
    assert ehr.get("Slot/old")["status"] == "free"
    assert len(ehr.all("Appointment")) == 2


class TestFreeSlots:
    async def test_search(self, world: World) -> None:
        """Schedules by the appointment's practitioner and location, then their free slots in
        the window: same service only (no dental), by start, never the appointment's own."""
        slots = await _offer(world)
        assert [s.ref for s in slots] == [f"Slot/{s}" for s in FREE]
        first = slots[0]
        assert first.schedule_ref == "Schedule/sch1"
        assert first.start == datetime(2030, 2, 2, 15, tzinfo=UTC)
        assert (first.service, first.location) == ("Check-up", "Main Street Clinic")
        assert first.version == "1"
        gets = [(p, h) for m, p, h in world.ehr.log if m == "GET"]
        assert [p for p, _ in gets] == ["Schedule", "Slot", "Location"]

    async def test_slot_search_params(self, world: World, router: Any) -> None:
        await world.service.free_slots(world.entry_id, start=WEEK_START, days=3, limit=5)
        slot_call = next(c for c in router.calls if c.request.url.path.endswith("/Slot"))
        params = list(httpx.QueryParams(slot_call.request.url.query).multi_items())
        assert params == [
            ("schedule", "Schedule/sch1,Schedule/sch2"), ("status", "free"),
            ("start", "ge2030-02-01T05:00:00Z"), ("start", "lt2030-02-04T05:00:00Z"),
            ("_sort", "start"), ("_count", "5")]
        schedule_call = next(c for c in router.calls
                             if c.request.url.path.endswith("/Schedule"))
        assert httpx.QueryParams(schedule_call.request.url.query)["actor"] == \
            "Practitioner/pr1,Location/loc1"

    async def test_by_service_type_when_no_actor_has_a_schedule(self, world: World) -> None:
        """An appointment with no schedulable participant: Schedules of its service type
        (both practitioners' check-ups)."""
        world.ehr.set("Appointment/a1", participant=[
            {"actor": {"reference": "Patient/p1"}, "status": "accepted"}])
        ingest(world.engine, world.ehr, "Appointment/a1")
        slots = await _offer(world)
        assert [s.ref for s in slots] == ["Slot/s1", "Slot/s2", "Slot/s3", "Slot/j1"]
        searched = [p for m, p, _ in world.ehr.log if m == "GET" and p == "Schedule"]
        assert len(searched) == 1  # no actor search to make

    async def test_mode(self, engine: Engine, world: World) -> None:
        assert world.service.mode(world.entry_id) == "slots"
        cfg = settings(str(engine.url.render_as_string(hide_password=False)),
                       connection(scheduling="request"))
        request_mode = SchedulingService(engine, cfg, client_factory=client_factory)
        assert request_mode.mode(world.entry_id) == "request"
        assert request_mode.mode("nope") == "request"
        with pytest.raises(ValueError, match="scheduling"):
            await request_mode.free_slots(world.entry_id, start=WEEK_START, days=7)
        with pytest.raises(ValueError, match="scheduling"):
            await request_mode.rebook(patient_id=world.patient_id, entry_id=world.entry_id,
                                      slot="Slot/s1", source="portal", now=NOW)


class TestTransaction:
    async def test_rebook(self, world: World) -> None:
        """One transaction Bundle: the slot busy, the new appointment, the old one cancelled
        and its slot freed, each version-checked."""
        (first, *_rest) = await _offer(world)
        world.ehr.forget()
        outcome_ = await _rebook(world, first)
        assert outcome_.status == "booked", outcome_
        assert outcome_.start == first.start and outcome_.alternatives == []
        assert world.ehr.writes() == ["POST "]
        (bundle,) = world.ehr.sent("POST", "")
        assert [e["request"].get("ifMatch", "") != "" for e in bundle["entry"]] == [
            True, False, True, True]
        _assert_rebooked(world, str(outcome_.appointment_ref), "s1")
        new = world.ehr.get(str(outcome_.appointment_ref))
        assert new["identifier"] == [{"system": "urn:careloop:booking",
                                      "value": str(outcome_.booking_id)}]
        assert new["reasonCode"] == [{"text": "annual check-up"}]
        assert new["serviceType"] == [CHECKUP]
        assert [(p["actor"]["reference"], p["status"]) for p in new["participant"]] == [
            ("Patient/p1", "accepted"), ("Practitioner/pr1", "accepted"),
            ("Location/loc1", "accepted")]

    async def test_bookings_row(self, world: World) -> None:
        outcome_ = await _rebook(world, "Slot/s2")
        (row,) = booking_rows(world.engine)
        assert row.id == outcome_.booking_id
        assert (row.status, row.method, row.source, row.connection) == (
            "booked", "transaction", "portal", EHR)
        assert (row.patient_id, row.old_entry_id, row.slot_ref) == (
            world.patient_id, world.entry_id, "Slot/s2")
        assert row.new_appointment_ref == outcome_.appointment_ref
        assert _utc(row.start) == datetime(2030, 2, 2, 16, tzinfo=UTC)
        assert _utc(row.end) == datetime(2030, 2, 2, 16, 30, tzinfo=UTC)
        assert _utc(row.started_at) == NOW and row.finished_at is not None
        assert row.error is None

    async def test_timeline_at_once(self, world: World) -> None:
        """The old entry cancelled and a new booked entry, from the EHR's own versions (FHIR
        sources of the connection), before any notification comes back."""
        outcome_ = await _rebook(world, "Slot/s1")
        old = entry_for(world.engine, "Appointment/a1")
        assert old.id == world.entry_id and old.status == "cancelled"
        new = entry_for(world.engine, str(outcome_.appointment_ref))
        assert new.id != world.entry_id
        assert (new.status, new.kind, new.patient_id) == ("booked", "appointment",
                                                          world.patient_id)
        assert _utc(new.time) == datetime(2030, 2, 2, 15, tzinfo=UTC)
        assert world.service.mode(str(new.id)) == "slots"  # rebookable again

    async def test_reminders_follow(self, world: World) -> None:
        """Reminders for the old time stop and reminders for the new time are planned on the
        reconciler's next pass."""
        cfg = outreach_config()
        reconcile(world.engine, cfg, now=NOW)
        before = _touches(world.engine)
        assert {(t.entry_id, t.status) for t in before} == {(world.entry_id, "scheduled")}
        assert len(before) == 2
        outcome_ = await _rebook(world, "Slot/s1")
        reconcile(world.engine, cfg, now=NOW)
        new_entry = entry_for(world.engine, str(outcome_.appointment_ref)).id
        after = _touches(world.engine)
        old_touches = [t for t in after if t.entry_id == world.entry_id]
        assert {t.status for t in old_touches} == {"cancelled"}
        new_touches = [t for t in after if t.entry_id == new_entry]
        assert {t.status for t in new_touches} == {"scheduled"} and len(new_touches) == 2
        assert {_utc(t.moment) for t in new_touches} == {datetime(2030, 2, 2, 15, tzinfo=UTC)}

    async def test_write_back(self, world: World) -> None:
        """The rebooking is written back as a Communication about the new Appointment."""
        outcome_ = await _rebook(world, "Slot/s1")
        (row,) = outbox_rows(world.engine)
        assert (row.key, row.connection, row.resource_type, row.operation) == (
            f"booking-{outcome_.booking_id}", EHR, "Communication", "create")
        resource = row.resource
        assert resource["status"] == "completed"
        assert resource["about"] == [{"reference": outcome_.appointment_ref}]
        assert resource["subject"] == {"reference": "Patient/p1"}
        assert resource["payload"] == [{"contentString":
                                        "Rebooked by the patient from portal: "
                                        "2030-02-02T15:00:00Z"}]
        assert resource["medium"][0]["coding"][0]["code"] == "ONLINEWRIT"
        assert resource["identifier"][0] == {"system": "urn:careloop:writeback",
                                             "value": f"booking-{outcome_.booking_id}"}

    async def test_twice_books_once(self, world: World) -> None:
        """The same choice sent twice: one new Appointment, the same answer."""
        first = await _rebook(world, "Slot/s1")
        second = await _rebook(world, "Slot/s1")
        assert (second.status, second.booking_id, second.appointment_ref) == (
            "booked", first.booking_id, first.appointment_ref)
        assert len(world.appointments(first.booking_id)) == 1
        assert world.ehr.writes() == ["POST "]
        other = await _rebook(world, "Slot/s2")
        assert other.status == "failed" and "already rebooked" in other.message
        assert world.ehr.get("Slot/s2")["status"] == "free"
        assert len(booking_rows(world.engine)) == 1

    async def test_answer_lost(self, world: World) -> None:
        """The transaction went through but its answer was lost; the client's retry meets a
        412 (the slot's version moved on): careloop finds its Appointment by the booking
        identifier. Exactly one new Appointment."""
        def lost(ehr: FakeEHR, request: httpx.Request) -> httpx.Response:
            ehr._answer(request, "")  # carried out...
            raise httpx.ReadTimeout("lost", request=request)  # ...the answer never arrives
        world.ehr.on("POST", "", lost)
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "booked", outcome_
        assert world.ehr.writes()[:2] == ["POST ", "POST "]
        assert len(world.appointments(outcome_.booking_id)) == 1
        _assert_rebooked(world, str(outcome_.appointment_ref), "s1")
        assert entry_for(world.engine, "Appointment/a1").status == "cancelled"

    async def test_resumes_a_pending_booking(self, world: World) -> None:
        """A try that stopped after the EHR booked it (a crash): the same choice again resumes
        the pending row and completes it from the EHR's Appointment."""
        with write_lock(world.engine), world.engine.begin() as conn:
            booking_id = conn.execute(insert(bookings).values(
                patient_id=world.patient_id, old_entry_id=world.entry_id, connection=EHR,
                slot_ref="Slot/s1", start=datetime(2030, 2, 2, 15, tzinfo=UTC),
                source="portal", status="pending", started_at=NOW,
            ).returning(bookings.c.id)).scalar_one()
        created = world.ehr.add({
            "resourceType": "Appointment", "status": "booked", "start": "2030-02-02T15:00:00Z",
            "end": "2030-02-02T15:30:00Z", "slot": [{"reference": "Slot/s1"}],
            "identifier": [{"system": "urn:careloop:booking", "value": str(booking_id)}],
            "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}]})
        world.ehr.set("Slot/s1", status="busy")
        world.ehr.set("Appointment/a1", status="cancelled")
        outcome_ = await _rebook(world, "Slot/s1")
        assert (outcome_.status, outcome_.booking_id, outcome_.appointment_ref) == (
            "booked", booking_id, f"Appointment/{created['id']}")
        assert world.ehr.writes() == ["PUT Slot/old"]  # what the crashed try had not done
        assert world.ehr.get("Slot/old")["status"] == "free"
        (row,) = booking_rows(world.engine)
        assert row.status == "booked"
        assert entry_for(world.engine, f"Appointment/{created['id']}").status == "booked"

    async def test_booked_but_not_recorded(self, world: World,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """The EHR booked it but the database failed before it was recorded: the row stays
        pending and the same choice again completes it, with no second Appointment."""
        real = world.service._commit
        calls: list[int] = []

        def broken(*args: Any) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("the database went away")
            real(*args)
        monkeypatch.setattr(world.service, "_commit", broken)
        with pytest.raises(RuntimeError, match="went away"):
            await _rebook(world, "Slot/s1")
        (row,) = booking_rows(world.engine)
        assert (row.status, row.method) == ("pending", "transaction")
        outcome_ = await _rebook(world, "Slot/s1")
        assert (outcome_.status, outcome_.booking_id) == ("booked", row.id)
        assert world.ehr.writes() == ["POST "]
        assert len(world.appointments(row.id)) == 1
        _assert_rebooked(world, str(outcome_.appointment_ref), "s1")
        assert entry_for(world.engine, "Appointment/a1").status == "cancelled"
        assert booking_rows(world.engine)[0].status == "booked"

    async def test_conflict_412(self, world: World) -> None:
        """Someone else books the slot between the offer and the transaction: 412, nothing
        changes for the patient, the next free slots come back."""
        slots = await _offer(world)

        def someone_else(ehr: FakeEHR, _request: httpx.Request) -> None:
            ehr.set("Slot/s1", status="busy")
        world.ehr.on("POST", "", someone_else)
        outcome_ = await _rebook(world, slots[0])
        assert outcome_.status == "conflict"
        assert outcome_.message and outcome_.appointment_ref is None
        assert [s.ref for s in outcome_.alternatives] == ["Slot/s2", "Slot/s3"]
        assert world.ehr.get("Appointment/a1")["status"] == "booked"
        assert world.ehr.get("Slot/old")["status"] == "busy"
        assert len(world.ehr.all("Appointment")) == 1
        (row,) = booking_rows(world.engine)
        assert row.status == "conflict" and "Slot/s1" in row.error
        assert row.method == "transaction" and row.finished_at is not None
        assert outbox_rows(world.engine) == []
        assert entry_for(world.engine, "Appointment/a1").status == "booked"

    async def test_taken_before_the_choice(self, world: World) -> None:
        """The slot was already taken when the patient chose it: no write at all."""
        slots = await _offer(world)
        world.ehr.set("Slot/s1", status="busy")
        outcome_ = await _rebook(world, slots[0])
        assert outcome_.status == "conflict"
        assert [s.ref for s in outcome_.alternatives] == ["Slot/s2", "Slot/s3"]
        assert world.ehr.writes() == []

    async def test_stale_version_but_still_free(self, world: World) -> None:
        """The old appointment changed after it was read (a 412 that is not a conflict): read
        again and book."""
        def touched(ehr: FakeEHR, _request: httpx.Request) -> None:
            ehr.set("Appointment/a1", comment="checked")
        world.ehr.on("POST", "", touched)
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "booked"
        assert world.ehr.writes() == ["POST ", "POST "]
        _assert_rebooked(world, str(outcome_.appointment_ref), "s1")

    async def test_old_appointment_cancelled_meanwhile(self, world: World) -> None:
        world.ehr.set("Appointment/a1", status="cancelled")
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "failed" and "no longer active" in outcome_.message
        assert world.ehr.get("Slot/s1")["status"] == "free"
        assert booking_rows(world.engine)[0].status == "failed"

    async def test_refused(self, world: World) -> None:
        world.ehr.on("POST", "", lambda _e, _r: httpx.Response(
            422, json=outcome("Appointment.participant: invalid")))
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "failed"
        (row,) = booking_rows(world.engine)
        assert row.status == "failed" and "participant: invalid" in row.error

    async def test_slot_in_the_past(self, world: World) -> None:
        world.ehr.set("Slot/s1", start="2030-01-09T15:00:00Z", end="2030-01-09T15:30:00Z")
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "conflict"
        assert world.ehr.writes() == []

    async def test_not_the_patients(self, world: World) -> None:
        with pytest.raises(ValueError, match="not known"):
            await world.service.rebook(patient_id="nobody", entry_id=world.entry_id,
                                       slot="Slot/s1", source="portal", now=NOW)


class TestBookOperation:
    async def test_book_when_offered(self, world: World) -> None:
        """``Appointment/$book`` with the proposed Appointment; then the old one is cancelled
        (If-Match) and its slot freed."""
        world.ehr.book_operation = True
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "booked", outcome_
        assert world.ehr.writes() == ["POST Appointment/$book", "PUT Appointment/a1",
                                      "PUT Slot/old"]
        (parameters,) = world.ehr.sent("POST", "Appointment/$book")
        (param,) = parameters["parameter"]
        assert param["name"] == "appt-resource"
        assert param["resource"]["status"] == "proposed"
        assert param["resource"]["slot"] == [{"reference": "Slot/s1"}]
        assert _if_match(world, "PUT", "Appointment/a1")
        _assert_rebooked(world, str(outcome_.appointment_ref), "s1")
        assert booking_rows(world.engine)[0].method == "book-operation"

    async def test_book_conflict(self, world: World) -> None:
        world.ehr.book_operation = True
        world.ehr.conflict_status = 409

        def someone_else(ehr: FakeEHR, _request: httpx.Request) -> None:
            ehr.set("Slot/s1", status="busy")
        world.ehr.on("POST", "Appointment/$book", someone_else)
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "conflict"
        assert [s.ref for s in outcome_.alternatives] == ["Slot/s2", "Slot/s3"]
        assert world.ehr.get("Appointment/a1")["status"] == "booked"


class TestOrdered:
    @pytest.fixture(autouse=True)
    def no_transactions(self, ehr: FakeEHR) -> None:
        ehr.transaction = False

    async def test_order_of_writes(self, world: World) -> None:
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "booked", outcome_
        assert world.ehr.writes() == ["PUT Slot/s1", "POST Appointment", "PUT Appointment/a1",
                                      "PUT Slot/old"]
        assert _if_match(world, "PUT", "Slot/s1") == 'W/"1"'
        assert _if_match(world, "PUT", "Appointment/a1")
        assert _if_match(world, "PUT", "Slot/old")
        post = next(h for m, p, h in world.ehr.log if (m, p) == ("POST", "Appointment"))
        assert post["if-none-exist"] == \
            f"identifier=urn:careloop:booking|{outcome_.booking_id}"
        _assert_rebooked(world, str(outcome_.appointment_ref), "s1")
        assert booking_rows(world.engine)[0].method == "ordered"

    async def test_slot_reverted_when_the_appointment_fails(self, world: World) -> None:
        world.ehr.on("POST", "Appointment", lambda _e, _r: httpx.Response(
            400, json=outcome("Appointment.start: bad")))
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "failed"
        assert world.ehr.writes() == ["PUT Slot/s1", "POST Appointment", "PUT Slot/s1"]
        assert world.ehr.get("Slot/s1")["status"] == "free"
        assert world.ehr.get("Appointment/a1")["status"] == "booked"
        assert len(world.ehr.all("Appointment")) == 1
        (row,) = booking_rows(world.engine)
        assert row.status == "failed" and "Appointment.start: bad" in row.error
        assert outbox_rows(world.engine) == []

    async def test_revert_owed_when_it_fails_too(self, world: World) -> None:
        world.ehr.on("POST", "Appointment", lambda _e, _r: httpx.Response(
            400, json=outcome("bad")))
        world.ehr.on("PUT", "Slot/s1", lambda _e, _r: None)  # the first PUT goes through
        world.ehr.hooks.append(("PUT", "Slot/s1", lambda _e, _r: httpx.Response(
            403, json=outcome("forbidden"))))
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "failed"
        (row,) = outbox_rows(world.engine)
        assert (row.key, row.operation, row.target, row.resource) == (
            f"booking-{outcome_.booking_id}-revert-slot", "update", "Slot/s1",
            {"status": "free"})

    async def test_conflict_409(self, world: World) -> None:
        world.ehr.conflict_status = 409

        def someone_else(ehr: FakeEHR, _request: httpx.Request) -> None:
            ehr.set("Slot/s1", status="busy")
        world.ehr.on("PUT", "Slot/s1", someone_else)
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "conflict"
        assert [s.ref for s in outcome_.alternatives] == ["Slot/s2", "Slot/s3"]
        assert world.ehr.writes() == ["PUT Slot/s1"]
        assert world.ehr.get("Appointment/a1")["status"] == "booked"

    async def test_cancel_owed_to_the_outbox(self, world: World) -> None:
        """The old appointment cannot be cancelled now: the outbox retries it, and the
        timeline shows it cancelled at once (no reminders for two appointments)."""
        for _ in range(3):
            world.ehr.on("PUT", "Appointment/a1", lambda _e, _r: httpx.Response(
                503, json=outcome("busy")))
        outcome_ = await _rebook(world, "Slot/s1")
        assert outcome_.status == "booked"
        assert world.ehr.get("Appointment/a1")["status"] == "booked"
        assert world.ehr.get("Slot/old")["status"] == "busy"
        rows = {r.key: r for r in outbox_rows(world.engine)}
        cancel = rows[f"booking-{outcome_.booking_id}-cancel-old"]
        assert (cancel.operation, cancel.target, cancel.resource["status"]) == (
            "update", "Appointment/a1", "cancelled")
        freeing = rows[f"booking-{outcome_.booking_id}-free-old-slot"]
        assert (freeing.target, freeing.resource) == ("Slot/old", {"status": "free"})
        assert entry_for(world.engine, "Appointment/a1").status == "cancelled"
        assert "owed" in (booking_rows(world.engine)[0].error or "")
        # the outbox writes them, in that order (the slot is held until the cancel is done)
        result = await flush(world.engine, world.settings, client_factory, now=NOW,
                             batch_support={})
        assert (result.written, result.failed) == (3, 0)  # with the Communication
        assert world.ehr.get("Appointment/a1")["status"] == "cancelled"
        assert world.ehr.get("Appointment/a1")["cancelationReason"]["coding"][0]["code"] == \
            "pat"
        assert world.ehr.get("Slot/old")["status"] == "free"
        assert world.ehr.writes()[-2:] == ["PUT Appointment/a1", "PUT Slot/old"]


class TestNewBooking:
    async def test_from_the_waitlist(self, world: World) -> None:
        """No appointment to replace: the patient and the schedule's actors."""
        outcome_ = await world.service.rebook(patient_id=world.patient_id, entry_id=None,
                                              slot="Slot/s3", source="waitlist", now=NOW,
                                              connection=EHR)
        assert outcome_.status == "booked"
        new = world.ehr.get(str(outcome_.appointment_ref))
        assert [p["actor"]["reference"] for p in new["participant"]] == [
            "Patient/p1", "Practitioner/pr1", "Location/loc1"]
        assert new["serviceType"] == [CHECKUP]
        assert world.ehr.get("Appointment/a1")["status"] == "booked"
        entry = entry_for(world.engine, str(outcome_.appointment_ref))
        assert entry.patient_id == world.patient_id and entry.status == "booked"
        row = booking_rows(world.engine)[0]
        assert (row.old_entry_id, row.source) == (None, "waitlist")

    async def test_conflict_alternatives_from_the_schedule(self, world: World) -> None:
        world.ehr.set("Slot/s1", status="busy")
        outcome_ = await world.service.rebook(patient_id=world.patient_id, entry_id=None,
                                              slot="Slot/s1", source="waitlist", now=NOW)
        assert outcome_.status == "conflict"
        assert [s.ref for s in outcome_.alternatives] == ["Slot/s2", "Slot/s3"]


class TestWaitlist:
    async def test_freed_slot_handed_over(self, world: World,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[dict[str, Any]] = []
        module = types.ModuleType("integration.waitlist")

        def slot_freed(conn: Any, **kw: Any) -> None:
            assert conn.in_transaction()
            calls.append(kw)
        module.slot_freed = slot_freed  # type: ignore[attr-defined]
        module.freed_key = lambda *, entry_id, start, slot_ref: slot_ref  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "integration.waitlist", module)
        await _rebook(world, "Slot/s1")
        (call,) = calls
        assert call == {
            "key": "Slot/old", "source": "rebooking", "connection": EHR,
            "slot_ref": "Slot/old", "service": "Check-up", "location": "Main Street Clinic",
            "start": datetime(2030, 2, 1, 15, tzinfo=UTC),
            "end": datetime(2030, 2, 1, 15, 30, tzinfo=UTC), "now": NOW,
            "min_notice": world.settings.waitlist.min_notice}

    async def test_freed_slot_recorded(self, world: World) -> None:
        """With the waitlist in place: one open freed slot, the same key its own consumer of
        the timeline finds for the cancelled appointment."""
        await _rebook(world, "Slot/s1")
        consume_cancellations(world.engine, world.settings, now=NOW)
        with world.engine.connect() as conn:
            rows = conn.execute(select(freed_slots)).all()
        assert [(r.key, r.source, r.slot_ref, r.status, r.service) for r in rows] == [
            ("Slot/old", "rebooking", "Slot/old", "open", "Check-up")]

    async def test_conflict_frees_nothing(self, world: World,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[Any] = []
        module = types.ModuleType("integration.waitlist")
        module.slot_freed = lambda conn, **kw: calls.append(kw)  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "integration.waitlist", module)
        world.ehr.set("Slot/s1", status="busy")
        assert (await _rebook(world, "Slot/s1")).status == "conflict"
        assert calls == []


def _if_match(world: World, method: str, path: str) -> str | None:
    for m, p, headers in world.ehr.log:
        if (m, p) == (method, path):
            return headers.get("if-match")
    return None


def _touches(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(touches).order_by(touches.c.id)))


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

