"""The sender registry: settings file and console rules, the cache every process refreshes,
holding messages from unregistered senders, and the console form's validation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from integration.appacks import deliver_app_acks
from integration.conversion import ContextFactory
from integration.db import create_db_engine
from integration.intake import assess
from integration.models import audit_events, inbox, mapped_resources, sender_settings
from integration.pipeline import process_batch, process_message, requeue
from integration.senders import (
    SenderError,
    SenderRegistry,
    delete_sender,
    save_sender,
    unregistered_error,
    validate_sender,
)
from integration.settings import HL7Sender, SettingsError
from integration.workpool import WorkPool
from mappings.er7 import decode, read_header
from tests.helpers import adt, err, msa, settings_for

NOW = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)


def store(engine: Engine, raw: bytes) -> int:
    row = assess(raw, "mllp", "test").row(NOW, timedelta(seconds=60))
    with engine.begin() as conn:
        return int(conn.execute(insert(inbox).values(row).returning(inbox.c.id)).scalar_one())


def get(engine: Engine, inbox_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(inbox).where(inbox.c.id == inbox_id)).one()


def patient_identifier(engine: Engine, inbox_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        patient = conn.execute(select(mapped_resources.c.resource).where(
            mapped_resources.c.inbox_id == inbox_id,
            mapped_resources.c.resource_type == "Patient")).scalar_one()
    first: dict[str, Any] = patient["identifier"][0]
    return first


def header(sender: str = "NEWLAB", facility: str = "MAIN") -> Any:
    raw = adt("H1", sender=sender).replace(b"|MAIN|", f"|{facility}|".encode(), 1)
    return read_header(decode(raw))


# --- settings ---------------------------------------------------------------------------------


def test_unregistered_senders_setting_from_env_and_toml(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_for("sqlite://").hl7_unregistered_senders == "accept"
    config = tmp_path / "careloop.toml"
    config.write_text('hl7_unregistered_senders = "hold"\n')
    monkeypatch.setenv("CARELOOP_CONFIG", str(config))
    assert settings_for("sqlite://").hl7_unregistered_senders == "hold"
    monkeypatch.setenv("CARELOOP_HL7_UNREGISTERED_SENDERS", "accept")
    assert settings_for("sqlite://").hl7_unregistered_senders == "accept"
    monkeypatch.setenv("CARELOOP_HL7_UNREGISTERED_SENDERS", "drop")
    with pytest.raises(SettingsError, match="CARELOOP_HL7_UNREGISTERED_SENDERS"):
        settings_for("sqlite://")


# --- effective rules --------------------------------------------------------------------------


def test_console_rule_overrides_the_file_and_specific_beats_any_facility(
        engine: Engine) -> None:
    settings = settings_for("sqlite://", hl7_senders=(
        HL7Sender(application="EPIC", facility="", timezone="America/Chicago"),
        HL7Sender(application="EPIC", facility="MAIN", timezone="America/Denver"),
        HL7Sender(application="LAB", facility="NORTH", timezone="Europe/London"),
    ))
    registry = SenderRegistry(settings, refresh_s=0)
    registry.refresh(engine)
    assert registry.find("EPIC", "MAIN").timezone == "America/Denver"  # type: ignore[union-attr]
    assert registry.find("EPIC", "WEST").timezone == "America/Chicago"  # type: ignore[union-attr]
    assert registry.find("OTHER", "MAIN") is None

    save_sender(engine, HL7Sender(application="LAB", facility="NORTH", timezone="Asia/Tokyo"),
                actor="ada", now=NOW)
    save_sender(engine, HL7Sender(application="EPIC", facility="", timezone="Europe/Paris"),
                actor="ada", now=NOW)
    assert registry.refresh(engine)
    assert registry.find("LAB", "NORTH").timezone == "Asia/Tokyo"  # type: ignore[union-attr]
    # The file's rule naming the facility still beats the console's any-facility rule.
    assert registry.find("EPIC", "MAIN").timezone == "America/Denver"  # type: ignore[union-attr]
    assert registry.find("EPIC", "WEST").timezone == "Europe/Paris"  # type: ignore[union-attr]
    origins = {(r.rule.application, r.rule.facility): (r.origin, r.overrides)
               for r in registry.rules()}
    assert origins == {("LAB", "NORTH"): ("console", True), ("EPIC", ""): ("console", True),
                       ("EPIC", "MAIN"): ("settings", False)}

    assert delete_sender(engine, "LAB", "NORTH", actor="ada", now=NOW)
    assert not delete_sender(engine, "LAB", "NORTH", actor="ada", now=NOW)
    assert registry.refresh(engine)
    assert registry.find("LAB", "NORTH").timezone == "Europe/London"  # type: ignore[union-attr]
    with engine.connect() as conn:
        audits = conn.execute(select(audit_events.c.actor, audit_events.c.action,
                                     audit_events.c.target_type, audit_events.c.target_id)
                              .order_by(audit_events.c.id)).all()
    assert [tuple(a) for a in audits] == [
        ("ada", "console.sender_saved", "sender", "LAB|NORTH"),
        ("ada", "console.sender_saved", "sender", "EPIC|"),
        ("ada", "console.sender_deleted", "sender", "LAB|NORTH"),
    ]


def test_refresh_is_one_small_check_until_something_changes(engine: Engine) -> None:
    ticks = [0.0]
    registry = SenderRegistry(None, refresh_s=2.0, clock=lambda: ticks[0])
    assert not registry.refresh(engine)  # empty table, as at start
    token = registry.token
    save_sender(engine, HL7Sender(application="A", timezone="Europe/Oslo"), actor="ada",
                now=NOW)
    assert not registry.refresh(engine)  # checked less than 2 s ago
    ticks[0] = 2.5
    assert registry.refresh(engine)
    assert registry.token != token
    ticks[0] = 5.0
    assert not registry.refresh(engine)  # checked, nothing changed
    registry.invalidate()
    assert not registry.refresh(engine)
    assert registry.find("A", "ANY").timezone == "Europe/Oslo"  # type: ignore[union-attr]


def test_saves_at_the_same_instant_are_all_seen(engine: Engine) -> None:
    """A second save with the same clock reading (or an earlier one: another host's clock)
    still changes what every process checks."""
    registry = SenderRegistry(None, refresh_s=0)
    for tz in ("Europe/Oslo", "Europe/Rome", "Europe/Madrid"):
        save_sender(engine, HL7Sender(application="A", timezone=tz), actor="ada",
                    now=NOW - timedelta(minutes=1 if tz == "Europe/Madrid" else 0))
        assert registry.refresh(engine)
        assert registry.find("A", "")
        assert registry.find("A", "").timezone == tz  # type: ignore[union-attr]
    with engine.connect() as conn:
        stamp = conn.execute(select(sender_settings.c.updated_at)).scalar_one()
    assert stamp.replace(tzinfo=stamp.tzinfo or UTC) > NOW


def test_a_hand_written_bad_row_is_ignored(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(sender_settings).values(
            application="BAD", facility="", timezone="Mars/Olympus", updated_by="dba",
            updated_at=NOW))
    registry = SenderRegistry(None, refresh_s=0)
    assert registry.refresh(engine)
    assert registry.find("BAD", "") is None


def test_two_processes_each_see_a_save_at_their_next_batch(db_url: str) -> None:
    """Two engines and two context factories stand for two worker processes."""
    settings = settings_for(db_url)
    first, second = create_db_engine(db_url), create_db_engine(db_url)
    try:
        contexts_a, contexts_b = ContextFactory(settings), ContextFactory(settings)
        contexts_a.refresh(first)
        contexts_b.refresh(second)
        before = contexts_a.for_header(header("NEWLAB", "NORTH"))
        assert before.sender_timezone is None and before.identifier_systems == {}

        save_sender(first, HL7Sender(application="NEWLAB", facility="NORTH",
                                     timezone="America/Chicago",
                                     identifier_systems={"MRN": "urn:oid:9.9"}),
                    actor="ada", now=NOW)
        for contexts, engine in ((contexts_a, first), (contexts_b, second)):
            contexts.refresh(engine)
            after = contexts.for_header(header("NEWLAB", "NORTH"))
            assert str(after.sender_timezone) == "America/Chicago"
            assert after.identifier_systems == {"MRN": "urn:oid:9.9"}

        # A work process reads no database: it takes the serving process's snapshot.
        child = ContextFactory(settings)
        child.adopt(contexts_a.snapshot())
        assert child.for_header(header("NEWLAB", "NORTH")).identifier_systems == {
            "MRN": "urn:oid:9.9"}
        child.adopt(contexts_a.snapshot())  # the same snapshot again: nothing to do
    finally:
        first.dispose()
        second.dispose()


# --- processing -------------------------------------------------------------------------------


def test_console_rule_applies_to_the_next_message_of_a_long_lived_worker(
        engine: Engine, db_url: str) -> None:
    contexts = ContextFactory(settings_for(db_url))  # kept, like a worker's
    first = store(engine, adt("R1", sender="NEWLAB"))
    process_batch(engine, [first], now=NOW, contexts=contexts)
    assert "system" not in patient_identifier(engine, first)  # no rule: no system

    save_sender(engine, HL7Sender(application="NEWLAB", facility="MAIN",
                                  identifier_systems={"MRN": "urn:oid:1.2.3"}),
                actor="ada", now=NOW)
    second = store(engine, adt("R2", sender="NEWLAB"))
    process_batch(engine, [second], now=NOW, contexts=contexts)
    assert patient_identifier(engine, second)["system"] == "urn:oid:1.2.3"


def test_hold_fails_an_unregistered_sender_until_registered_and_replayed(
        engine: Engine, db_url: str) -> None:
    settings = settings_for(db_url, hl7_unregistered_senders="hold", hl7_senders=(
        HL7Sender(application="EPIC", facility="MAIN"),))
    contexts = ContextFactory(settings)
    known = store(engine, adt("K1", sender="EPIC"))
    held = store(engine, adt("N1", sender="NEWLAB", extra_msh="|||AL|AL"))
    outcomes = {o.inbox_id: o for o in process_batch(engine, [known, held], now=NOW,
                                                     contexts=contexts)}
    assert outcomes[known].status == "processed"
    assert outcomes[held].status == "failed"
    row = get(engine, held)
    expected = unregistered_error("NEWLAB", "MAIN")
    assert row.status == "failed" and row.last_error == expected
    assert expected.startswith('sender "NEWLAB|MAIN" is not registered')
    assert "Senders in the console" in expected and "replay" in expected
    assert msa(row.app_ack)[1] == "AE" and "not registered" in err(row.app_ack)[-1]

    # Still held after a replay without a rule...
    requeue(engine, ids=[held])
    assert process_message(engine, held, now=NOW, contexts=contexts).status == "failed"  # type: ignore[union-attr]
    # ... processed once the sender is registered (no other setting needed).
    save_sender(engine, HL7Sender(application="NEWLAB", facility="MAIN"), actor="ada", now=NOW)
    requeue(engine, ids=[held])
    outcome = process_message(engine, held, now=NOW, contexts=contexts)
    assert outcome is not None and outcome.status == "processed"
    row = get(engine, held)
    assert row.last_error is None and msa(row.app_ack)[1] == "AA"


def test_accept_mode_processes_unregistered_senders(engine: Engine, db_url: str) -> None:
    contexts = ContextFactory(settings_for(db_url))
    inbox_id = store(engine, adt("A1", sender="NEWLAB"))
    assert process_message(engine, inbox_id, now=NOW, contexts=contexts).status == "processed"  # type: ignore[union-attr]


def test_work_process_uses_the_console_rules(sqlite_url: str) -> None:
    """``careloop serve`` converts in a child process: it gets the rules with each batch."""
    settings = settings_for(sqlite_url, hl7_unregistered_senders="hold")
    engine = create_db_engine(sqlite_url)
    pool = WorkPool(settings, processes=1, niceness=0)
    contexts = ContextFactory(settings)
    try:
        held = store(engine, adt("W1", sender="NEWLAB"))
        process_batch(engine, [held], now=NOW, contexts=contexts, run=pool)
        assert get(engine, held).last_error == unregistered_error("NEWLAB", "MAIN")
        save_sender(engine, HL7Sender(application="NEWLAB", identifier_systems={
            "MRN": "urn:oid:4.5.6"}), actor="ada", now=NOW)
        requeue(engine, ids=[held])
        outcomes = process_batch(engine, [held], now=NOW, contexts=contexts, run=pool)
        assert [o.status for o in outcomes] == ["processed"]
        assert patient_identifier(engine, held)["system"] == "urn:oid:4.5.6"
    finally:
        pool.close()
        engine.dispose()


async def test_application_ack_goes_to_the_console_ack_to(sqlite_url: str) -> None:
    from adapters.mllp import MLLPServer

    received: list[bytes] = []

    async def listener(payload: bytes, peer: str) -> bytes | None:
        received.append(payload)
        return None

    server = MLLPServer(listener)
    host, port = await server.start("127.0.0.1", 0)
    settings = settings_for(sqlite_url)
    engine = create_db_engine(sqlite_url)
    try:
        inbox_id = store(engine, adt("AK1", sender="NEWLAB", extra_msh="|||AL|AL"))
        process_message(engine, inbox_id, now=NOW)
        assert await asyncio.to_thread(deliver_app_acks, engine, settings) == 0  # no ack_to
        save_sender(engine, HL7Sender(application="NEWLAB", ack_to=f"{host}:{port}"),
                    actor="ada", now=NOW)
        await asyncio.sleep(2.1)  # delivery checks the console's rules every 2 s
        assert await asyncio.to_thread(deliver_app_acks, engine, settings) == 1
        assert msa(received[0])[1:3] == ["AA", "AK1"]
        assert get(engine, inbox_id).app_ack_sent_at is not None
    finally:
        engine.dispose()
        await server.close()


# --- the console's form -----------------------------------------------------------------------


def test_validate_sender_accepts_a_full_form() -> None:
    rule = validate_sender({
        "application": " NEWLAB ", "facility": "NORTH", "timezone": "America/Chicago",
        "identifier_systems": "MRN = urn:oid:1.2.3\n\n# comment\nPI=https://h.example/pi\n",
        "ack_to": "engine.example:2576",
    })
    assert rule == HL7Sender(application="NEWLAB", facility="NORTH", timezone="America/Chicago",
                             identifier_systems={"MRN": "urn:oid:1.2.3",
                                                 "PI": "https://h.example/pi"},
                             ack_to="engine.example:2576")
    assert validate_sender({"application": "X"}) == HL7Sender(application="X")


@pytest.mark.parametrize(("form", "message"), [
    ({"application": ""}, "application: required"),
    ({"application": "EPIC^1.2^ISO"}, "application: 'EPIC^1.2^ISO' may not contain"),
    ({"application": "EPIC", "facility": "A|B"}, "facility:"),
    ({"application": "EPIC", "timezone": "Mars/Olympus"}, "time zone: unknown time zone"),
    ({"application": "EPIC", "identifier_systems": "MRN urn:oid:1"}, "line 1: write AUTHORITY"),
    ({"application": "EPIC", "identifier_systems": "MRN = not a uri"}, "is not a URI"),
    ({"application": "EPIC", "identifier_systems": "MRN = urn:a\nMRN = urn:b"}, "twice"),
    ({"application": "EPIC", "ack_to": "engine"}, "ACK to: 'engine' is not host:port"),
    ({"application": "EPIC", "ack_to": "engine:99999"}, "is not host:port"),
])
def test_validate_sender_names_the_bad_field(form: dict[str, str], message: str) -> None:
    with pytest.raises(SenderError, match=message.replace("^", r"\^").replace("|", r"\|")):
        validate_sender(form)
