"""Builders for the outreach stage tests: HL7 v2 messages, FHIR resources, pathways, and the
stage run at chosen moments.

Time is "frozen" by passing ``now`` explicitly, in America/New_York (the settings' and the
patients' zone) so that any UTC slip shows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, insert, select

from integration.db import write_lock
from integration.intake import assess
from integration.models import inbox, timeline_entries, touches
from integration.outreach.pathways import OutreachSettings, Pathway
from integration.outreach.stage import OutreachStage
from integration.outreach.state import OutreachConfig
from integration.pipeline import process_batch

NY = ZoneInfo("America/New_York")
SENDER = "EPIC|MAIN"

PATHWAYS = tuple(Pathway.model_validate(p) for p in (
    {"name": "appointment-reminder", "on": "appointment", "when": {"status": ["booked"]},
     "steps": [{"at": "-P3D", "channel": "preferred", "template": "appointment-reminder"},
               {"at": "-PT2H", "channel": "sms", "template": "appointment-reminder-short"}]},
    {"name": "visit-followup", "on": "visit-end",
     "steps": [{"at": "PT4H", "template": "visit-followup"}]},
    {"name": "survey", "on": "visit-end", "survey_url": "https://survey.example/s/{entry}",
     "steps": [{"at": "P1DT2H", "channel": "email", "template": "survey"}]},
    {"name": "refill-reminder", "on": "medication-refill",
     "steps": [{"at": "-P5D", "template": "refill-reminder"}]},
    {"name": "careplan-step", "on": "careplan-activity",
     "steps": [{"at": "-P1D", "template": "careplan-step"}]},
))


def config(**outreach: Any) -> OutreachConfig:
    from integration.outreach.pathways import Organization

    values: dict[str, Any] = {"max_per_day": 5, "max_per_week": 20}
    values.update(outreach)
    return OutreachConfig(
        pathways=PATHWAYS,
        outreach=OutreachSettings(**values),
        default_language="en",
        timezone="America/New_York",
        organization=Organization(name="Example Clinic", phone="+1 555 0100",
                                  link="https://portal.example/p"),
    )


def stage(engine: Engine, outbox: Path, **outreach: Any) -> OutreachStage:
    from integration.outreach.stage import file_channels

    cfg = config(**outreach)
    return OutreachStage(engine, cfg, channels=file_channels(outbox))


def utc(value: datetime) -> datetime:
    """A stored time as aware UTC (SQLite gives naive UTC back)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def ny(*args: int) -> datetime:
    return datetime(*args, tzinfo=NY)  # type: ignore[misc]


def hl7_time(moment: datetime) -> str:
    return moment.astimezone(NY).strftime("%Y%m%d%H%M%S%z")


PID = ("PID|1||{mrn}^^^HOSP^MR||Doe^Jane||19800101|F|||||^PRN^CP^^1^555^5550101"
       "~^NET^Internet^jane@example.org||{lang}")


def msh(kind: str, control: str, at: datetime) -> str:
    return f"MSH|^~\\&|EPIC|MAIN|CARELOOP|HOSP|{hl7_time(at)}||{kind}|{control}|P|2.5.1"


def siu(trigger: str, control: str, *, filler: str, start: datetime, sent: datetime,
        mrn: str = "MRN1", lang: str = "es^Spanish^HL70296", status: str = "",
        minutes: int = 30) -> bytes:
    end = start + timedelta(minutes=minutes)
    segments = [
        msh(f"SIU^{trigger}^SIU_S12", control, sent),
        f"SCH|P{filler}|{filler}|||||||{minutes}|min|^^{minutes}^{hl7_time(start)}"
        f"^{hl7_time(end)}|||||||||||||||{status}",
        PID.format(mrn=mrn, lang=lang),
        "RGS|1|A",
        "AIS|1||CHECKUP^Check-up^L",
        "AIL|1||CLINIC1^^^MAIN^^^^^Main Street Clinic|",
    ]
    return ("\r".join(segments) + "\r").encode()


def adt_a03(control: str, *, visit: str, admitted: datetime, discharged: datetime,
            mrn: str = "MRN1", lang: str = "en^English^HL70296") -> bytes:
    segments = [
        msh("ADT^A03^ADT_A03", control, discharged),
        f"EVN|A03|{hl7_time(discharged)}",
        PID.format(mrn=mrn, lang=lang),
        f"PV1|1|O|CLINIC1^^^MAIN||||||||||||||||{visit}^^^HOSP^VN|||||||||||||||||||||||||"
        f"{hl7_time(admitted)}|{hl7_time(discharged)}",
    ]
    return ("\r".join(segments) + "\r").encode()


def rde(control: str, *, order: str, authored: datetime, refills: int, days: int,
        mrn: str = "MRN1", lang: str = "en^English^HL70296") -> bytes:
    segments = [
        msh("RDE^O11^RDE_O11", control, authored),
        PID.format(mrn=mrn, lang=lang),
        f"ORC|NW|{order}^EPC|||||||{hl7_time(authored)}",
        f"TQ1|1||BID|||{days}^d",
        "RXE||01151327^Doxycycline 100 mg^NDC|1||TAB^Tablet|||||60|TAB^Tablet|"
        f"{refills}|||RX{order}",
    ]
    return ("\r".join(segments) + "\r").encode()


def rds(control: str, *, order: str, dispensed: datetime, refills: int, days: int,
        mrn: str = "MRN1",
        lang: str = "en^English^HL70296") -> bytes:
    segments = [
        msh("RDS^O13^RDS_O13", control, dispensed),
        PID.format(mrn=mrn, lang=lang),
        f"ORC|RE|{order}^EPC|||||||{hl7_time(dispensed)}",
        f"TQ1|1||BID|||{days}^d",
        "RXE||01151327^Doxycycline 100 mg^NDC|1||TAB^Tablet|||||60|TAB^Tablet|"
        f"{refills}|||RX{order}",
        f"RXD|1|01151327^Doxycycline 100 mg^NDC|{hl7_time(dispensed)}|60|TAB^Tablet||RX{order}",
    ]
    return ("\r".join(segments) + "\r").encode()


def receive(engine: Engine, raw: bytes, now: datetime) -> int:
    """Store a message as intake would, then run the real processing stage on it."""
    row = assess(raw, "mllp", "test").row(now, timedelta(seconds=60))
    with write_lock(engine), engine.begin() as conn:
        inbox_id = int(conn.execute(insert(inbox).values(row).returning(inbox.c.id)).scalar_one())
    (outcome,) = process_batch(engine, [inbox_id], now=now)
    assert outcome.status == "processed", outcome.error
    return inbox_id


def outbox_files(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))]


def all_touches(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(touches).order_by(touches.c.key)))


def touch(engine: Engine, key_prefix: str) -> Any:
    rows = [t for t in all_touches(engine) if t.key.startswith(key_prefix)]
    assert len(rows) == 1, [t.key for t in all_touches(engine)]
    return rows[0]


def entry_id(engine: Engine, resource_type: str) -> str:
    with engine.connect() as conn:
        ids: Sequence[str] = conn.execute(
            select(timeline_entries.c.id).where(timeline_entries.c.resource_type == resource_type)
        ).scalars().all()
    assert len(ids) == 1, ids
    return ids[0]


def T0_SIU(start: datetime) -> bytes:
    """A booking sent on 1 March 2026, 09:00 New York time."""
    return siu("S12", "C1", filler="F1", start=start, sent=ny(2026, 3, 1, 9, 0))
