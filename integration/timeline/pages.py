"""Reading a patient's timeline: newest first, filtered, in pages with an opaque cursor.

Pages are keyset pages on ``(time, id)`` (index ``ix_timeline_entries_patient_time``): the
cursor is the last entry's time and id, so a page costs the same however deep it is, and
entries inserted or changed while a client pages never shift the entries it has not read yet
(no skips, no repeats, unlike OFFSET). An entry whose *time* changes while a client pages (a
rescheduled appointment) is seen at its new place: possibly again, or not at all if it moved
into pages already read; its ``updated_at`` tells a syncing client it changed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, tuple_

from integration.models import entry_sources, timeline_entries

__all__ = ["Cursor", "CursorError", "Page", "TimelineQuery", "entry_json", "read_page"]

JSON = dict[str, Any]

MAX_LIMIT = 500


class CursorError(ValueError):
    """The cursor was not made by this server for this patient."""


@dataclass(frozen=True)
class Cursor:
    time: datetime
    id: str

    def encode(self, patient_id: str) -> str:
        body = {"p": patient_id, "t": self.time.astimezone(UTC).isoformat(), "i": self.id}
        raw = json.dumps(body, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, patient_id: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            body = json.loads(raw)
            time = datetime.fromisoformat(body["t"])
            entry_id = str(body["i"])
            owner = str(body["p"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CursorError("the cursor is not one this server made") from exc
        if owner != patient_id:
            raise CursorError("the cursor belongs to another patient's timeline")
        if time.tzinfo is None:
            time = time.replace(tzinfo=UTC)
        return cls(time, entry_id)


@dataclass(frozen=True)
class TimelineQuery:
    patient_id: str
    since: datetime | None = None
    until: datetime | None = None
    kinds: Sequence[str] = ()
    statuses: Sequence[str] = ()
    limit: int = 50
    after: Cursor | None = None


@dataclass(frozen=True)
class Page:
    items: list[JSON]
    next: Cursor | None


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime | None) -> str | None:
    aware = _aware(value)
    return aware.isoformat().replace("+00:00", "Z") if aware else None


def read_page(conn: Connection, q: TimelineQuery) -> Page:
    """One page of ``q.patient_id``'s timeline (the id must be the surviving patient's)."""
    t = timeline_entries
    limit = max(1, min(q.limit, MAX_LIMIT))
    query = select(
        t.c.id, t.c.patient_id, t.c.kind, t.c.status, t.c.time, t.c.end_time, t.c.summary,
        t.c.resource_type, t.c.resource, t.c.updated_at,
    ).where(t.c.patient_id == q.patient_id)
    if q.since is not None:
        query = query.where(t.c.time >= q.since)
    if q.until is not None:
        query = query.where(t.c.time < q.until)
    if q.kinds:
        query = query.where(t.c.kind.in_(list(q.kinds)))
    if q.statuses:
        query = query.where(t.c.status.in_(list(q.statuses)))
    if q.after is not None:
        query = query.where(tuple_(t.c.time, t.c.id) < (q.after.time, q.after.id))
    query = query.order_by(t.c.time.desc(), t.c.id.desc()).limit(limit + 1)
    rows = conn.execute(query).all()
    more = len(rows) > limit
    rows = rows[:limit]
    sources = _sources(conn, [r.id for r in rows])
    items = [entry_json(r, sources.get(r.id, [])) for r in rows]
    nxt = None
    if more and rows:
        last_time = _aware(rows[-1].time)
        assert last_time is not None
        nxt = Cursor(last_time, rows[-1].id)
    return Page(items, nxt)


def _sources(conn: Connection, ids: list[str]) -> dict[str, list[JSON]]:
    if not ids:
        return {}
    s = entry_sources
    rows = conn.execute(
        select(s.c.entry_id, s.c.system, s.c.connection, s.c.ref, s.c.version,
               s.c.received_at)
        .where(s.c.entry_id.in_(ids))
        .order_by(s.c.entry_id, s.c.ordinal, s.c.id)
    )
    out: dict[str, list[JSON]] = {}
    for r in rows:
        out.setdefault(r.entry_id, []).append(
            {
                "system": r.system,
                "connection": r.connection,
                "ref": r.ref,
                "version": r.version,
                "received_at": _iso(r.received_at),
            }
        )
    return out


def entry_json(row: Any, sources: list[JSON]) -> JSON:
    """The INTERFACE.md ``Timeline entry`` shape."""
    return {
        "id": row.id,
        "patient_id": row.patient_id,
        "kind": row.kind,
        "status": row.status,
        "time": _iso(row.time),
        "end": _iso(row.end_time),
        "summary": row.summary,
        "resource_type": row.resource_type,
        "resource": row.resource,
        "sources": sources,
        "updated_at": _iso(row.updated_at),
    }
