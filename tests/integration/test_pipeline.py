"""The processing stage, the sweeper and replay."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select, update

from integration.intake import assess
from integration.models import inbox, mapped_resources
from integration.pipeline import (
    InProcessDispatcher,
    due_ids,
    process_batch,
    process_message,
    queue_depth,
    requeue,
)
from tests.helpers import adt

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def store(engine: Engine, raw: bytes, **values: Any) -> int:
    row = assess(raw, "mllp", "test").row(NOW, timedelta(seconds=60))
    row.update(values)
    with engine.begin() as conn:
        return int(conn.execute(insert(inbox).values(row).returning(inbox.c.id)).scalar_one())


def get(engine: Engine, inbox_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(inbox).where(inbox.c.id == inbox_id)).one()


class TestProcessMessage:
    def test_routes_and_marks_processed(self, engine: Engine) -> None:
        inbox_id = store(engine, adt("P1"))
        outcome = process_message(engine, inbox_id, now=NOW)
        assert outcome is not None and outcome.status == "processed"
        row = get(engine, inbox_id)
        assert row.status == "processed"
        assert row.attempts == 1
        assert row.processed_at is not None

    def test_second_run_changes_nothing(self, engine: Engine) -> None:
        """A redelivered task finds the row done and does nothing."""
        inbox_id = store(engine, adt("P2"))
        process_message(engine, inbox_id, now=NOW)
        assert process_message(engine, inbox_id, now=NOW) is None
        assert get(engine, inbox_id).attempts == 1

    def test_unsupported_type_failed_with_clear_error(self, engine: Engine) -> None:
        raw = adt("P3").replace(b"ADT^A01^ADT_A01", b"MFN^M02")
        inbox_id = store(engine, raw)
        outcome = process_message(engine, inbox_id, now=NOW)
        assert outcome is not None and outcome.status == "failed"
        assert get(engine, inbox_id).last_error == "unsupported message type MFN^M02"

    def test_unsupported_trigger(self, engine: Engine) -> None:
        inbox_id = store(engine, adt("P4", trigger="A99"))
        process_message(engine, inbox_id, now=NOW)
        assert get(engine, inbox_id).last_error == "unsupported message type ADT^A99"

    def test_application_ack_built_when_asked(self, engine: Engine) -> None:
        """Enhanced mode with MSH-16 AL: the application ACK is kept on the row."""
        inbox_id = store(engine, adt("P5", extra_msh="|||AL|AL"))
        process_message(engine, inbox_id, now=NOW)
        app_ack = get(engine, inbox_id).app_ack
        assert "MSA|AA|P5" in app_ack

    def test_unexpected_error_retried_with_backoff(
        self, engine: Engine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bug or outage leaves the row received with a later next_attempt_at, and fails it
        after max_attempts."""
        from integration import pipeline

        def boom(*_a: object, **_k: object) -> str:
            raise RuntimeError("kaboom")

        monkeypatch.setattr(pipeline, "convert", boom)
        inbox_id = store(engine, adt("P6"))
        process_message(engine, inbox_id, max_attempts=2, now=NOW)
        row = get(engine, inbox_id)
        assert row.status == "received"
        assert "kaboom" in row.last_error
        assert row.next_attempt_at.replace(tzinfo=UTC) > NOW
        process_message(engine, inbox_id, max_attempts=2, now=NOW)
        assert get(engine, inbox_id).status == "failed"


class TestMappedResources:
    def test_processed_row_stores_its_fhir_resources(self, engine: Engine) -> None:
        """The stage converts the message and stores the resources with the inbox id."""
        inbox_id = store(engine, adt("F1"))
        outcome = process_message(engine, inbox_id, now=NOW)
        assert outcome is not None and outcome.resources >= 2
        with engine.connect() as conn:
            rows = conn.execute(
                select(mapped_resources).where(mapped_resources.c.inbox_id == inbox_id)
            ).all()
        types = {r.resource_type for r in rows}
        assert {"Patient", "Encounter"} <= types
        patient = next(r.resource for r in rows if r.resource_type == "Patient")
        assert patient["name"][0]["family"] == "Doe"
        assert patient["birthDate"] == "1980-01-01"

    def test_replay_replaces_resources(self, engine: Engine) -> None:
        """Reprocessing a row leaves one copy of each resource."""
        inbox_id = store(engine, adt("F2"))
        process_message(engine, inbox_id, now=NOW)
        requeue(engine, status="processed", ids=[inbox_id], now=NOW)
        process_message(engine, inbox_id, now=NOW)
        with engine.connect() as conn:
            keys = conn.execute(
                select(mapped_resources.c.resource_type, mapped_resources.c.resource_id).where(
                    mapped_resources.c.inbox_id == inbox_id
                )
            ).all()
        assert len(keys) == len(set(keys)) >= 2

    def test_sender_identifier_system_and_timezone_from_settings(self, engine: Engine) -> None:
        """[[hl7_senders]] rules decide the identifier system and the local time zone."""
        from integration.conversion import ContextFactory
        from integration.settings import HL7Sender
        from tests.helpers import settings_for

        settings = settings_for(
            "sqlite://",
            timezone="UTC",
            hl7_senders=(HL7Sender(application="EPIC", facility="MAIN",
                                   timezone="America/Chicago",
                                   identifier_systems={"MRN": "urn:oid:1.2.3"}),),
        )
        inbox_id = store(engine, adt("F3"))
        process_message(engine, inbox_id, now=NOW, contexts=ContextFactory(settings))
        with engine.connect() as conn:
            patient = conn.execute(
                select(mapped_resources.c.resource).where(
                    mapped_resources.c.inbox_id == inbox_id,
                    mapped_resources.c.resource_type == "Patient",
                )
            ).scalar_one()
        assert {"system": "urn:oid:1.2.3", "value": "123"}.items() <= (
            patient["identifier"][0].items()
        )

    def test_mapping_error_fails_row_with_location(self, engine: Engine) -> None:
        """A message the mapping cannot use fails with the field named."""
        raw = adt("F4").replace(b"PID|1||123^^^MRN||", b"PID|1||||")
        inbox_id = store(engine, raw)
        outcome = process_message(engine, inbox_id, now=NOW)
        assert outcome is not None and outcome.status == "failed"
        assert "PID-3" in (get(engine, inbox_id).last_error or "")


class TestSweepAndReplay:
    def test_due_ids_finds_rows_pending_too_long(self, engine: Engine) -> None:
        fresh = store(engine, adt("S1"))
        old = store(engine, adt("S2"), next_attempt_at=NOW - timedelta(seconds=1))
        done = store(engine, adt("S3"), next_attempt_at=NOW - timedelta(seconds=1),
                     status="processed")
        ids = due_ids(engine, now=NOW)
        assert old in ids and fresh not in ids and done not in ids

    def test_a_deferring_sweep_takes_each_row_once_per_period(self, engine: Engine) -> None:
        """The Celery sweep defers what it enqueues: the next tick does not enqueue the same
        rows again; once the period has passed (the task was lost) they come back."""
        rows = [store(engine, adt(f"D{i}"), next_attempt_at=NOW - timedelta(seconds=1))
                for i in range(3)]
        period = timedelta(seconds=60)
        assert due_ids(engine, now=NOW, defer=period, limit=2) == rows[:2]
        assert due_ids(engine, now=NOW + timedelta(seconds=5), defer=period) == rows[2:]
        assert due_ids(engine, now=NOW + timedelta(seconds=10), defer=period) == []
        assert due_ids(engine, now=NOW + timedelta(seconds=61), defer=period) == rows[:2]

    def test_requeue_failed_then_process(self, engine: Engine) -> None:
        inbox_id = store(engine, adt("R1"))
        with engine.begin() as conn:
            conn.execute(update(inbox).values(status="failed", attempts=3, last_error="x"))
        assert requeue(engine, status="failed", now=NOW) == [inbox_id]
        row = get(engine, inbox_id)
        assert (row.status, row.attempts) == ("received", 0)
        process_message(engine, inbox_id, now=NOW)
        assert get(engine, inbox_id).status == "processed"

    def test_rejected_rows_never_requeued(self, engine: Engine) -> None:
        store(engine, b"garbage")
        assert requeue(engine, status="", now=NOW) == []

    def test_queue_depth(self, engine: Engine) -> None:
        store(engine, adt("Q1"))
        count, age = queue_depth(engine, now=NOW + timedelta(seconds=30))["intake"]
        assert count == 1
        assert 29 <= age <= 31


class TestInProcessDispatcher:
    def test_processes_and_sweeps(self, engine: Engine) -> None:
        """Dispatched ids are processed; rows only the sweep finds are processed too."""
        later = datetime.now(UTC) + timedelta(hours=1)
        a = store(engine, adt("W1"), next_attempt_at=later)
        b = store(engine, adt("W2"), next_attempt_at=NOW - timedelta(seconds=1))
        done = threading.Event()
        processed: list[int] = []

        def work(inbox_ids: list[int]) -> None:
            processed.extend(o.inbox_id for o in process_batch(engine, inbox_ids))
            if len(processed) >= 2:
                done.set()

        swept = []

        def sweep() -> list[int]:
            ids = due_ids(engine)
            swept.extend(ids)
            return ids

        dispatcher = InProcessDispatcher(work, threads=2, sweep=sweep, sweep_interval_s=0.05)
        dispatcher.start()
        try:
            dispatcher.dispatch([a])
            assert done.wait(10)
        finally:
            dispatcher.stop()
        assert sorted(processed) == sorted([a, b])
        assert b in swept and a not in swept


@pytest.mark.postgres
class TestConcurrentClaims:
    def test_each_row_processed_once_by_competing_workers(self, pg_url: str) -> None:
        """Eight threads racing over the same rows process each exactly once (SKIP LOCKED)."""
        from integration.db import create_db_engine

        engine = create_db_engine(pg_url, pool_size=8)
        ids = [store(engine, adt(f"K{i}")) for i in range(40)]
        outcomes: list[int] = []
        lock = threading.Lock()

        def worker() -> None:
            for inbox_id in ids:
                if process_message(engine, inbox_id) is not None:
                    with lock:
                        outcomes.append(inbox_id)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == sorted(ids)
        with engine.connect() as conn:
            attempts = conn.execute(select(inbox.c.attempts)).scalars().all()
        assert set(attempts) == {1}
        engine.dispose()


class TestWriteGate:
    def test_background_writer_not_starved_by_a_busy_ack_path(self) -> None:
        """An intake that always wants the lock still lets a background writer in within its
        bounded wait."""
        from integration.db import _WriteGate

        gate = _WriteGate(max_background_wait_s=0.02)
        stop = threading.Event()
        got: list[float] = []

        def intake() -> None:
            while not stop.is_set():
                with gate.hold(urgent=True):
                    time.sleep(0.002)

        threads = [threading.Thread(target=intake) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            start = time.monotonic()
            with gate.hold(urgent=False):
                got.append(time.monotonic() - start)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert got and got[0] < 0.5

    def test_urgent_writer_goes_first(self) -> None:
        """With both kinds waiting, the ACK path takes the next turn."""
        from integration.db import _WriteGate

        gate = _WriteGate(max_background_wait_s=5)
        order: list[str] = []
        release = threading.Event()

        def holder() -> None:
            with gate.hold(urgent=False):
                release.wait(5)

        def writer(name: str, urgent: bool) -> None:
            with gate.hold(urgent=urgent):
                order.append(name)

        first = threading.Thread(target=holder)
        first.start()
        time.sleep(0.05)
        background = threading.Thread(target=writer, args=("background", False))
        background.start()
        time.sleep(0.05)
        urgent = threading.Thread(target=writer, args=("urgent", True))
        urgent.start()
        time.sleep(0.05)
        release.set()
        for t in (first, background, urgent):
            t.join(5)
        assert order == ["urgent", "background"]
