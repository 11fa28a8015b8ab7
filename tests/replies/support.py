"""Builders for the replies tests: settings with Twilio channels and a write-back connection,
a booked appointment whose first reminder was sent (through the real pipeline and outreach
stage), and Twilio webhook parameters stored as the webhook would."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from adapters.channels import Channel, FileChannel
from integration.models import channel_events, patient_requests, timeline_entries
from integration.outreach.stage import OutreachStage
from integration.replies.webhooks import event_row, store_event
from integration.settings import Settings
from tests.helpers import settings_for
from tests.outreach.support import ny, receive, siu, stage

BASE = "https://careloop.example"
TOKEN = "twilio-auth-token-0123456789"
OUR_NUMBER = "+15550000000"
PATIENT_NUMBER = "+15555550101"
"""The number in tests.outreach.support.PID (``+1 (555) 5550101``), as Twilio sends it."""
TWILIO = {"provider": "twilio", "account": "AC0123", "token": TOKEN, "from": OUR_NUMBER}
CONNECTION = {"name": "ehr1", "fhir_base": "http://ehr.invalid/fhir", "client_id": "careloop",
              "mode": "classic"}
T0 = ny(2026, 3, 1, 9, 0)
START = ny(2026, 3, 10, 14, 0)
FIRST_DUE = ny(2026, 3, 7, 14, 0)
REPLY_AT = ny(2026, 3, 7, 15, 0)


def make_settings(db_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "base_url": BASE,
        "timezone": "America/New_York",
        "default_language": "en",
        "organization": {"name": "Example Clinic", "phone": "+1 555 0100",
                         "link": "https://portal.example/p"},
        "channels": {"sms": TWILIO, "voice": TWILIO, "portal": {"secret": "s" * 32}},
        "keys_dir": tmp_path / "keys",
        "connections": [CONNECTION],
    }
    values.update(overrides)
    return settings_for(db_url, **values)


def answer_channels(tmp_path: Path) -> dict[str, Channel]:
    return {"sms": FileChannel(tmp_path / "answers" / "sms"),
            "voice": FileChannel(tmp_path / "answers" / "voice")}


def answers(tmp_path: Path) -> list[dict[str, Any]]:
    folder = tmp_path / "answers"
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))]


def book(engine: Engine, tmp_path: Path, *, filler: str = "F1", mrn: str = "MRN1",
         lang: str = "es^Spanish^HL70296", start: datetime = START, control: str = "C1",
         sent: datetime = T0, send_first: bool = True) -> OutreachStage:
    """A booking through the real pipeline; its reminders planned; the first one (3 days
    before, SMS to the patient's mobile) sent at its time."""
    s = stage(engine, tmp_path / "outbox")
    receive(engine, siu("S12", control, filler=filler, start=start, sent=sent, mrn=mrn,
                        lang=lang), sent)
    s.reconcile(sent)
    if send_first:
        s.send_due(FIRST_DUE)
    return s


def sms_params(body: str, sid: str, *, sender: str = PATIENT_NUMBER) -> dict[str, str]:
    return {"MessageSid": sid, "SmsSid": sid, "AccountSid": "AC0123", "From": sender,
            "To": OUR_NUMBER, "Body": body, "NumMedia": "0"}


def store(engine: Engine, channel: str, kind: str, params: Mapping[str, str], *,
          now: datetime, touch_key: str | None = None) -> int:
    """Store a webhook's event as the endpoint would (signature checked elsewhere)."""
    row = event_row(channel, kind, {k: [v] for k, v in params.items()}, touch_key=touch_key,
                    idempotency_token=None, now=now)
    return store_event(engine, row)[0]


def sms_reply(engine: Engine, body: str, sid: str, *, now: datetime = REPLY_AT,
              sender: str = PATIENT_NUMBER) -> int:
    return store(engine, "sms", "inbound", sms_params(body, sid, sender=sender), now=now)


def event(engine: Engine, event_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(channel_events).where(channel_events.c.id == event_id)).one()


def requests(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(patient_requests).order_by(patient_requests.c.id)))


def entry(engine: Engine, entry_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(timeline_entries)
                            .where(timeline_entries.c.id == entry_id)).one()
