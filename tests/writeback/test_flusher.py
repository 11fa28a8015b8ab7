"""The flusher against a respx EHR (both databases): batch Bundles of conditional creates,
the fallback to one conditional create per row, per-entry rejections kept with their
OperationOutcome text, Retry-After honoured, Appointment updates with If-Match, replay."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import respx
from sqlalchemy import Engine, update

from adapters.fhir import FHIRApi, FHIRClient, RetryPolicy
from integration.db import write_lock
from integration.models import ehr_outbox
from integration.settings import Connection, Settings
from integration.writeback import WRITEBACK_SYSTEM, WritebackStage, enqueue, flush, replay
from tests.writeback.support import BASE, EHR, NOW, outbox, settings, utc

CAPS = {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
        "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "interaction": [{"code": "batch"}, {"code": "transaction"}]}]}
NO_BATCH = {**CAPS, "rest": [{"mode": "server", "interaction": [{"code": "search-system"}]}]}


def _outcome(text: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "invalid", "details": {"text": text}}]}


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as r:
        yield r


@pytest.fixture
def cfg(db_url: str) -> Settings:
    return settings(db_url)


def _client(attempts: int = 3) -> FHIRClient:
    return FHIRClient(BASE, sleep=Sleeps(), rng=lambda: 1.0, retry=RetryPolicy(attempts=attempts))


def _add(engine: Engine, n: int, *, prefix: str = "touch-", now: datetime = NOW) -> list[str]:
    keys = [f"{prefix}{i}" for i in range(n)]
    with write_lock(engine), engine.begin() as conn:
        for key in keys:
            enqueue(conn, key=key, connection=EHR, resource_type="Communication", now=now,
                    resource={"resourceType": "Communication", "status": "completed",
                              "payload": [{"contentString": f"message {key}"}]})
    return keys


async def _flush(engine: Engine, cfg: Settings, client: FHIRApi, **kw: Any) -> Any:
    def client_for(_connection: Connection) -> FHIRApi:
        return client
    return await flush(engine, cfg, client_for, now=kw.pop("now", NOW), batch_support={}, **kw)


def _batch_answer(request: httpx.Request, statuses: dict[int, tuple[int, Any]] | None = None
                  ) -> httpx.Response:
    bundle = json.loads(request.content)
    entries = []
    for i, _entry in enumerate(bundle["entry"]):
        status, extra = (statuses or {}).get(i, (201, None))
        if status < 300:
            entries.append({"response": {
                "status": f"{status} {'Created' if status == 201 else 'OK'}",
                "location": f"Communication/c{i}/_history/1"}})
        else:
            entries.append({"response": {"status": str(status), "outcome": extra}})
    return httpx.Response(200, json={"resourceType": "Bundle", "type": "batch-response",
                                     "entry": entries})


async def test_batch_of_conditional_creates(engine: Engine, cfg: Settings,
                                            router: respx.MockRouter) -> None:
    keys = _add(engine, 3)
    router.get(f"{BASE}/metadata").respond(json=CAPS)
    seen: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return _batch_answer(request, {1: (200, None)})  # already there: found, not created

    router.post(f"{BASE}/").mock(side_effect=answer)
    result = await _flush(engine, cfg, _client())
    assert (result.claimed, result.written, result.failed, result.retried) == (3, 3, 0, 0)
    (bundle,) = seen
    assert bundle["type"] == "batch"
    assert [e["request"] for e in bundle["entry"]] == [
        {"method": "POST", "url": "Communication",
         "ifNoneExist": f"identifier={WRITEBACK_SYSTEM}|{k}"} for k in keys]
    assert bundle["entry"][0]["resource"]["identifier"][0] == {"system": WRITEBACK_SYSTEM,
                                                                "value": keys[0]}
    rows = outbox(engine)
    assert [(r.status, r.ehr_ref, r.attempts) for r in rows] == [
        ("written", f"Communication/c{i}", 1) for i in range(3)]
    assert (await _flush(engine, cfg, _client())).claimed == 0


async def test_more_than_a_bundle(engine: Engine, cfg: Settings,
                                  router: respx.MockRouter) -> None:
    _add(engine, 130)
    router.get(f"{BASE}/metadata").respond(json=CAPS)
    sizes: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sizes.append(len(json.loads(request.content)["entry"]))
        return _batch_answer(request)

    router.post(f"{BASE}/").mock(side_effect=answer)
    result = await _flush(engine, cfg, _client(), limit=200)
    assert result.written == 130 and sizes == [100, 30]


def _single_creates(router: respx.MockRouter, headers: list[str]) -> None:
    def create(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers["If-None-Exist"])
        n = len(headers)
        body = {**json.loads(request.content), "id": f"s{n}"}
        return httpx.Response(201, json=body, headers={
            "Location": f"{BASE}/Communication/s{n}/_history/1"})

    router.post(f"{BASE}/Communication").mock(side_effect=create)


async def test_no_batch_in_capabilities_means_one_create_each(
        engine: Engine, cfg: Settings, router: respx.MockRouter) -> None:
    keys = _add(engine, 2)
    router.get(f"{BASE}/metadata").respond(json=NO_BATCH)
    batch = router.post(f"{BASE}/").respond(500)
    headers: list[str] = []
    _single_creates(router, headers)
    result = await _flush(engine, cfg, _client())
    assert result.written == 2 and not batch.called
    assert headers == [f"identifier={WRITEBACK_SYSTEM}|{k}" for k in keys]
    assert [r.ehr_ref for r in outbox(engine)] == ["Communication/s1", "Communication/s2"]


async def test_refused_batch_falls_back_and_is_remembered(
        engine: Engine, cfg: Settings, router: respx.MockRouter) -> None:
    _add(engine, 2)
    router.get(f"{BASE}/metadata").respond(json=CAPS)
    batch = router.post(f"{BASE}/").respond(405, json=_outcome("batch is not supported"))
    headers: list[str] = []
    _single_creates(router, headers)
    cache: dict[str, bool] = {}
    client = _client()
    result = await flush(engine, cfg, lambda _c: client, now=NOW, batch_support=cache)
    assert result.written == 2 and batch.call_count == 1 and len(headers) == 2
    _add(engine, 1, prefix="later-")
    result = await flush(engine, cfg, lambda _c: client, now=NOW, batch_support=cache)
    assert result.written == 1 and batch.call_count == 1  # not asked again


async def test_rejected_entry_keeps_the_outcome_text_and_replays(
        engine: Engine, cfg: Settings, router: respx.MockRouter) -> None:
    _add(engine, 3)
    router.get(f"{BASE}/metadata").respond(json=CAPS)
    rejection = _outcome("Communication.payload: content is required")
    router.post(f"{BASE}/").mock(
        side_effect=lambda request: _batch_answer(request, {1: (422, rejection),
                                                            2: (503, None)}))
    result = await _flush(engine, cfg, _client())
    assert (result.written, result.failed, result.retried) == (1, 1, 1)
    ok, bad, busy = outbox(engine)
    assert ok.status == "written"
    assert bad.status == "failed"
    assert "HTTP 422" in bad.last_error
    assert "Communication.payload: content is required" in bad.last_error
    assert busy.status == "pending" and utc(busy.next_attempt_at) == NOW + timedelta(seconds=5)

    assert replay(engine, failed=True, now=NOW) == 1
    again = outbox(engine)[1]
    assert (again.status, again.attempts) == ("pending", 0)
    router.post(f"{BASE}/").mock(side_effect=_batch_answer)
    result = await _flush(engine, cfg, _client(), now=NOW + timedelta(minutes=1))
    assert result.written == 2
    assert {r.status for r in outbox(engine)} == {"written"}


async def test_503_with_retry_after_waits_at_least_that(
        engine: Engine, cfg: Settings, router: respx.MockRouter) -> None:
    _add(engine, 2)
    router.get(f"{BASE}/metadata").respond(json=CAPS)
    router.post(f"{BASE}/").respond(503, headers={"Retry-After": "120"},
                                    json=_outcome("maintenance"))
    result = await _flush(engine, cfg, _client(attempts=1))
    assert (result.written, result.retried) == (0, 2)
    for row in outbox(engine):
        assert row.status == "pending" and row.attempts == 1
        assert utc(row.next_attempt_at) >= NOW + timedelta(seconds=120)
        assert "HTTP 503" in row.last_error and "maintenance" in row.last_error
    # not due yet: nothing claimed
    assert (await _flush(engine, cfg, _client(), now=NOW + timedelta(seconds=60))).claimed == 0


async def test_backoff_grows_without_retry_after(engine: Engine, cfg: Settings,
                                                 router: respx.MockRouter) -> None:
    _add(engine, 1)
    router.get(f"{BASE}/metadata").respond(json=CAPS)
    router.post(f"{BASE}/").respond(502)
    now = NOW
    waits = []
    for _ in range(3):
        await _flush(engine, cfg, _client(attempts=1), now=now)
        (row,) = outbox(engine)
        waits.append((utc(row.next_attempt_at) - now).total_seconds())
        now = utc(row.next_attempt_at)
    assert waits == [5.0, 10.0, 20.0]


async def test_authentication_failure_stays_pending(engine: Engine, cfg: Settings,
                                                    router: respx.MockRouter) -> None:
    _add(engine, 2)
    router.get(f"{BASE}/metadata").respond(json=CAPS)
    router.post(f"{BASE}/").respond(401, json=_outcome("invalid token"))
    result = await _flush(engine, cfg, _client())
    assert result.retried == 2
    for row in outbox(engine):
        assert row.status == "pending" and "authentication failed" in row.last_error


async def test_crashed_sending_rows_are_taken_again(engine: Engine, cfg: Settings,
                                                    router: respx.MockRouter) -> None:
    _add(engine, 2)
    with engine.begin() as conn:  # one crashed mid-write long ago, one just now
        conn.execute(update(ehr_outbox).where(ehr_outbox.c.key == "touch-0").values(
            status="sending", updated_at=NOW - timedelta(minutes=6)))
        conn.execute(update(ehr_outbox).where(ehr_outbox.c.key == "touch-1").values(
            status="sending", updated_at=NOW - timedelta(minutes=1)))
    router.get(f"{BASE}/metadata").respond(json=CAPS)
    router.post(f"{BASE}/").mock(side_effect=_batch_answer)
    result = await _flush(engine, cfg, _client())
    assert result.claimed == 1
    assert [r.status for r in outbox(engine)] == ["written", "sending"]


def _appointment(version: str, status: str = "needs-action") -> httpx.Response:
    return httpx.Response(200, headers={"ETag": f'W/"{version}"'}, json={
        "resourceType": "Appointment", "id": "a1", "status": "booked",
        "meta": {"versionId": version},
        "participant": [{"actor": {"reference": "Patient/p1"}, "status": status}]})


async def test_update_with_if_match_retries_a_412(engine: Engine, cfg: Settings,
                                                  router: respx.MockRouter) -> None:
    with write_lock(engine), engine.begin() as conn:
        enqueue(conn, key="request-1-confirm", connection=EHR, resource_type="Appointment",
                operation="update", target="Appointment/a1", now=NOW,
                resource={"participantStatus": "accepted", "actor": "Patient/p1"})
    router.get(f"{BASE}/Appointment/a1").mock(side_effect=[_appointment("3"),
                                                            _appointment("4")])
    puts: list[tuple[str, dict[str, Any]]] = []

    def put(request: httpx.Request) -> httpx.Response:
        puts.append((request.headers["If-Match"], json.loads(request.content)))
        if len(puts) == 1:
            return httpx.Response(412, json=_outcome("version conflict"))
        return httpx.Response(200, json=puts[-1][1])

    router.put(f"{BASE}/Appointment/a1").mock(side_effect=put)
    result = await _flush(engine, cfg, _client())
    assert result.written == 1
    assert [p[0] for p in puts] == ['W/"3"', 'W/"4"']
    assert puts[-1][1]["participant"][0]["status"] == "accepted"
    (row,) = outbox(engine)
    assert (row.status, row.ehr_ref) == ("written", "Appointment/a1")


async def test_update_already_done_and_gone(engine: Engine, cfg: Settings,
                                            router: respx.MockRouter) -> None:
    with write_lock(engine), engine.begin() as conn:
        for key, target in (("request-1-confirm", "Appointment/a1"),
                            ("request-2-confirm", "Appointment/gone")):
            enqueue(conn, key=key, connection=EHR, resource_type="Appointment",
                    operation="update", target=target, now=NOW,
                    resource={"participantStatus": "accepted"})
    router.get(f"{BASE}/Appointment/a1").mock(return_value=_appointment("3", "accepted"))
    router.get(f"{BASE}/Appointment/gone").respond(410, json=_outcome("deleted"))
    put = router.put(f"{BASE}/Appointment/a1").respond(200)
    result = await _flush(engine, cfg, _client())
    assert (result.written, result.failed) == (1, 1) and not put.called
    done, gone = outbox(engine)
    assert done.status == "written"
    assert gone.status == "failed" and "HTTP 410" in gone.last_error


async def test_unknown_connection_fails_the_row(engine: Engine, cfg: Settings) -> None:
    with write_lock(engine), engine.begin() as conn:
        enqueue(conn, key="k", connection="removed", resource_type="Communication", now=NOW,
                resource={"resourceType": "Communication", "status": "completed"})
    result = await _flush(engine, cfg, _client())
    assert result.failed == 1
    assert "removed" in outbox(engine)[0].last_error


def test_replay_by_id(engine: Engine) -> None:
    _add(engine, 3)
    with engine.begin() as conn:
        conn.execute(update(ehr_outbox).values(status="failed", attempts=4,
                                               last_error="HTTP 422"))
        conn.execute(update(ehr_outbox).where(ehr_outbox.c.key == "touch-2")
                     .values(status="written"))
    first, _second, written = outbox(engine)
    assert replay(engine, ids=[first.id, written.id], now=NOW) == 1
    assert [(r.status, r.attempts) for r in outbox(engine)] == [
        ("pending", 0), ("failed", 4), ("written", 4)]
    with pytest.raises(ValueError):
        replay(engine)


def test_stage_run_once_and_stop(engine: Engine, cfg: Settings,
                                 router: respx.MockRouter) -> None:
    _add(engine, 2)
    router.get(f"{BASE}/metadata").respond(json=CAPS)
    router.post(f"{BASE}/").mock(side_effect=_batch_answer)
    made: list[FHIRClient] = []

    def factory(connection: Connection) -> FHIRApi:
        assert connection.name == EHR
        made.append(_client())
        return made[-1]

    stage = WritebackStage(engine, cfg, client_factory=factory, interval_s=0.05)
    try:
        result = stage.run_once(now=NOW)
        assert result.written == 2
        _add(engine, 1, prefix="more-", now=datetime.now(UTC))
        stage.start()
        stage.poke()
        deadline = time.monotonic() + 10
        while any(r.status != "written" for r in outbox(engine)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stage.stop()
    assert len(made) == 1 and made[0]._http.is_closed


async def test_concurrent_flushes_write_each_row_once(engine: Engine, cfg: Settings,
                                                      router: respx.MockRouter) -> None:
    keys = _add(engine, 60)
    router.get(f"{BASE}/metadata").respond(json=CAPS)
    posted: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        posted.extend(e["request"]["ifNoneExist"] for e in json.loads(request.content)["entry"])
        return _batch_answer(request)

    router.post(f"{BASE}/").mock(side_effect=answer)
    results = await asyncio.gather(*(_flush(engine, cfg, _client(), limit=20)
                                     for _ in range(4)))
    assert sum(r.claimed for r in results) == 60 == sum(r.written for r in results)
    assert sorted(posted) == sorted(f"identifier={WRITEBACK_SYSTEM}|{k}" for k in keys)
