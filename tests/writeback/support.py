"""Builders for the write-back tests: patients and entries put on the timeline the way FHIR
ingestion and the HL7 pipeline put them there (``apply_batch`` with real source references),
and touches stored as the outreach sender stores them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, select

from integration.db import write_lock
from integration.fhir_ingest import fhir_source
from integration.models import ehr_outbox, entry_sources, timeline_entries, touches
from integration.settings import Connection, Settings
from integration.timeline import SourceRef, apply_batch
from tests.helpers import settings_for

EHR = "main-ehr"
BASE = "https://ehr.example.org/fhir/R4"
NOW = datetime(2030, 1, 10, 15, 0, tzinfo=UTC)
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5"


def connection(name: str = EHR, base: str = BASE, **values: Any) -> Connection:
    return Connection(name=name, fhir_base=base, client_id="careloop", mode="poll", **values)


def settings(url: str, *connections: Connection, **values: Any) -> Settings:
    return settings_for(url, connections=connections or (connection(),), **values)


def fhir_patient(pid: str = "p1", mrn: str = "MRN-1") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid,
            "meta": {"versionId": "1", "lastUpdated": "2030-01-01T00:00:00Z"},
            "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
            "name": [{"family": "Doe", "given": ["Jane"]}]}


def fhir_appointment(aid: str = "a1", pid: str = "p1", *, version: str = "1",
                     status: str = "booked") -> dict[str, Any]:
    return {"resourceType": "Appointment", "id": aid,
            "meta": {"versionId": version, "lastUpdated": f"2030-01-0{version}T00:00:00Z"},
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.6", "value": f"APT-{aid}"}],
            "status": status, "start": "2030-02-01T15:00:00Z", "end": "2030-02-01T15:30:00Z",
            "participant": [{"actor": {"reference": f"Patient/{pid}"}, "status": "accepted"}]}


def apply(engine: Engine, resources: list[dict[str, Any]], source: SourceRef | None = None,
          *, ehr: str = EHR) -> None:
    """Put resources on the timeline as FHIR ingestion (default) or the HL7 stage would."""
    with write_lock(engine), engine.begin() as conn:
        if source is None:
            batch = [([r], fhir_source(ehr, r, fallback=NOW)) for r in resources]
        else:
            batch = [(resources, source)]
        apply_batch(conn, batch, NOW)


def hl7_source(control: str = "C1") -> SourceRef:
    return SourceRef(system="hl7v2", connection="EPIC^MAIN", ref=f"inbox/1#{control}",
                     version=control, ordinal=NOW - timedelta(days=1))


def entry_of(engine: Engine, resource_type: str, resource_id: str | None = None) -> Any:
    """The timeline entry (row) of a resource type (and source id)."""
    with engine.connect() as conn:
        rows = conn.execute(select(timeline_entries).where(
            timeline_entries.c.resource_type == resource_type)).all()
    if resource_id is not None:
        rows = [r for r in rows if r.resource.get("id") == resource_id]
    assert len(rows) == 1, rows
    return rows[0]


def fhir_entry(engine: Engine, aid: str) -> str:
    with engine.connect() as conn:
        row = conn.execute(select(entry_sources.c.entry_id).where(
            entry_sources.c.ref.like(f"Appointment/{aid}/%"))).first()
    assert row is not None
    return str(row.entry_id)


def add_touch(engine: Engine, *, entry_id: str, patient_id: str, key: str,
              status: str = "sent", channel: str = "sms", reason: str | None = None,
              body: str | None = "Reminder: your appointment is on Feb 1 at 10:00.",
              pathway: str = "appointment-reminder", sent_at: datetime | None = NOW) -> Any:
    """Store a touch as the sender leaves it; returns the row (a mapping)."""
    with write_lock(engine), engine.begin() as conn:
        tid = conn.execute(insert(touches).values(
            key=key, pathway=pathway, step=0, entry_id=entry_id, patient_id=patient_id,
            due_at=NOW, moment=NOW + timedelta(days=3), channel=channel,
            address="+15555550101" if channel in ("sms", "voice") else "jane@example.org",
            language="en", template="appointment-reminder", status=status, reason=reason,
            attempts=1, sent_at=sent_at if status == "sent" else None,
            provider_ref="SM123" if status == "sent" else None, body=body,
            created_at=NOW, updated_at=NOW,
        ).returning(touches.c.id)).scalar_one()
        return conn.execute(select(touches).where(touches.c.id == tid)).one()._mapping


def outbox(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(ehr_outbox).order_by(ehr_outbox.c.id)).all()


def utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
