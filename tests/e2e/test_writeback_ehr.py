"""Write-back end to end against the stand-in EHR (SMART Backend Services required): touches
become Communications exactly once under a 503 on the POST, a dropped connection, a write
whose result was lost (the rows written again after a crash), and expired tokens; patient
requests become an Appointment update, an AppointmentResponse or a Task."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, update

from adapters.fhir import FHIRClient, SigningKey, save_private_key
from integration.db import create_db_engine, write_lock
from integration.fhir_ingest import fhir_source
from integration.models import ehr_outbox, timeline_entries
from integration.settings import Connection, Settings
from integration.timeline import apply_batch
from integration.writeback import (
    WRITEBACK_SYSTEM,
    WritebackStage,
    enqueue_request,
    enqueue_touch,
    touch_key_of,
)
from tests.e2e.ehr import CLIENT_ID
from tests.helpers import settings_for
from tests.writeback.support import add_touch, fhir_entry, outbox

pytestmark = pytest.mark.slow

EHR = "main-ehr"
TOUCHES = 30


@dataclass
class World:
    ehr: FHIRClient
    admin: httpx.AsyncClient
    engine: Engine
    pem: Path
    base: str
    patient_id: str
    appointment_id: str
    entry_id: str
    timeline_patient: str

    def settings(self, **connection: Any) -> Settings:
        conn = Connection(name=EHR, fhir_base=self.base, client_id=CLIENT_ID,
                          private_key=self.pem, scopes=("system/*.*",), mode="poll",
                          **connection)
        return settings_for(str(self.engine.url), connections=(conn,))

    async def fault(self, rule: dict[str, Any]) -> None:
        (await self.admin.post("/_admin/faults", json=rule)).raise_for_status()

    async def _requests(self) -> list[dict[str, Any]]:
        """The EHR's request log since the last call (then cleared)."""
        answer = (await self.admin.get("/_admin/requests")).json()
        (await self.admin.delete("/_admin/requests")).raise_for_status()
        return list(answer if isinstance(answer, list) else answer.get("requests", []))

    async def faults_seen(self) -> list[str]:
        """Which injected faults careloop's requests met (kind only), since the last call."""
        return [str(e["fault"]).split(" (")[0] for e in await self._requests() if e.get("fault")]

    async def statuses_seen(self) -> list[int]:
        return [int(e["status"]) for e in await self._requests() if e.get("status")]

    async def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        return [r async for r in self.ehr.search(resource_type, {"_count": "1000", **params})]

    async def communications(self) -> Counter[str]:
        """Identifier value → how many Communications carry it (careloop's system only)."""
        found: Counter[str] = Counter()
        for resource in await self.search("Communication"):
            for ident in resource.get("identifier") or []:
                if ident.get("system") == WRITEBACK_SYSTEM:
                    found[ident["value"]] += 1
        return found


@pytest.fixture
async def world(ehr_origin: str, key: SigningKey, tmp_path: Path,
                sqlite_url: str) -> AsyncIterator[World]:
    base = f"{ehr_origin}/fhir/R4"
    engine = create_db_engine(sqlite_url)
    pem = save_private_key(key, tmp_path / "careloop.pem")
    async with httpx.AsyncClient(base_url=ehr_origin) as admin:
        (await admin.post("/_admin/reset")).raise_for_status()
        client = FHIRClient.connect(fhir_base=base, client_id=CLIENT_ID, private_key=pem,
                                    scopes=["system/*.*"])
        async with client:
            patient = (await client.create({"resourceType": "Patient", "identifier": [
                {"system": "urn:oid:2.16.840.1.113883.19.5", "value": "MRN-WB-1"}],
                "name": [{"family": "Doe", "given": ["Jane"]}]})).resource
            assert patient is not None
            appointment = (await client.create({
                "resourceType": "Appointment", "status": "booked",
                "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.6", "value": "APT-1"}],
                "start": "2030-02-01T15:00:00Z", "end": "2030-02-01T15:30:00Z",
                "participant": [{"actor": {"reference": f"Patient/{patient['id']}"},
                                 "status": "needs-action"}]})).resource
            assert appointment is not None
            # on the timeline as FHIR ingestion puts them there
            now = datetime.now(UTC)
            with write_lock(engine), engine.begin() as conn:
                apply_batch(conn, [([r], fhir_source(EHR, r, fallback=now))
                                   for r in (patient, appointment)], now)
            entry_id = fhir_entry(engine, appointment["id"])
            with engine.connect() as conn:
                owner = conn.execute(timeline_entries.select().where(
                    timeline_entries.c.id == entry_id)).one().patient_id
            yield World(client, admin, engine, pem, base, patient["id"], appointment["id"],
                        entry_id, owner)
    engine.dispose()


def _touches(world: World, settings: Settings, prefix: str, n: int) -> list[str]:
    """``n`` touches recorded by the sender (sent, with some failed and skipped), each owed
    to the EHR in the transaction that recorded it; returns their outbox keys."""
    keys = []
    now = datetime.now(UTC)
    for i in range(n):
        status, reason = (("failed", "provider error 30003") if i % 10 == 3 else
                          ("skipped", "patient opted out of sms") if i % 10 == 7 else
                          ("sent", None))
        touch = add_touch(world.engine, entry_id=world.entry_id,
                          patient_id=world.timeline_patient, key=f"{prefix}|{i}|{world.entry_id}",
                          status=status, reason=reason, sent_at=now)
        with write_lock(world.engine), world.engine.begin() as conn:
            assert enqueue_touch(conn, settings, touch, now=now)
        keys.append(touch_key_of(touch["key"]) + ("-skip" if status == "skipped" else ""))
    return keys


async def _flush_all(stage: WritebackStage, rounds: int = 10) -> None:
    """Flush until nothing is pending or sending (retries wait out their backoff)."""
    for _ in range(rounds):
        await asyncio.to_thread(stage.run_once)
        rows = outbox(stage.engine)
        if all(r.status in ("written", "failed") for r in rows):
            return
        due = min(r.next_attempt_at for r in rows if r.status == "pending")
        wait = (due.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
        await asyncio.sleep(max(0.0, min(wait, 15.0)) + 0.05)
    raise AssertionError([(r.key, r.status, r.last_error) for r in outbox(stage.engine)])


async def _exactly_once(world: World, keys: list[str]) -> None:
    found = await world.communications()
    assert {k: found[k] for k in keys} == dict.fromkeys(keys, 1)
    assert sum(found.values()) == len(keys)  # nothing else either
    for k in keys[:3]:  # the conditional create's own search finds exactly that one
        hits = await world.search("Communication", identifier=f"{WRITEBACK_SYSTEM}|{k}")
        assert len(hits) == 1


async def test_touches_exactly_once_under_faults(world: World) -> None:
    settings = world.settings()
    stage = WritebackStage(world.engine, settings)
    try:
        # (a) 503 on the Communication POST, with Retry-After: twice (the client's own
        # retries absorb it), then five times in a row (the outbox waits and tries again)
        keys = _touches(world, settings, "a", TOUCHES)
        await world.fault({"kind": "error", "status": 503, "count": 2, "method": "POST",
                           "retryAfter": 1})
        await _flush_all(stage)
        keys += _touches(world, settings, "a2", 5)
        await world.fault({"kind": "error", "status": 503, "count": 5, "method": "POST",
                           "retryAfter": 1})
        first = await asyncio.to_thread(stage.run_once)
        assert (first.claimed, first.retried) == (5, 5)
        waiting = [r for r in outbox(world.engine) if r.status == "pending"]
        assert len(waiting) == 5 and all("HTTP 503" in r.last_error for r in waiting)
        await _flush_all(stage)
        await _exactly_once(world, keys)
        assert await world.faults_seen() == ["error 503"] * 7
        rows = outbox(world.engine)
        assert all(r.status == "written" and r.ehr_ref.startswith("Communication/")
                   for r in rows)
        sample = next(r for r in await world.search("Communication")
                      if r["identifier"][0]["value"] == keys[0])
        assert sample["subject"] == {"reference": f"Patient/{world.patient_id}"}
        assert sample["about"] == [{"reference": f"Appointment/{world.appointment_id}"}]
        assert sample["medium"][0]["coding"][0]["code"] == "SMSWRIT"
        assert sample["status"] == "completed" and sample["payload"][0]["contentString"]

        # (b) a dropped connection, then results lost: every row written again after a crash
        more = _touches(world, settings, "b", 10)
        await world.fault({"kind": "disconnect", "count": 1, "method": "POST"})
        await _flush_all(stage)
        assert await world.faults_seen() == ["disconnect"]
        with world.engine.begin() as conn:  # as a crash between the write and the record
            conn.execute(update(ehr_outbox).values(
                status="sending", ehr_ref=None,
                updated_at=datetime.now(UTC) - timedelta(minutes=10)))
        await _flush_all(stage)
        keys += more
        await _exactly_once(world, keys)
        assert all(r.status == "written" and r.ehr_ref for r in outbox(world.engine))

        # (c) every token issued so far stops working
        await world.fault({"kind": "expire-tokens"})
        keys += _touches(world, settings, "c", 5)
        await _flush_all(stage)
        await _exactly_once(world, keys)
        assert {r.status for r in outbox(world.engine)} == {"written"}
        assert 401 in await world.statuses_seen()
    finally:
        await asyncio.to_thread(stage.stop)


def _request(world: World, settings: Settings, action: str, request_id: int) -> None:
    with write_lock(world.engine), world.engine.begin() as conn:
        assert enqueue_request(conn, settings, request_id=request_id, action=action,
                               entry_id=world.entry_id, patient_id=world.timeline_patient,
                               source="sms", detail=None, now=datetime.now(UTC))


async def test_confirm_updates_the_appointment_where_allowed(world: World) -> None:
    settings = world.settings(appointment_updates=True)
    stage = WritebackStage(world.engine, settings)
    try:
        _request(world, settings, "confirm", 1)
        await _flush_all(stage)
    finally:
        await asyncio.to_thread(stage.stop)
    appointment = await world.ehr.read("Appointment", world.appointment_id)
    assert appointment["participant"][0]["status"] == "accepted"
    assert appointment["status"] == "booked"
    (row,) = outbox(world.engine)
    assert (row.status, row.ehr_ref) == ("written", f"Appointment/{world.appointment_id}")


async def test_requests_without_appointment_updates(world: World) -> None:
    settings = world.settings()
    stage = WritebackStage(world.engine, settings)
    try:
        _request(world, settings, "confirm", 1)
        _request(world, settings, "cancel", 2)
        await _flush_all(stage)
    finally:
        await asyncio.to_thread(stage.stop)
    assert {r.status for r in outbox(world.engine)} == {"written"}
    (response,) = await world.search("AppointmentResponse",
                                     identifier=f"{WRITEBACK_SYSTEM}|request-1-confirm")
    assert response["appointment"] == {"reference": f"Appointment/{world.appointment_id}"}
    assert response["participantStatus"] == "accepted"
    (task,) = await world.search("Task", identifier=f"{WRITEBACK_SYSTEM}|request-2-cancel")
    assert task["focus"] == {"reference": f"Appointment/{world.appointment_id}"}
    assert task["for"] == {"reference": f"Patient/{world.patient_id}"}
    assert task["status"] == "requested" and task["code"]["text"] == "Cancel appointment"
    appointment = await world.ehr.read("Appointment", world.appointment_id)
    assert appointment["status"] == "booked"  # staff decide; careloop did not cancel it
