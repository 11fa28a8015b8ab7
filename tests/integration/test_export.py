"""``careloop export --patient``: everything careloop holds about one patient, as NDJSON."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Connection, Engine, insert, select

from integration.cli import main
from integration.db import write_lock
from integration.export import UnknownPatient, export_patient, write_export
from integration.models import (
    address_optouts,
    audit_events,
    bookings,
    channel_events,
    ehr_outbox,
    entry_keys,
    entry_sources,
    inbox,
    mapped_resources,
    patient_identifiers,
    patient_merges,
    patient_preferences,
    patient_requests,
    patients,
    portal_access,
    timeline_changes,
    timeline_entries,
    touches,
    waitlist_entries,
    waitlist_offers,
)

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
ALICE, ALICE_OLD, BOB = "a" * 32, "b" * 32, "c" * 32
TYPES = {"patient", "timeline_entry", "timeline_change", "message", "touch", "patient_request",
         "channel_event", "address_optout", "booking", "waitlist_entry", "waitlist_offer",
         "ehr_outbox", "audit_event"}


def _id(conn: Connection, stmt: Any) -> int:
    return int(conn.execute(stmt.returning(stmt.table.c.id)).scalar_one())


def seed_patient(conn: Connection, pid: str, tag: str, phone: str, *, n: int,
                 merged_into: str | None = None) -> None:
    """One patient with a row of every kind; every string it owns contains ``tag``."""
    at = NOW - timedelta(days=n)
    conn.execute(insert(patients).values(id=pid, created_at=at, merged_into=merged_into,
                                         merged_at=NOW if merged_into else None))
    conn.execute(insert(patient_identifiers).values(
        system="urn:oid:1.2.3", value=f"MRN-{tag}", patient_id=pid, created_at=at))
    conn.execute(insert(patient_preferences).values(
        patient_id=pid, preferred_channel="sms", language="en", updated_at=at))
    conn.execute(insert(portal_access).values(
        token_hash=f"hash-{tag}", patient_id=pid, failures=1, updated_at=at))
    inbox_id = _id(conn, insert(inbox).values(
        source="mllp", dedup_key=f"dedup-{tag}", raw=f"MSH|^~\\&|PID|{tag}".encode(),
        status="processed", received_at=at, control_id=f"CTL-{tag}"))
    conn.execute(insert(mapped_resources).values(
        inbox_id=inbox_id, resource_type="Appointment", resource_id=f"appt-{tag}",
        resource={"resourceType": "Appointment", "id": f"appt-{tag}"}, created_at=at))
    entry = f"entry-{tag}"[:32]
    conn.execute(insert(timeline_entries).values(
        id=entry, patient_id=pid, kind="appointment", status="booked", time=at,
        summary=f"Appointment booked: {tag}", resource_type="Appointment",
        resource={"resourceType": "Appointment", "id": f"appt-{tag}"}, ordinal="o",
        first_seen=at, created_at=at, updated_at=at))
    conn.execute(insert(entry_sources).values(
        entry_id=entry, system="hl7v2", connection="EPIC|MAIN", ref=f"inbox/{inbox_id}#CTL-{tag}",
        version=f"CTL-{tag}", ordinal="o", received_at=at))
    conn.execute(insert(entry_keys).values(
        resource_type="Appointment", system="urn:filler", value=f"F-{tag}", entry_id=entry))
    conn.execute(insert(timeline_changes).values(
        entry_id=entry, patient_id=pid, kind="appointment", change="created", status="booked",
        at=at))
    touch_key = f"reminder|1|{entry}"
    touch_id = _id(conn, insert(touches).values(
        key=touch_key, pathway="reminder", step=1, entry_id=entry, patient_id=pid,
        channel="sms", address=phone, status="sent", body=f"Hello {tag}", created_at=at,
        updated_at=at))
    # a reply from the same number written differently, a receipt naming the touch, and the
    # event that carried a request
    reply = _id(conn, insert(channel_events).values(
        channel="sms", kind="inbound", provider_id=f"reply-{tag}",
        address=phone.replace(" ", "").replace("-", ""), payload={"Body": f"C {tag}"},
        status="processed", received_at=at))
    _id(conn, insert(channel_events).values(
        channel="sms", kind="status", provider_id=f"receipt-{tag}", address="",
        touch_key=touch_key, payload={"MessageStatus": "delivered"}, status="processed",
        received_at=at))
    portal = _id(conn, insert(channel_events).values(
        channel="portal", kind="portal", provider_id=f"portal-{tag}", address="",
        payload={"action": "reschedule", "note": tag}, status="processed", received_at=at))
    request = _id(conn, insert(patient_requests).values(
        entry_id=entry, patient_id=pid, action="reschedule", source="portal", event_id=portal,
        detail={"note": tag}, created_at=at))
    conn.execute(insert(address_optouts).values(channel="sms", address=phone, at=at,
                                                event_id=reply))
    for key, values in ((f"touch-{tag}", {"touch_id": touch_id}),
                        (f"reply-{reply}", {"event_id": reply}),
                        (f"request-{request}-reschedule", {})):
        conn.execute(insert(ehr_outbox).values(
            key=key, connection="ehr", resource_type="Communication", operation="create",
            resource={"note": tag}, status="written", next_attempt_at=at, created_at=at,
            updated_at=at, **values))
    conn.execute(insert(bookings).values(
        patient_id=pid, connection="ehr", slot_ref=f"Slot/{tag}", start=at, source="portal",
        status="booked", started_at=at))
    waitlist = _id(conn, insert(waitlist_entries).values(
        patient_id=pid, service=f"svc-{tag}", status="active", created_at=at, updated_at=at))
    conn.execute(insert(waitlist_offers).values(
        slot_id=n, waitlist_id=waitlist, patient_id=pid, channel=f"sms-{tag}"[:16],
        status="offered", offered_at=at, expires_at=at))
    conn.execute(insert(audit_events).values(
        at=at, actor="client", action="timeline.read", target_type="Patient", target_id=pid,
        detail={"note": tag}))


def seed(engine: Engine) -> None:
    with write_lock(engine), engine.begin() as conn:
        seed_patient(conn, ALICE, "alice", "+1 555-0100", n=3)
        seed_patient(conn, ALICE_OLD, "aliceold", "+1 555-0101", n=2, merged_into=ALICE)
        seed_patient(conn, BOB, "bob", "+1 555-0200", n=1)
        conn.execute(insert(patient_merges).values(
            survivor_id=ALICE, replaced_id=ALICE_OLD, at=NOW, source_system="hl7v2",
            source_ref="inbox/1"))


def export(engine: Engine, pid: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        records = list(export_patient(conn, pid))
    for record in records:
        json.dumps(record)  # plain JSON, every value
    return records


def test_export_holds_every_kind_of_row_and_nobody_elses(engine: Engine) -> None:
    seed(engine)
    records = export(engine, ALICE)
    assert records[0]["type"] == "patient"
    assert {r["type"] for r in records} == TYPES
    text = json.dumps(records)
    assert "bob" not in text and BOB not in text and "0200" not in text
    assert "hash-" not in text  # the link token's hash is no personal data, and stays home

    patient = records[0]
    assert (patient["id"], patient["requested_id"], patient["merged_ids"]) == (
        ALICE, ALICE, [ALICE_OLD])
    assert {i["value"] for i in patient["identifiers"]} == {"MRN-alice", "MRN-aliceold"}
    assert [m["replaced_id"] for m in patient["merges"]] == [ALICE_OLD]
    assert len(patient["preferences"]) == 2 and len(patient["portal_access"]) == 2

    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_type.setdefault(r["type"], []).append(r)
    counts = {t: len(rs) for t, rs in by_type.items()}
    assert counts == dict.fromkeys(TYPES, 2) | {
        "patient": 1, "channel_event": 6, "ehr_outbox": 6}
    entry = by_type["timeline_entry"][0]
    assert entry["resource"]["resourceType"] == "Appointment"
    assert entry["sources"][0]["ref"].startswith("inbox/")
    assert entry["keys"] == [{"resource_type": "Appointment", "system": "urn:filler",
                              "value": "F-alice"}]
    assert entry["time"] == "2030-05-29T12:00:00Z"
    message = by_type["message"][0]
    assert message["raw"] == "MSH|^~\\&|PID|alice"
    assert message["mapped_resources"][0]["resource_id"] == "appt-alice"
    assert {t["body"] for t in by_type["touch"]} == {"Hello alice", "Hello aliceold"}
    assert {e["provider_id"] for e in by_type["channel_event"]} == {
        f"{k}-{tag}" for k in ("reply", "receipt", "portal") for tag in ("alice", "aliceold")}
    assert {o["address"] for o in by_type["address_optout"]} == {"+1 555-0100", "+1 555-0101"}
    assert {a["target_id"] for a in by_type["audit_event"]} == {ALICE, ALICE_OLD}


def test_a_merged_id_exports_the_survivor(engine: Engine) -> None:
    seed(engine)
    from_old = export(engine, ALICE_OLD)
    assert from_old[0]["id"] == ALICE and from_old[0]["requested_id"] == ALICE_OLD
    assert from_old[1:] == export(engine, ALICE)[1:]
    bob = export(engine, BOB)
    assert bob[0]["merged_ids"] == [] and "alice" not in json.dumps(bob)


def test_unknown_patient(engine: Engine) -> None:
    seed(engine)
    with engine.connect() as conn, pytest.raises(UnknownPatient):
        export_patient(conn, "nobody")
    with pytest.raises(UnknownPatient):
        write_export(engine, "nobody", io.StringIO(), actor="test")
    with engine.connect() as conn:
        assert conn.execute(select(audit_events.c.id).where(
            audit_events.c.action == "patient.export")).first() is None


def test_write_export_is_on_record(engine: Engine) -> None:
    seed(engine)
    out = io.StringIO()
    counts = write_export(engine, ALICE_OLD, out, actor="cli:dpo", now=NOW)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sum(counts.values()) == len(lines) and counts["patient"] == 1
    with engine.connect() as conn:
        row = conn.execute(select(audit_events).where(
            audit_events.c.action == "patient.export")).one()
    assert (row.actor, row.target_type, row.target_id) == ("cli:dpo", "Patient", ALICE)
    assert row.detail == {"requested_id": ALICE_OLD, "format": "ndjson"}
    # the export's own record is part of what it exported
    assert any(r["type"] == "audit_event" and r["action"] == "patient.export" for r in lines)


def test_cli_export(engine: Engine, db_url: str, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    seed(engine)
    monkeypatch.delenv("CARELOOP_CONFIG", raising=False)
    monkeypatch.setenv("CARELOOP_DATABASE_URL", db_url)
    monkeypatch.setattr("integration.cli.configure_logging", lambda *a, **k: None)
    runner = CliRunner()

    shown = runner.invoke(main, ["export", "--patient", ALICE_OLD])
    assert shown.exit_code == 0, shown.output
    lines = [json.loads(line) for line in shown.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["type"] == "patient" and lines[0]["id"] == ALICE
    assert {r["type"] for r in lines} == TYPES

    target = tmp_path / "alice.ndjson"
    written = runner.invoke(main, ["export", "--patient", ALICE, "--out", str(target)])
    assert written.exit_code == 0, written.output
    assert f"written to {target}" in written.stderr
    in_file = [json.loads(line) for line in target.read_text().splitlines()]
    assert {r["type"] for r in in_file} == TYPES
    assert sum(r["type"] == "audit_event" and r["action"] == "patient.export"
               for r in in_file) == 2  # the first export and this one

    missing = runner.invoke(main, ["export", "--patient", "nobody", "--out", str(target)])
    assert missing.exit_code == 1
    assert missing.stderr == "careloop: error: no patient nobody\n"
    assert target.read_text()  # an existing file is left alone
    with engine.connect() as conn:
        exports = conn.execute(select(audit_events.c.actor).where(
            audit_events.c.action == "patient.export")).scalars().all()
    assert len(exports) == 2 and all(a.startswith("cli:") for a in exports)
