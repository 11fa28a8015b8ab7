"""A world for the scheduling tests: a fake EHR (respx) seeded with a practitioner, a location,
two Schedules (check-ups by the practitioner at the clinic, dental at the clinic), Slots over a
few days, a patient and her booked check-up holding one Slot; that appointment on careloop's
timeline as FHIR ingestion puts it there."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select

from adapters.fhir import FHIRApi, FHIRClient, RetryPolicy
from integration.db import write_lock
from integration.fhir_ingest import fhir_source
from integration.models import bookings, ehr_outbox, entry_sources, timeline_entries
from integration.scheduling import SchedulingService
from integration.settings import Connection, Settings
from integration.timeline import apply_batch
from tests.helpers import settings_for
from tests.scheduling.fake_ehr import BASE, FakeEHR

EHR = "main-ehr"
NOW = datetime(2030, 1, 10, 15, 0, tzinfo=UTC)
SERVICE = "http://example.org/service"
CHECKUP = {"coding": [{"system": SERVICE, "code": "checkup", "display": "Check-up"}]}
DENTAL = {"coding": [{"system": SERVICE, "code": "dental", "display": "Dental"}]}
MRN = "urn:oid:2.16.840.1.113883.19.5"

FREE = ("s1", "s2", "s3")
"""The free check-up slots inside the first week, by start."""


class _NoSleep:
    async def __call__(self, _seconds: float) -> None:
        return None


def client_factory(_connection: Connection) -> FHIRApi:
    return FHIRClient(BASE, sleep=_NoSleep(), rng=lambda: 0.0,
                      retry=RetryPolicy(attempts=2))


def connection(name: str = EHR, **values: Any) -> Connection:
    return Connection(name=name, fhir_base=BASE, client_id="careloop", mode="poll",
                      **{"scheduling": "slots", **values})


def settings(url: str, *connections: Connection, **values: Any) -> Settings:
    return settings_for(url, connections=connections or (connection(),),
                        timezone="America/New_York", **values)


def _slot(sid: str, schedule: str, start: str, end: str, *, status: str = "free",
          service: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"resourceType": "Slot", "id": sid, "schedule": {"reference": f"Schedule/{schedule}"},
            "status": status, "start": start, "end": end, "serviceType": [service or CHECKUP]}


def seed(ehr: FakeEHR) -> None:
    ehr.add({"resourceType": "Practitioner", "id": "pr1", "name": [{"family": "Smith"}]})
    ehr.add({"resourceType": "Practitioner", "id": "pr2", "name": [{"family": "Jones"}]})
    ehr.add({"resourceType": "Location", "id": "loc1", "name": "Main Street Clinic"})
    ehr.add({"resourceType": "Schedule", "id": "sch1", "active": True, "serviceType": [CHECKUP],
             "actor": [{"reference": "Practitioner/pr1"}, {"reference": "Location/loc1"}]})
    ehr.add({"resourceType": "Schedule", "id": "sch2", "active": True, "serviceType": [DENTAL],
             "actor": [{"reference": "Location/loc1"}]})
    ehr.add({"resourceType": "Schedule", "id": "sch3", "active": True, "serviceType": [CHECKUP],
             "actor": [{"reference": "Practitioner/pr2"}]})
    for slot in (
        _slot("old", "sch1", "2030-02-01T15:00:00Z", "2030-02-01T15:30:00Z", status="busy"),
        _slot("s1", "sch1", "2030-02-02T15:00:00Z", "2030-02-02T15:30:00Z"),
        _slot("s2", "sch1", "2030-02-02T16:00:00Z", "2030-02-02T16:30:00Z"),
        _slot("taken", "sch1", "2030-02-03T14:00:00Z", "2030-02-03T14:30:00Z", status="busy"),
        _slot("s3", "sch1", "2030-02-03T15:00:00Z", "2030-02-03T15:30:00Z"),
        _slot("d1", "sch2", "2030-02-02T10:00:00Z", "2030-02-02T10:30:00Z", service=DENTAL),
        _slot("far", "sch1", "2030-02-20T15:00:00Z", "2030-02-20T15:30:00Z"),
        _slot("j1", "sch3", "2030-02-04T15:00:00Z", "2030-02-04T15:30:00Z"),
    ):
        ehr.add(slot)
    ehr.add({"resourceType": "Patient", "id": "p1",
             "identifier": [{"system": MRN, "value": "MRN-1"}],
             "name": [{"family": "Doe", "given": ["Jane"]}],
             "telecom": [{"system": "phone", "value": "+15555550101", "use": "mobile"},
                         {"system": "email", "value": "jane@example.org"}]})
    ehr.add({"resourceType": "Appointment", "id": "a1", "status": "booked",
             "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.6", "value": "APT-1"}],
             "serviceType": [CHECKUP], "reasonCode": [{"text": "annual check-up"}],
             "start": "2030-02-01T15:00:00Z", "end": "2030-02-01T15:30:00Z",
             "slot": [{"reference": "Slot/old"}],
             "participant": [
                 {"actor": {"reference": "Patient/p1"}, "status": "accepted"},
                 {"actor": {"reference": "Practitioner/pr1"}, "status": "accepted"},
                 {"actor": {"reference": "Location/loc1", "display": "Main Street Clinic"},
                  "status": "accepted"}]})


def ingest(engine: Engine, ehr: FakeEHR, *refs: str, connection: str = EHR) -> None:
    """Put EHR resources on the timeline as FHIR ingestion does."""
    with write_lock(engine), engine.begin() as conn:
        apply_batch(conn, [([r], fhir_source(connection, r, fallback=NOW))
                           for r in (ehr.get(ref) for ref in refs)], NOW)


def entry_for(engine: Engine, ref: str) -> Any:
    """The timeline entry (row) a FHIR resource is on."""
    with engine.connect() as conn:
        row = conn.execute(select(entry_sources.c.entry_id).where(
            entry_sources.c.ref.like(f"{ref}/%") | entry_sources.c.ref.like(f"{ref}@%"))
            .order_by(entry_sources.c.id.desc())).first()
        assert row is not None, ref
        return conn.execute(select(timeline_entries).where(
            timeline_entries.c.id == row.entry_id)).one()


def booking_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(bookings).order_by(bookings.c.id)))


def outbox_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(ehr_outbox).order_by(ehr_outbox.c.id)))


@dataclass
class World:
    ehr: FakeEHR
    engine: Engine
    settings: Settings
    service: SchedulingService
    patient_id: str
    entry_id: str

    def appointments(self, booking: int | None = None) -> list[dict[str, Any]]:
        found = self.ehr.all("Appointment")
        if booking is None:
            return found
        return [a for a in found if {"system": "urn:careloop:booking", "value": str(booking)}
                in (a.get("identifier") or [])]
