"""Waitlist backfill end to end against the stand-in EHR (SMART Backend Services required, every
write validated): a patient's appointment cancelled in the EHR frees its Slot, the two patients
waiting for an earlier slot of the same service are offered it by SMS, and both accept at the
same moment: one booking in the EHR (the new Appointment holds the Slot, the winner's later
appointment is cancelled and its Slot free), one "taken" answer, and the loser keeps their
appointment and their place on the waitlist.

The acceptances race on one event loop (``asyncio.gather``) and, as two processes would, from
two threads each with its own event loop, engine and scheduling service."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from adapters.channels import Channel
from adapters.fhir import FHIRClient, SigningKey, save_private_key
from integration.db import create_db_engine, write_lock
from integration.delivery import build_channels, link_signer
from integration.fhir_ingest import default_client
from integration.models import bookings, freed_slots, waitlist_entries, waitlist_offers
from integration.scheduling import SchedulingService
from integration.settings import Connection, Settings
from integration.waitlist import AcceptOutcome, accept, consume_cancellations, join, offer_round
from tests.e2e.ehr import CLIENT_ID
from tests.e2e.test_scheduling_ehr import EHR, SERVICE, _create, _ingest
from tests.helpers import settings_for
from tests.scheduling.support import entry_for

pytestmark = pytest.mark.slow

MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5"
APPOINTMENT_SYSTEM = "urn:oid:2.16.840.1.113883.19.6"


@dataclass(frozen=True)
class Holder:
    """A patient holding a booked appointment, in the EHR and on careloop's timeline."""

    patient: str
    """the EHR's Patient id"""
    appointment: str
    slot: str
    """the EHR's Slot id the appointment holds"""
    start: datetime
    entry_id: str
    patient_id: str
    """careloop's"""


@dataclass
class World:
    ehr: FHIRClient
    engine: Engine
    settings: Settings
    channels: dict[str, Channel]
    outbox: Path
    x: Holder
    """cancels the appointment tomorrow"""
    a: Holder
    b: Holder
    """both waiting for an earlier slot than their appointment next week"""
    waitlist: dict[str, int]
    """careloop patient id → waitlist id"""
    offers: dict[str, int]
    """careloop patient id → offer id"""

    async def read(self, ref: str) -> dict[str, Any]:
        rtype, rid = ref.split("/")
        return await self.ehr.read(rtype, rid)

    async def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        return [r async for r in self.ehr.search(resource_type, {"_count": "1000", **params})]

    def scheduling(self, engine: Engine | None = None) -> SchedulingService:
        """A real scheduling service whose FHIR clients authenticate to the EHR (SMART
        Backend Services with the connection's key)."""
        return SchedulingService(engine or self.engine, self.settings,
                                 client_factory=default_client)

    def sent(self, prefix: str) -> list[dict[str, Any]]:
        """SMS written by the file channel whose key starts with ``prefix``."""
        found = [json.loads(p.read_text()) for p in sorted(self.outbox.rglob("*.json"))]
        return sorted((m for m in found if m["key"].startswith(prefix)),
                      key=lambda m: str(m["key"]))


def _instant(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def _holder(client: FHIRClient, engine: Engine, *, mrn: str, phone: str,
                  practitioner: str, location: str, slot: dict[str, Any]) -> Holder:
    """A patient with a mobile phone and a booked check-up in ``slot``, both on the timeline
    as FHIR ingestion puts them (the Appointment with its ``slot`` reference)."""
    patient = await _create(client, {
        "resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
        "name": [{"family": "Doe", "given": [mrn]}],
        "telecom": [{"system": "phone", "value": phone, "use": "mobile"}]})
    appointment = await _create(client, {
        "resourceType": "Appointment", "status": "booked",
        "identifier": [{"system": APPOINTMENT_SYSTEM, "value": f"APT-{mrn}"}],
        "serviceType": [SERVICE], "start": slot["start"], "end": slot["end"],
        "slot": [{"reference": f"Slot/{slot['id']}"}],
        "participant": [
            {"actor": {"reference": f"Patient/{patient['id']}"}, "status": "accepted"},
            {"actor": {"reference": f"Practitioner/{practitioner}"}, "status": "accepted"},
            {"actor": {"reference": f"Location/{location}", "display": "Main Street Clinic"},
             "status": "accepted"}]})
    _ingest(engine, patient, appointment)
    entry = entry_for(engine, f"Appointment/{appointment['id']}")
    assert entry.status == "booked"
    return Holder(patient["id"], appointment["id"], slot["id"],
                  datetime.fromisoformat(slot["start"].replace("Z", "+00:00")),
                  str(entry.id), str(entry.patient_id))


def _join(engine: Engine, settings: Settings, holder: Holder) -> int:
    with write_lock(engine), engine.begin() as conn:
        return join(conn, settings, patient_id=holder.patient_id, entry_id=holder.entry_id,
                    now=datetime.now(UTC))


def _rows(engine: Engine, table: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(table).order_by(table.c.id)))


@pytest.fixture
async def world(ehr_origin: str, key: SigningKey, tmp_path: Path,
                engine: Engine) -> AsyncIterator[World]:
    """Steps 1 to 3: the EHR seeded, A and B on the waitlist, X's appointment cancelled in the
    EHR and on the timeline, its slot freed and offered to A and B by SMS."""
    base = f"{ehr_origin}/fhir/R4"
    pem = save_private_key(key, tmp_path / "careloop.pem")
    connection = Connection(name=EHR, fhir_base=base, client_id=CLIENT_ID, private_key=pem,
                            scopes=("system/*.*",), mode="poll", scheduling="slots")
    outbox = tmp_path / "outbox"
    settings = settings_for(
        engine.url.render_as_string(hide_password=False), connections=(connection,),
        timezone="America/New_York", base_url="https://careloop.example",
        default_language="en", keys_dir=tmp_path / "keys",
        organization={"name": "Example Clinic", "phone": "+1 555 0100"},
        channels={"sms": {"provider": "file"}, "email": {"provider": "file"},
                  "voice": {"provider": "file"}, "portal": {"secret": "s" * 32}},
        outreach={"quiet_hours": "off", "outbox_dir": outbox},
        waitlist={"wave": 3, "min_notice": "PT2H", "offer_ttl": "PT2H"})
    channels = build_channels(settings)
    async with httpx.AsyncClient(base_url=ehr_origin) as admin:
        (await admin.post("/_admin/reset")).raise_for_status()
    client = FHIRClient.connect(fhir_base=base, client_id=CLIENT_ID, private_key=pem,
                                scopes=["system/*.*"])
    async with client:
        # 1. a Schedule with Slots: X's tomorrow, A's and B's next week, and free ones
        practitioner = await _create(client, {"resourceType": "Practitioner",
                                              "name": [{"family": "Smith"}]})
        location = await _create(client, {"resourceType": "Location",
                                          "name": "Main Street Clinic"})
        schedule = await _create(client, {
            "resourceType": "Schedule", "active": True, "serviceType": [SERVICE],
            "actor": [{"reference": f"Practitioner/{practitioner['id']}"},
                      {"reference": f"Location/{location['id']}"}]})
        soon = (datetime.now(UTC) + timedelta(days=1)).replace(minute=0, second=0,
                                                              microsecond=0)
        later = soon + timedelta(days=7)
        starts = [(soon, "busy"), (later, "busy"), (later + timedelta(hours=1), "busy"),
                  (soon + timedelta(hours=1), "free"), (soon + timedelta(hours=2), "free"),
                  (later + timedelta(hours=2), "free")]
        slots = [await _create(client, {
            "resourceType": "Slot", "schedule": {"reference": f"Schedule/{schedule['id']}"},
            "status": status, "serviceType": [SERVICE], "start": _instant(start),
            "end": _instant(start + timedelta(minutes=30))}) for start, status in starts]
        people = [await _holder(client, engine, mrn=mrn, phone=phone,
                                practitioner=practitioner["id"], location=location["id"],
                                slot=slot)
                  for mrn, phone, slot in (("MRN-X", "+15555550100", slots[0]),
                                           ("MRN-A", "+15555550101", slots[1]),
                                           ("MRN-B", "+15555550102", slots[2]))]
        x, a, b = people
        assert len({h.patient_id for h in people}) == 3

        # 2. A and B join the waitlist for an earlier check-up
        waitlist = {h.patient_id: _join(engine, settings, h) for h in (a, b)}
        assert consume_cancellations(engine, settings) == 0  # bookings free nothing

        # 3. X's appointment is cancelled in the EHR, its Slot set free; ingestion brings the
        # cancelled version to the timeline
        old = await client.read("Appointment", x.appointment)
        old["status"] = "cancelled"
        old["cancelationReason"] = {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason",
            "code": "pat"}]}
        cancelled = (await client.update(old, if_match=True)).resource
        assert cancelled is not None and cancelled["status"] == "cancelled"
        slot_x = await client.read("Slot", x.slot)
        slot_x["status"] = "free"
        await client.update(slot_x, if_match=True)
        _ingest(engine, cancelled)
        assert entry_for(engine, f"Appointment/{x.appointment}").status == "cancelled"

        assert consume_cancellations(engine, settings) == 1
        (freed,) = _rows(engine, freed_slots)
        assert (freed.key, freed.slot_ref, freed.source, freed.connection, freed.status) == (
            f"Slot/{x.slot}", f"Slot/{x.slot}", "fhir", EHR, "open")
        assert freed.service == "checkup"
        assert freed.location == f"Location/{location['id']}"
        assert freed.start.replace(tzinfo=UTC) == soon
        assert consume_cancellations(engine, settings) == 0  # consumed once

        round_ = offer_round(engine, settings, channels)
        assert (round_.offered, round_.skipped) == (2, 0)
        offered = _rows(engine, waitlist_offers)
        assert sorted(o.patient_id for o in offered) == sorted(waitlist)
        assert {(o.status, o.channel, o.slot_id) for o in offered} == {
            ("offered", "sms", freed.id)}
        assert {o.waitlist_id for o in offered} == set(waitlist.values())
        offers = {str(o.patient_id): int(o.id) for o in offered}
        world = World(client, engine, settings, channels, outbox, x, a, b, waitlist, offers)

        messages = world.sent("offer:")
        assert [m["key"] for m in messages] == sorted(f"offer:{o}" for o in offers.values())
        phones = {a.patient_id: "+15555550101", b.patient_id: "+15555550102"}
        signer = link_signer(settings)
        for patient_id, offer_id in offers.items():
            (message,) = [m for m in messages if m["key"] == f"offer:{offer_id}"]
            assert (message["channel"], message["address"]) == ("sms", phones[patient_id])
            tokens = re.findall(r"https://careloop\.example/p/(\S+)", message["body"])
            assert len(tokens) == 1, message["body"]
            link = signer.read(tokens[0], now=datetime.now(UTC))
            assert (link.kind, link.ident) == ("o", str(offer_id))
        assert world.sent("offer-taken:") == []
        assert {s["status"] for s in await world.search("Slot", schedule=f"Schedule/"
                                                        f"{schedule['id']}")} == {"free",
                                                                                  "busy"}
        yield world


async def _check(world: World, outcomes: Sequence[AcceptOutcome],
                 patients: Sequence[str]) -> None:
    """Step 4's assertions; ``outcomes[i]`` is the answer to ``patients[i]``'s acceptance."""
    assert sorted(o.status for o in outcomes) == ["booked", "taken"], outcomes
    winner = patients[[o.status for o in outcomes].index("booked")]
    loser = patients[[o.status for o in outcomes].index("taken")]
    holders = {world.a.patient_id: world.a, world.b.patient_id: world.b}
    won, lost = holders[winner], holders[loser]
    booked = outcomes[[o.status for o in outcomes].index("booked")]
    assert booked.slot_start == world.x.start

    # careloop: the slot filled by the winner's offer, one booking, the loser still waiting
    (slot,) = [s for s in _rows(world.engine, freed_slots) if s.key == f"Slot/{world.x.slot}"]
    assert (slot.status, slot.filled_by) == ("filled", world.offers[winner])
    statuses = {str(o.patient_id): o.status for o in _rows(world.engine, waitlist_offers)}
    assert statuses == {winner: "accepted", loser: "taken"}
    entries = {str(w.patient_id): w.status for w in _rows(world.engine, waitlist_entries)}
    assert entries == {winner: "booked", loser: "active"}
    (booking,) = _rows(world.engine, bookings)
    assert (booking.patient_id, booking.old_entry_id, booking.slot_ref, booking.source,
            booking.status) == (winner, won.entry_id, f"Slot/{world.x.slot}", "waitlist",
                                "booked")

    # the EHR: exactly one new Appointment holds the freed Slot, which is busy
    holding = [r for r in await world.search("Appointment", slot=f"Slot/{world.x.slot}")
               if r["id"] != world.x.appointment]
    assert len(holding) == 1, holding
    (new,) = holding
    assert f"Appointment/{new['id']}" == booking.new_appointment_ref
    assert new["status"] == "booked"
    assert new["slot"] == [{"reference": f"Slot/{world.x.slot}"}]
    assert {"reference": f"Patient/{won.patient}"} in [p["actor"] for p in new["participant"]]
    assert (await world.read(f"Slot/{world.x.slot}"))["status"] == "busy"
    # the winner's later appointment is cancelled and its Slot free
    assert (await world.read(f"Appointment/{won.appointment}"))["status"] == "cancelled"
    assert (await world.read(f"Slot/{won.slot}"))["status"] == "free"
    mine = await world.search("Appointment", patient=f"Patient/{won.patient}")
    assert sorted(r["status"] for r in mine) == ["booked", "cancelled"]
    # the loser keeps theirs
    theirs = await world.search("Appointment", patient=f"Patient/{lost.patient}")
    assert [(r["id"], r["status"]) for r in theirs] == [(lost.appointment, "booked")]
    assert (await world.read(f"Slot/{lost.slot}"))["status"] == "busy"

    # the loser was told it was taken, the winner was not
    (taken,) = world.sent("offer-taken:")
    assert taken["key"] == f"offer-taken:{world.offers[loser]}"
    assert (taken["channel"], taken["address"]) == ("sms", "+15555550102" if lost is world.b
                                                    else "+15555550101")
    assert "taken" in taken["body"]

    # the timeline: the winner's new appointment booked at the freed time, the old cancelled
    entry = entry_for(world.engine, f"Appointment/{new['id']}")
    assert (entry.status, str(entry.patient_id)) == ("booked", winner)
    assert entry.time.replace(tzinfo=UTC) == world.x.start
    assert entry_for(world.engine, f"Appointment/{won.appointment}").status == "cancelled"
    assert entry_for(world.engine, f"Appointment/{lost.appointment}").status == "booked"

    # the rebooking freed the winner's old slot for the waitlist, once: the cancellation seen
    # again on the timeline is the same freed slot
    again = [s for s in _rows(world.engine, freed_slots) if s.key == f"Slot/{won.slot}"]
    assert [(s.source, s.status) for s in again] == [("rebooking", "open")]
    assert consume_cancellations(world.engine, world.settings) == 0
    assert len(_rows(world.engine, freed_slots)) == 2


async def test_two_acceptances_at_once(world: World) -> None:
    """A and B accept on one event loop at the same moment: one booking, one "taken"."""
    scheduling = world.scheduling()
    now = datetime.now(UTC)
    patients = [world.a.patient_id, world.b.patient_id]
    try:
        outcomes = await asyncio.gather(*(
            accept(world.engine, world.settings, world.channels, scheduling,
                   offer_id=world.offers[p], now=now) for p in patients))
    finally:
        await scheduling.aclose()
    await _check(world, outcomes, patients)


async def test_two_acceptances_from_two_threads(world: World, db_url: str) -> None:
    """A and B accept from two threads at the same moment, each with its own event loop,
    engine and scheduling service (as two processes would): one booking, one "taken"."""
    patients = [world.a.patient_id, world.b.patient_id]
    barrier = threading.Barrier(len(patients))
    outcomes: list[AcceptOutcome | None] = [None] * len(patients)
    errors: list[BaseException] = []
    now = datetime.now(UTC)

    async def run_one(own: Engine, offer_id: int) -> AcceptOutcome:
        scheduling = world.scheduling(own)
        try:
            return await accept(own, world.settings, world.channels, scheduling,
                                offer_id=offer_id, now=now)
        finally:
            await scheduling.aclose()

    def run(k: int, offer_id: int) -> None:
        own = create_db_engine(db_url)
        try:
            barrier.wait(10)
            outcomes[k] = asyncio.run(run_one(own, offer_id))
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=run, args=(k, world.offers[p]))
               for k, p in enumerate(patients)]
    def join_all() -> None:
        for t in threads:
            t.join(30)

    for t in threads:
        t.start()
    await asyncio.to_thread(join_all)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    done = [o for o in outcomes if o is not None]
    assert len(done) == len(patients)
    await _check(world, done, patients)
