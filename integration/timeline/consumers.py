"""Consumers of ``timeline_changes``: each reads the changes in id order from its own cursor
row (``outreach_cursors``, by name) and advances it in the transaction that acts on them.

:func:`next_changes` takes the cursor row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL: one
consumer of a name at a time; others get ``None``) and returns the next run of consecutive ids.
A gap at the head is an id handed to a transaction not yet committed (PostgreSQL hands ids out
before commit): the consumer waits on it up to ``gap_grace_s`` (``held_since`` records since
when), then steps over it, since a rolled-back transaction never fills it. The caller acts on
the changes and calls :func:`advance` in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, update

from integration.db import dialect_insert
from integration.logs import get_logger
from integration.models import outreach_cursors, timeline_changes

__all__ = ["ChangeRun", "advance", "next_changes"]

log = get_logger("careloop.timeline")


@dataclass
class ChangeRun:
    changes: list[Any]
    """Rows of ``timeline_changes`` (id, entry_id, patient_id, kind, change, status), in id
    order; empty when there is nothing to do yet."""


def next_changes(conn: Connection, name: str, *, limit: int, gap_grace_s: float,
                 wall: datetime) -> ChangeRun | None:
    """The next changes for consumer ``name``; ``None`` when another consumer holds it."""
    c = outreach_cursors
    conn.execute(dialect_insert(conn, c).values(name=name, last_id=0, updated_at=wall)
                 .on_conflict_do_nothing(index_elements=["name"]))
    query = select(c.c.last_id, c.c.held_since).where(c.c.name == name)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    cursor = conn.execute(query).first()
    if cursor is None:
        return None
    last = int(cursor.last_id)
    tc = timeline_changes
    rows: Sequence[Any] = conn.execute(
        select(tc.c.id, tc.c.entry_id, tc.c.patient_id, tc.c.kind, tc.c.change, tc.c.status)
        .where(tc.c.id > last).order_by(tc.c.id).limit(limit)
    ).all()
    take = []
    expected = last + 1
    for r in rows:
        if r.id != expected:
            break
        take.append(r)
        expected += 1
    if rows and not take:
        since = cursor.held_since
        since = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since
        if since is None or wall - since < timedelta(seconds=gap_grace_s):
            if since is None:
                conn.execute(update(c).where(c.c.name == name).values(held_since=wall))
            return ChangeRun([])
        take = list(rows)
        log.warning("timeline_gap_skipped", source=name, count=rows[0].id - last - 1)
    return ChangeRun(take)


def advance(conn: Connection, name: str, run: ChangeRun, *, wall: datetime) -> None:
    """Move consumer ``name`` past ``run`` (in the transaction that acted on it)."""
    if run.changes:
        c = outreach_cursors
        conn.execute(update(c).where(c.c.name == name)
                     .values(last_id=run.changes[-1].id, held_since=None, updated_at=wall))
