"""Cursor paging never skips or repeats an entry while writes go on (PostgreSQL and SQLite)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from integration.db import write_lock
from integration.models import timeline_entries
from integration.timeline import Cursor, CursorError, SourceRef, TimelineQuery, apply, read_page

T0 = datetime(2024, 1, 1, tzinfo=UTC)
NOW = datetime(2024, 6, 1, tzinfo=UTC)


def encounter(n: int, status: str = "finished", minutes: int | None = None) -> dict[str, Any]:
    start = T0 + timedelta(minutes=n if minutes is None else minutes)
    return {
        "resourceType": "Encounter", "id": f"e{n}", "status": status,
        "identifier": [{"system": "urn:visit", "value": str(n)}],
        "class": {"code": "AMB"}, "subject": {"reference": "Patient/pg"},
        "period": {"start": start.isoformat()},
    }


def write(engine: Engine, resources: list[dict[str, Any]], version: int) -> None:
    source = SourceRef("fhir", "ehr", f"Bundle/{version}", str(version),
                       T0 + timedelta(days=1, seconds=version))
    with write_lock(engine), engine.begin() as conn:
        apply(conn, resources, source, NOW)


def patient_id(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(timeline_entries.c.patient_id).limit(1)).scalar_one())


class TestPaging:
    def test_pages_while_writes_go_on_never_skip_or_repeat(self, engine: Engine) -> None:
        """Another thread inserts entries (some at the same times, some in the unread part)
        and changes statuses while a reader pages with limit 7: every entry that existed
        before is read exactly once, and no entry is read twice."""
        write(engine, [encounter(n, minutes=n // 2) for n in range(120)], 1)
        pid = patient_id(engine)
        stop = threading.Event()

        def writer() -> None:
            n, version = 1000, 2
            while not stop.is_set() and n < 1400:
                batch = [encounter(n + k, minutes=(n + k) % 60) for k in range(5)]
                batch.append(encounter(n % 120, status="cancelled", minutes=(n % 120) // 2))
                write(engine, batch, version)
                n, version = n + 5, version + 1

        thread = threading.Thread(target=writer)
        thread.start()
        seen: list[str] = []
        try:
            cursor = None
            while True:
                with engine.connect() as conn:
                    page = read_page(conn, TimelineQuery(pid, limit=7, after=cursor))
                seen.extend(item["resource"]["id"] for item in page.items)
                if page.next is None:
                    break
                cursor = Cursor.decode(page.next.encode(pid), pid)
        finally:
            stop.set()
            thread.join()
        assert len(seen) == len(set(seen))
        assert {f"e{n}" for n in range(120)} <= set(seen)

    def test_filters_and_order(self, engine: Engine) -> None:
        """Newest first; since/until and status filter; limit bounds the page."""
        write(engine, [encounter(n, status="finished" if n % 2 else "cancelled")
                       for n in range(10)], 1)
        pid = patient_id(engine)
        with engine.connect() as conn:
            page = read_page(conn, TimelineQuery(
                pid, since=T0 + timedelta(minutes=2), until=T0 + timedelta(minutes=8),
                statuses=["finished"], limit=2))
            assert [i["resource"]["id"] for i in page.items] == ["e7", "e5"]
            rest = read_page(conn, TimelineQuery(
                pid, since=T0 + timedelta(minutes=2), until=T0 + timedelta(minutes=8),
                statuses=["finished"], limit=2, after=page.next))
        assert [i["resource"]["id"] for i in rest.items] == ["e3"]
        assert rest.next is None

    def test_a_cursor_is_bound_to_its_patient(self) -> None:
        """A cursor made for one patient, or not made here at all, is refused."""
        cursor = Cursor(T0, "abc").encode("p1")
        assert Cursor.decode(cursor, "p1") == Cursor(T0, "abc")
        with pytest.raises(CursorError):
            Cursor.decode(cursor, "p2")
        with pytest.raises(CursorError):
            Cursor.decode("not-a-cursor", "p1")
