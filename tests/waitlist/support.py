"""Builders for the waitlist tests: patients and appointments pushed through the real HL7 v2
pipeline (SIU S12 bookings, S15 cancellations), FHIR Appointments with Slots put on the
timeline as FHIR ingestion does, settings, file channels and a fake scheduling service.

Time is passed explicitly, in America/New_York (the settings' zone), so UTC slips show.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from adapters.channels import Channel, FileChannel
from integration.db import write_lock
from integration.fhir_ingest import fhir_source
from integration.models import (
    freed_slots,
    patient_requests,
    timeline_entries,
    waitlist_entries,
    waitlist_offers,
)
from integration.settings import Settings
from integration.timeline import apply_batch
from integration.waitlist import join
from tests.helpers import settings_for
from tests.outreach.support import hl7_time, msh, ny, receive

BASE = "https://careloop.example"
CONNECTION = {"name": "ehr1", "fhir_base": "http://ehr.invalid/fhir", "client_id": "careloop",
              "mode": "classic"}
T0 = ny(2026, 3, 1, 9, 0)
"""Sunday 1 March 2026, 09:00 in New York: outside quiet hours (21:00-08:00)."""
CHECKUP = "CHECKUP^Check-up^L"
CLINIC = "CLINIC1^^^MAIN^^^^^Main Street Clinic"


def make_settings(db_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "base_url": BASE,
        "timezone": "America/New_York",
        "default_language": "en",
        "organization": {"name": "Example Clinic", "phone": "+1 555 0100"},
        "channels": {"portal": {"secret": "s" * 32}},
        "keys_dir": tmp_path / "keys",
        "connections": [CONNECTION],
        "outreach": {"outbox_dir": tmp_path / "outbox"},
    }
    values.update(overrides)
    return settings_for(db_url, **values)


def channels(tmp_path: Path) -> dict[str, Channel]:
    return {name: FileChannel(tmp_path / "sent" / name) for name in ("sms", "email", "voice")}


def sent(tmp_path: Path, prefix: str = "") -> list[dict[str, Any]]:
    """Messages written by the file channels (key prefix ``offer:`` or ``offer-taken:``)."""
    found = [json.loads(p.read_text()) for p in sorted((tmp_path / "sent").rglob("*.json"))]
    return sorted((m for m in found if m["key"].startswith(prefix)), key=lambda m: m["key"])


def siu(trigger: str, control: str, *, filler: str, start: datetime, sent_at: datetime,
        mrn: str, lang: str = "en^English^HL70296", phone: str | None = "5550101",
        email: str | None = None, service: str = CHECKUP, location: str = CLINIC,
        minutes: int = 30) -> bytes:
    """An SIU message like :func:`tests.outreach.support.siu`, with the patient's own phone,
    email, service (AIS-3) and location (AIL-3)."""
    end = start + timedelta(minutes=minutes)
    telecom = [f"^PRN^CP^^1^555^{phone}"] if phone else []
    if email:
        telecom.append(f"^NET^Internet^{email}")
    segments = [
        msh(f"SIU^{trigger}^SIU_S12", control, sent_at),
        f"SCH|P{filler}|{filler}|||||||{minutes}|min|^^{minutes}^{hl7_time(start)}"
        f"^{hl7_time(end)}",
        f"PID|1||{mrn}^^^HOSP^MR||Doe^{mrn}||19800101|F|||||{'~'.join(telecom)}||{lang}",
        "RGS|1|A",
        f"AIS|1||{service}",
        f"AIL|1||{location}|",
    ]
    return ("\r".join(segments) + "\r").encode()


_controls = iter(range(1, 1_000_000))


def book(engine: Engine, *, filler: str, mrn: str, start: datetime, at: datetime = T0,
         **values: Any) -> str:
    """An S12 booking through the real pipeline; returns the appointment's entry id."""
    receive(engine, siu("S12", f"B{next(_controls)}", filler=filler, start=start, sent_at=at,
                        mrn=mrn, **values), at)
    return appointment(engine, filler)


def cancel(engine: Engine, *, filler: str, mrn: str, start: datetime, at: datetime,
           **values: Any) -> str:
    """An S15 cancellation through the real pipeline."""
    receive(engine, siu("S15", f"X{next(_controls)}", filler=filler, start=start, sent_at=at,
                        mrn=mrn, **values), at)
    return appointment(engine, filler)


def appointment(engine: Engine, filler: str) -> str:
    """The entry id of the appointment with this filler id (SIU) or FHIR id."""
    with engine.connect() as conn:
        rows = conn.execute(select(timeline_entries.c.id, timeline_entries.c.resource).where(
            timeline_entries.c.resource_type == "Appointment")).all()
    found = [r.id for r in rows
             if filler in {i.get("value") for i in r.resource.get("identifier") or []}]
    assert len(found) == 1, (filler, found)
    return str(found[0])


def patient_of(engine: Engine, entry_id: str) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(timeline_entries.c.patient_id)
                                .where(timeline_entries.c.id == entry_id)).scalar_one())


def join_waitlist(engine: Engine, settings: Settings, entry_id: str, now: datetime = T0) -> int:
    with write_lock(engine), engine.begin() as conn:
        return join(conn, settings, patient_id=patient_of(engine, entry_id), entry_id=entry_id,
                    now=now)


def fhir_appointment(aid: str, pid: str, *, start: datetime, status: str = "booked",
                     version: str = "1", slot: str | None = "Slot/s1",
                     updated: datetime = T0) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Appointment", "id": aid,
        "meta": {"versionId": version, "lastUpdated": updated.isoformat()},
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.6", "value": aid}],
        "status": status,
        "serviceType": [{"coding": [{"system": "http://example.org/services",
                                     "code": "CHECKUP", "display": "Check-up"}]}],
        "start": start.isoformat(), "end": (start + timedelta(minutes=30)).isoformat(),
        "participant": [{"actor": {"reference": f"Patient/{pid}"}, "status": "accepted"},
                        {"actor": {"reference": "Location/loc1", "display": "Main Street"},
                         "status": "accepted"}],
    }
    if slot:
        res["slot"] = [{"reference": slot}]
    return res


def fhir_patient(pid: str, mrn: str, *, phone: str = "+15555550199",
                 language: str = "en") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid,
            "meta": {"versionId": "1", "lastUpdated": T0.isoformat()},
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": mrn}],
            "name": [{"family": "Doe", "given": [mrn]}],
            "telecom": [{"system": "phone", "value": phone, "use": "mobile"}],
            "communication": [{"language": {"coding": [{"code": language}]},
                               "preferred": True}]}


def apply_fhir(engine: Engine, resources: list[dict[str, Any]], now: datetime = T0,
               ehr: str = "ehr1") -> None:
    """Put FHIR resources on the timeline as FHIR ingestion does."""
    with write_lock(engine), engine.begin() as conn:
        apply_batch(conn, [([r], fhir_source(ehr, r, fallback=now)) for r in resources], now)


def rows(engine: Engine, table: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(table).order_by(table.c.id)))


def slots(engine: Engine) -> list[Any]:
    return rows(engine, freed_slots)


def offers(engine: Engine) -> list[Any]:
    return rows(engine, waitlist_offers)


def waitlist(engine: Engine) -> list[Any]:
    return rows(engine, waitlist_entries)


def requests(engine: Engine) -> list[Any]:
    return rows(engine, patient_requests)


@dataclass
class FakeBooking:
    status: str


@dataclass
class FakeScheduling:
    """Stands in for integration.scheduling.SchedulingService: records each rebook call."""

    status: str = "booked"
    delay_s: float = 0.0
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def rebook(self, *, patient_id: str, entry_id: str, slot: str, source: str,
                     now: datetime) -> FakeBooking:
        import asyncio

        self.calls.append({"patient_id": patient_id, "entry_id": entry_id, "slot": slot,
                           "source": source, "now": now})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return FakeBooking(self.status)
