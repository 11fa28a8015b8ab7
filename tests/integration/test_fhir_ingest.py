"""Processing of fhir inbox rows: resources read and applied, tracking, catch-up, polling."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from adapters.fhir import FHIRRequest
from integration.db import create_db_engine
from integration.fhir_ingest import FhirIngest, fhir_source
from integration.fhir_notify import notification_row
from integration.fhir_state import ensure_subscription_row, read_subscription_row
from integration.models import fhir_subscriptions, inbox, timeline_entries
from subscriptions import CatchUp, TrackerState
from tests.helpers import settings_for
from tests.integration.test_fhir_notify import notification_files
from tests.subscriptions.fake_api import FakeApi, appt, searchset

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
PATIENT = {"resourceType": "Patient", "id": "p1", "meta": {"versionId": "1",
           "lastUpdated": "2026-03-01T08:00:00Z"},
           "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN1"}]}


def _conn(**extra: Any) -> dict[str, Any]:
    return {"name": "ehr1", "fhir_base": "http://ehr.invalid/fhir", "client_id": "careloop",
            "mode": "classic", "resource_types": ["Appointment"], **extra}


def appointment(rid: str, updated: str, version: str = "1",
                status: str = "booked") -> dict[str, Any]:
    res = appt(rid, updated, version, status)
    res.update(identifier=[{"system": "urn:ehr:appt", "value": rid}],
               start="2026-03-10T15:00:00Z",
               participant=[{"actor": {"reference": "Patient/p1"}, "status": "accepted"}])
    return res


def notification(sub: str, numbers: list[int], *, kind: str = "event-notification",
                 since: int | None = None, focus: str | None = None) -> bytes:
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"Subscription/{sub}"}},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start",
         "valueString": str(since if since is not None else max(numbers, default=0))},
    ]
    for n in numbers:
        params.append({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": str(n)},
            {"name": "timestamp", "valueInstant": f"2026-03-01T09:00:0{n % 10}Z"},
            {"name": "focus",
             "valueReference": {"reference": f"Appointment/{focus or f'a{n}'}"}}]})
    return json.dumps({"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters",
                                                "parameter": params}}]}).encode()


class Ehr:
    """A fake EHR: Appointments and Patients by id, search by _lastUpdated, no $events."""

    def __init__(self) -> None:
        self.store: dict[str, dict[str, Any]] = {"Patient/p1": PATIENT}

    def put(self, res: dict[str, Any]) -> None:
        self.store[f"{res['resourceType']}/{res['id']}"] = res

    def __call__(self, request: FHIRRequest, params: dict[str, str]) -> Any:
        path = request.path.split("?")[0]
        if path == "metadata":
            return {"resourceType": "CapabilityStatement", "rest": [{"mode": "server"}]}
        of_type = [r for k, r in self.store.items() if k.startswith(f"{path}/")]
        if "_id" in params:
            ids = params["_id"].split(",")
            return searchset([r for r in of_type if r["id"] in ids])
        if "_lastUpdated" in params:
            since = params["_lastUpdated"][2:]
            return searchset(sorted((r for r in of_type if r["meta"]["lastUpdated"] >= since),
                                    key=lambda r: r["meta"]["lastUpdated"]))
        if "identifier" in params:
            return searchset([])
        return searchset(of_type)


@pytest.fixture
def ehr() -> Ehr:
    return Ehr()


@pytest.fixture
def clock() -> list[datetime]:
    return [T0]


def _ingest(db_url: str, ehr: Ehr, clock: list[datetime], **conn: Any) -> FhirIngest:
    settings = settings_for(db_url, connections=[_conn(**conn)])
    engine = create_db_engine(db_url)
    api = FakeApi(ehr)
    return FhirIngest(engine, settings, client_factory=lambda _c: api, clock=lambda: clock[0])


@pytest.fixture
def ingest(db_url: str, ehr: Ehr, clock: list[datetime]) -> Iterator[FhirIngest]:
    ing = _ingest(db_url, ehr, clock)
    with ing.engine.begin() as conn:
        ensure_subscription_row(conn, "ehr1", "Appointment", mode="classic", now=T0)
        conn.execute(fhir_sub_update("sub1", TrackerState.new("sub1", now=T0)))
    yield ing
    ing.engine.dispose()


def fhir_sub_update(sub: str, state: TrackerState) -> Any:
    return fhir_subscriptions.update().values(subscription_id=sub, tracker=state.to_json())


def store(engine: Engine, body: bytes) -> int:
    row, error = notification_row("ehr1", body, now=T0, stale_after=timedelta(seconds=60))
    assert error is None, error
    with engine.begin() as conn:
        return int(conn.execute(insert(inbox).values(**row).returning(inbox.c.id)).scalar_one())


def entries(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {r.resource["id"]: r.status for r in conn.execute(
            select(timeline_entries).where(timeline_entries.c.resource_type == "Appointment"))}


def tracker(engine: Engine) -> TrackerState:
    with engine.connect() as conn:
        row = read_subscription_row(conn, "ehr1", "Appointment")
    assert row is not None and row.tracker is not None
    return TrackerState.from_json(row.tracker)


class TestNotifications:
    async def test_id_only_event_read_and_applied_with_its_patient(
            self, ingest: FhirIngest, ehr: Ehr) -> None:
        ehr.put(appointment("a1", "2026-03-01T09:00:01Z"))
        inbox_id = store(ingest.engine, notification("sub1", [1]))
        (outcome,) = await ingest.process([inbox_id])
        assert outcome.status == "processed", outcome.error
        assert entries(ingest.engine) == {"a1": "booked"}
        with ingest.engine.connect() as conn:
            kinds = {r.kind for r in conn.execute(select(timeline_entries))}
        assert "patient" in kinds
        assert tracker(ingest.engine).contiguous == 1
        assert await ingest.process([inbox_id]) == []  # already processed

    async def test_update_then_cancel_newest_wins_in_any_order(
            self, ingest: FhirIngest, ehr: Ehr) -> None:
        ehr.put(appointment("a1", "2026-03-01T09:00:05Z", "3", "cancelled"))
        await ingest.process([store(ingest.engine, notification("sub1", [2], focus="a1"))])
        ehr.put(appointment("a1", "2026-03-01T09:00:01Z", "1"))  # a stale replica, say
        await ingest.process([store(ingest.engine, notification("sub1", [1], focus="a1"))])
        assert entries(ingest.engine) == {"a1": "cancelled"}
        ehr.put(appointment("a1", "2026-03-01T09:00:09Z", "4", "booked"))  # rebooked
        await ingest.process([store(ingest.engine, notification("sub1", [3], focus="a1"))])
        assert entries(ingest.engine) == {"a1": "booked"}

    async def test_reordered_events_leave_no_gap(self, ingest: FhirIngest, ehr: Ehr) -> None:
        for n in (1, 2, 3):
            ehr.put(appointment(f"a{n}", f"2026-03-01T09:00:0{n}Z"))
        ids = [store(ingest.engine, notification("sub1", [n])) for n in (3, 1, 2)]
        await ingest.process(ids)
        state = tracker(ingest.engine)
        assert state.contiguous == 3 and not state.has_gap
        assert set(entries(ingest.engine)) == {"a1", "a2", "a3"}

    async def test_gap_then_catch_up_by_search(self, ingest: FhirIngest, ehr: Ehr,
                                               clock: list[datetime]) -> None:
        for n in (1, 2, 3):
            ehr.put(appointment(f"a{n}", f"2026-03-01T09:00:0{n}Z"))
        ids = [store(ingest.engine, notification("sub1", [n])) for n in (1, 3)]  # 2 dropped
        await ingest.process(ids)
        assert set(entries(ingest.engine)) == {"a1", "a3"}
        assert tracker(ingest.engine).has_gap
        clock[0] = T0 + timedelta(seconds=11)  # past the grace period
        assert await ingest.tick() == 1
        assert set(entries(ingest.engine)) == {"a1", "a2", "a3"}
        state = tracker(ingest.engine)
        assert state.contiguous == 3 and not state.has_gap

    async def test_one_catch_up_at_a_time(self, ingest: FhirIngest) -> None:
        decision = CatchUp("gap", (), None, 0)
        assert ingest._claim_catch_up("ehr1", "Appointment", T0)
        assert not await ingest.catch_up(ingest.settings.connections[0], "Appointment",
                                         decision)

    async def test_network_error_retried_later(self, ingest: FhirIngest, ehr: Ehr) -> None:
        def broken(request: FHIRRequest, params: dict[str, str]) -> Any:
            raise RuntimeError("connection reset")
        ingest._clients["ehr1"] = FakeApi(broken)
        inbox_id = store(ingest.engine, notification("sub1", [1]))
        (outcome,) = await ingest.process([inbox_id])
        assert outcome.status == "received"
        with ingest.engine.connect() as conn:
            row = conn.execute(select(inbox).where(inbox.c.id == inbox_id)).one()
        assert row.attempts == 1 and row.next_attempt_at is not None and row.last_error

    @pytest.mark.corpus
    async def test_every_corpus_notification_processes(self, db_url: str, ehr: Ehr,
                                                       clock: list[datetime]) -> None:
        files = notification_files()
        if not files:
            pytest.skip("shared corpus not found")
        ing = _ingest(db_url, ehr, clock, resource_types=["Encounter"])
        try:
            ids = [store(ing.engine, p.read_bytes()) for p in files]
            outcomes = await ing.process(ids)
            assert [(o.status, o.error) for o in outcomes] == [("processed", None)] * len(files)
        finally:
            ing.engine.dispose()


class TestPolling:
    async def test_poll_applies_and_stores_the_cursor(self, db_url: str, ehr: Ehr,
                                                      clock: list[datetime]) -> None:
        ing = _ingest(db_url, ehr, clock, mode="poll")
        try:
            ehr.put(appointment("a1", "2026-03-01T09:00:01Z"))
            conn = ing.settings.connections[0]
            assert await ing.poll(conn, "Appointment") >= 1
            assert entries(ing.engine) == {"a1": "booked"}
            assert await ing.poll(conn, "Appointment") == 0  # nothing new
            ehr.put(appointment("a1", "2026-03-01T09:05:00Z", "2", "cancelled"))
            assert await ing.poll(conn, "Appointment") >= 1
            assert entries(ing.engine) == {"a1": "cancelled"}
            with ing.engine.connect() as c:
                row = read_subscription_row(c, "ehr1", "Appointment")
            assert row is not None and row.poll_cursor is not None
            assert row.poll_cursor["since"].startswith("2026-03-01T09:05:00")
        finally:
            ing.engine.dispose()


def test_fhir_source_uses_meta() -> None:
    src = fhir_source("ehr1", appointment("a1", "2026-03-01T09:00:01Z", "7"), fallback=T0)
    assert (src.system, src.ref, src.version) == ("fhir", "Appointment/a1/_history/7", "7")
    assert src.ordinal == datetime(2026, 3, 1, 9, 0, 1, tzinfo=UTC)



async def test_poll_timer_runs_at_the_interval(db_url: str, ehr: Ehr,
                                               clock: list[datetime]) -> None:
    ing = _ingest(db_url, ehr, clock, mode="poll", poll_interval_s=60)
    try:
        ehr.put(appointment("a1", "2026-03-01T09:00:01Z"))
        assert await ing.tick() == 1
        assert await ing.tick() == 0  # not due yet
        clock[0] = T0 + timedelta(seconds=61)
        assert await ing.tick() == 1
        assert entries(ing.engine) == {"a1": "booked"}
    finally:
        ing.engine.dispose()


def test_celery_hands_fhir_rows_to_their_task(db_url: str) -> None:
    """``forward`` (called by ``careloop.process``) sends notification rows to
    ``careloop.fhir.process``, which processes them; HL7 rows are not its business."""
    from celery import Celery

    from integration.fhir_tasks import fhir_schedule, register_fhir_tasks

    settings = settings_for(db_url, connections=[_conn()])
    app = Celery("fhir-test", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.task_always_eager = True
    engine = create_db_engine(db_url)
    try:
        forward = register_fhir_tasks(app, settings, lambda: engine)
        inbox_id = store(engine, notification("sub9", [], kind="heartbeat", since=0))
        forward(engine, [inbox_id, inbox_id + 1000])
        with engine.connect() as conn:
            status = conn.execute(select(inbox.c.status).where(inbox.c.id == inbox_id)).one()[0]
        assert status == "processed"
        assert fhir_schedule(settings)["fhir-tick"]["task"] in app.tasks
    finally:
        engine.dispose()
