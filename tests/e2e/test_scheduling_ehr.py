"""Rebooking end to end against the stand-in EHR (SMART Backend Services required, every write
validated): Schedules and Slots seeded through its FHIR API, the patient's booked appointment
on careloop's timeline as FHIR ingestion puts it there; free slots found; a rebooking as one
transaction (and as ordered writes); exactly one new Appointment when the choice is sent twice;
a slot taken between offer and choice; two patients choosing the same slot at once; the
timeline, the reminders and the write-back afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from adapters.fhir import FHIRClient, SigningKey, save_private_key
from integration.db import write_lock
from integration.fhir_ingest import fhir_source
from integration.models import bookings, ehr_outbox, touches
from integration.outreach.reconciler import reconcile
from integration.scheduling import BOOKING_SYSTEM, Capabilities, SchedulingService
from integration.settings import Connection, Settings
from integration.timeline import apply_batch
from integration.writeback import WritebackStage
from tests.e2e.ehr import CLIENT_ID
from tests.helpers import settings_for
from tests.outreach.support import config as outreach_config
from tests.scheduling.support import entry_for

pytestmark = pytest.mark.slow

EHR = "main-ehr"
SERVICE = {"coding": [{"system": "http://example.org/service", "code": "checkup",
                       "display": "Check-up"}]}
FREE_SLOTS = 10


@dataclass
class World:
    ehr: FHIRClient
    engine: Engine
    settings: Settings
    service: SchedulingService
    day0: datetime
    """midnight UTC of the first day with slots"""
    patient: str
    """the EHR's Patient id"""
    appointment: str
    old_slot: str
    free: list[str]
    """the free Slot ids, by start"""
    entry_id: str
    patient_id: str
    """careloop's"""

    async def read(self, ref: str) -> dict[str, Any]:
        rtype, rid = ref.split("/")
        return await self.ehr.read(rtype, rid)

    async def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        return [r async for r in self.ehr.search(resource_type, {"_count": "1000", **params})]

    async def rebook(self, slot: Any, **kw: Any) -> Any:
        return await self.service.rebook(patient_id=kw.pop("patient_id", self.patient_id),
                                         entry_id=kw.pop("entry_id", self.entry_id),
                                         slot=slot, source="portal", **kw)

    async def offer(self, days: int = 3) -> Any:
        return await self.service.free_slots(self.entry_id, start=self.day0, days=days)


async def _create(client: FHIRClient, resource: dict[str, Any]) -> dict[str, Any]:
    created = (await client.create(resource)).resource
    assert created is not None
    return created


async def _patient_with_appointment(client: FHIRClient, mrn: str, practitioner: str,
                                    location: str, slot: dict[str, Any]) -> tuple[dict[str, Any],
                                                                                   dict[str, Any]]:
    patient = await _create(client, {
        "resourceType": "Patient", "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5",
                                                   "value": mrn}],
        "name": [{"family": "Doe", "given": ["Jane"]}],
        "telecom": [{"system": "phone", "value": "+15555550101", "use": "mobile"},
                    {"system": "email", "value": "jane@example.org"}]})
    appointment = await _create(client, {
        "resourceType": "Appointment", "status": "booked",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.6", "value": f"APT-{mrn}"}],
        "serviceType": [SERVICE], "start": slot["start"], "end": slot["end"],
        "slot": [{"reference": f"Slot/{slot['id']}"}],
        "participant": [
            {"actor": {"reference": f"Patient/{patient['id']}"}, "status": "accepted"},
            {"actor": {"reference": f"Practitioner/{practitioner}"}, "status": "accepted"},
            {"actor": {"reference": f"Location/{location}"}, "status": "accepted"}]})
    return patient, appointment


def _ingest(engine: Engine, *resources: dict[str, Any]) -> None:
    """On the timeline as FHIR ingestion puts resources read from the EHR."""
    now = datetime.now(UTC)
    with write_lock(engine), engine.begin() as conn:
        apply_batch(conn, [([r], fhir_source(EHR, r, fallback=now)) for r in resources], now)


@pytest.fixture
async def world(ehr_origin: str, key: SigningKey, tmp_path: Path,
                engine: Engine) -> AsyncIterator[World]:
    base = f"{ehr_origin}/fhir/R4"
    pem = save_private_key(key, tmp_path / "careloop.pem")
    connection = Connection(name=EHR, fhir_base=base, client_id=CLIENT_ID, private_key=pem,
                            scopes=("system/*.*",), mode="poll", scheduling="slots")
    settings = settings_for(engine.url.render_as_string(hide_password=False),
                            connections=(connection,), timezone="America/New_York")
    async with httpx.AsyncClient(base_url=ehr_origin) as admin:
        (await admin.post("/_admin/reset")).raise_for_status()
    client = FHIRClient.connect(fhir_base=base, client_id=CLIENT_ID, private_key=pem,
                                scopes=["system/*.*"])
    service = SchedulingService(engine, settings)
    async with client:
        practitioner = await _create(client, {"resourceType": "Practitioner",
                                              "name": [{"family": "Smith"}]})
        location = await _create(client, {"resourceType": "Location",
                                          "name": "Main Street Clinic"})
        schedule = await _create(client, {
            "resourceType": "Schedule", "active": True, "serviceType": [SERVICE],
            "actor": [{"reference": f"Practitioner/{practitioner['id']}"},
                      {"reference": f"Location/{location['id']}"}]})
        day0 = (datetime.now(UTC) + timedelta(days=10)).replace(hour=0, minute=0, second=0,
                                                               microsecond=0)
        slots = []
        for n in range(FREE_SLOTS + 1):  # over three days; the first is the patient's
            start = day0 + timedelta(days=n % 3, hours=15 + n // 3)
            slots.append(await _create(client, {
                "resourceType": "Slot", "schedule": {"reference": f"Schedule/{schedule['id']}"},
                "status": "busy" if n == 0 else "free", "serviceType": [SERVICE],
                "start": start.isoformat().replace("+00:00", "Z"),
                "end": (start + timedelta(minutes=30)).isoformat().replace("+00:00", "Z")}))
        patient, appointment = await _patient_with_appointment(
            client, "MRN-1", practitioner["id"], location["id"], slots[0])
        _ingest(engine, patient, appointment)
        entry = entry_for(engine, f"Appointment/{appointment['id']}")
        free = [s["id"] for s in sorted(slots[1:], key=lambda s: s["start"])]
        yield World(client, engine, settings, service, day0, patient["id"], appointment["id"],
                    slots[0]["id"], free, str(entry.id), str(entry.patient_id))
        await service.aclose()


async def _unchanged(world: World) -> None:
    assert (await world.read(f"Appointment/{world.appointment}"))["status"] == "booked"
    assert (await world.read(f"Slot/{world.old_slot}"))["status"] == "busy"
    assert len(await world.search("Appointment", patient=f"Patient/{world.patient}")) == 1


async def _rebooked(world: World, outcome: Any, slot: str) -> None:
    assert outcome.status == "booked", outcome
    new = await world.read(outcome.appointment_ref)
    assert new["status"] == "booked"
    assert new["slot"] == [{"reference": f"Slot/{slot}"}]
    assert (await world.read(f"Slot/{slot}"))["status"] == "busy"
    old = await world.read(f"Appointment/{world.appointment}")
    assert old["status"] == "cancelled"
    assert old["cancelationReason"]["coding"][0]["code"] == "pat"
    assert (await world.read(f"Slot/{world.old_slot}"))["status"] == "free"
    mine = await world.search("Appointment", patient=f"Patient/{world.patient}")
    assert sorted(a["status"] for a in mine) == ["booked", "cancelled"]


async def test_free_slots(world: World) -> None:
    slots = await world.offer()
    assert [s.ref for s in slots] == [f"Slot/{s}" for s in world.free]
    assert all(s.service == "Check-up" and s.location == "Main Street Clinic" for s in slots)
    assert [s.start for s in slots] == sorted(s.start for s in slots)
    assert all(s.version for s in slots)
    one_day = await world.offer(days=1)
    assert 0 < len(one_day) < len(slots)


async def test_rebook(world: World) -> None:
    """One transaction: in the EHR the new Appointment holds the chosen slot (busy), the old
    one is cancelled and its slot free; sent twice, still one new Appointment; the timeline,
    the reminders and the write-back follow."""
    cfg = outreach_config()
    reconcile(world.engine, cfg)
    before = _touches(world.engine)
    assert {t.entry_id for t in before} == {world.entry_id}
    assert {t.status for t in before} == {"scheduled"}
    chosen = (await world.offer())[3]
    outcome = await world.rebook(chosen)
    await _rebooked(world, outcome, chosen.ref.split("/")[1])
    assert outcome.start == chosen.start
    again = await world.rebook(chosen)
    assert (again.status, again.appointment_ref) == ("booked", outcome.appointment_ref)
    ours = await world.search("Appointment",
                              identifier=f"{BOOKING_SYSTEM}|{outcome.booking_id}")
    assert len(ours) == 1
    with world.engine.connect() as conn:
        (row,) = conn.execute(select(bookings)).all()
    assert (row.status, row.method, row.new_appointment_ref) == (
        "booked", "transaction", outcome.appointment_ref)

    # the timeline: the new time booked, the old one cancelled; the reminders follow
    assert entry_for(world.engine, f"Appointment/{world.appointment}").status == "cancelled"
    new_entry = entry_for(world.engine, str(outcome.appointment_ref))
    assert new_entry.status == "booked"
    assert new_entry.time.replace(tzinfo=UTC) == chosen.start
    reconcile(world.engine, cfg)
    after = _touches(world.engine)
    assert {t.status for t in after if t.entry_id == world.entry_id} == {"cancelled"}
    assert {t.status for t in after if t.entry_id == new_entry.id} == {"scheduled"}

    # the write-back: the Communication is accepted by the EHR as written
    stage = WritebackStage(world.engine, world.settings)
    try:
        await asyncio.to_thread(stage.run_once)
    finally:
        await asyncio.to_thread(stage.stop)
    with world.engine.connect() as conn:
        (written,) = conn.execute(select(ehr_outbox)).all()
    assert written.status == "written", written.last_error
    communication = await world.read(str(written.ehr_ref))
    assert communication["about"] == [{"reference": outcome.appointment_ref}]
    assert communication["payload"][0]["contentString"].startswith(
        "Rebooked by the patient from portal: ")


async def test_slot_taken_between_offer_and_choice(world: World) -> None:
    """Someone books the slot in the EHR after it was offered: the patient gets the next
    choices, and nothing changes for them."""
    offered = await world.offer()
    chosen = offered[0]
    taken = await world.read(chosen.ref)
    taken["status"] = "busy"
    await world.ehr.update(taken, if_match=True)
    outcome = await world.rebook(chosen)
    assert outcome.status == "conflict"
    assert outcome.alternatives
    assert chosen.ref not in {s.ref for s in outcome.alternatives}
    assert {s.ref for s in outcome.alternatives} <= {s.ref for s in offered}
    await _unchanged(world)
    assert entry_for(world.engine, f"Appointment/{world.appointment}").status == "booked"
    # the patient picks one of the alternatives
    second = await world.rebook(outcome.alternatives[0])
    await _rebooked(world, second, outcome.alternatives[0].ref.split("/")[1])


async def test_two_patients_one_slot(world: World) -> None:
    """Two patients choose the same slot at the same moment: one gets it, the other the next
    choices; the slot is booked once."""
    first = await world.read(f"Slot/{world.free[-1]}")  # a slot of its own for the other's
    first["status"] = "busy"
    await world.ehr.update(first, if_match=True)
    practitioner = location = ""
    old = await world.read(f"Appointment/{world.appointment}")
    for p in old["participant"]:
        ref = p["actor"]["reference"]
        if ref.startswith("Practitioner/"):
            practitioner = ref.split("/")[1]
        if ref.startswith("Location/"):
            location = ref.split("/")[1]
    patient2, appointment2 = await _patient_with_appointment(
        world.ehr, "MRN-2", practitioner, location, first)
    _ingest(world.engine, patient2, appointment2)
    entry2 = entry_for(world.engine, f"Appointment/{appointment2['id']}")
    wanted = f"Slot/{world.free[0]}"
    results = await asyncio.gather(
        world.rebook(wanted),
        world.rebook(wanted, patient_id=str(entry2.patient_id), entry_id=str(entry2.id)))
    assert sorted(r.status for r in results) == ["booked", "conflict"]
    holders = await world.search("Appointment", slot=wanted)
    assert [a["status"] for a in holders] == ["booked"]
    loser = next(r for r in results if r.status == "conflict")
    assert loser.alternatives and wanted not in {s.ref for s in loser.alternatives}


async def test_ordered_writes(world: World) -> None:
    """A server taken as not accepting transactions: the same result by ordered conditional
    writes, version-checked by the real server."""
    world.service._capabilities[f"{EHR}|{world.settings.connections[0].fhir_base}"] = \
        Capabilities()
    chosen = (await world.offer())[1]
    outcome = await world.rebook(chosen)
    await _rebooked(world, outcome, chosen.ref.split("/")[1])
    with world.engine.connect() as conn:
        assert conn.execute(select(bookings.c.method)).scalar_one() == "ordered"


def _touches(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(touches).order_by(touches.c.id)))
