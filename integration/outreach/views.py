"""Read-only views of outreach: a patient's touches (the API) and a dry run (the CLI preview).

Neither writes: :func:`preview` plans the patient's current entries on the current data exactly
as the reconciler would, and reports what would be sent, when, how, and why not.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, or_, select

from integration.models import timeline_entries, touches
from integration.outreach.state import (
    PLANNED_KINDS,
    OutreachConfig,
    applies,
    aware,
    load_snapshot,
)

__all__ = ["PreviewLine", "list_touches", "preview"]


def _iso(value: datetime | None) -> str | None:
    stamp = aware(value)
    return stamp.isoformat().replace("+00:00", "Z") if stamp else None


def list_touches(
    conn: Connection, patient_id: str, *, limit: int = 100, before: int | None = None,
    statuses: list[str] | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """The patient's touches, newest first (by id), with status and reason; the address is
    not included (it is the patient's, not the vendor's). Returns the items and the id to page
    on (None on the last page)."""
    t = touches
    query = select(t).where(t.c.patient_id == patient_id)
    if before is not None:
        query = query.where(t.c.id < before)
    if statuses:
        query = query.where(t.c.status.in_(statuses))
    rows = list(conn.execute(query.order_by(t.c.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        {
            "id": str(r.id), "key": r.key, "pathway": r.pathway, "step": r.step,
            "entry_id": r.entry_id, "status": r.status, "reason": r.reason,
            "due_at": _iso(r.due_at), "moment": _iso(r.moment), "channel": r.channel or None,
            "language": r.language or None, "template": r.template, "attempts": r.attempts,
            "sent_at": _iso(r.sent_at), "created_at": _iso(r.created_at),
            "updated_at": _iso(r.updated_at),
        }
        for r in rows
    ]
    return items, (rows[-1].id if more and rows else None)


@dataclass(frozen=True)
class PreviewLine:
    entry_id: str
    summary: str
    pathway: str
    step: int
    key: str
    due_at: datetime | None
    channel: str
    language: str
    template: str
    outcome: str
    """``send`` or ``skip``."""
    reason: str
    stored: str
    """The stored touch's status for this key (empty when none)."""


def preview(
    conn: Connection, config: OutreachConfig, patient_id: str, now: datetime
) -> list[PreviewLine]:
    t = timeline_entries
    ids = [r.id for r in conn.execute(
        select(t.c.id).where(
            t.c.patient_id == patient_id, t.c.kind.in_(PLANNED_KINDS),
            or_(t.c.time >= now - timedelta(days=90), t.c.status == "active"),
        ).order_by(t.c.time, t.c.id)
    )]
    snap = load_snapshot(conn, config, ids, now)
    lines: list[PreviewLine] = []
    for entry_id in ids:
        if entry_id not in snap.entries:
            continue
        entry = snap.entries[entry_id]
        stored = snap.stored.get(entry_id, {})
        plan = snap.plan(config, entry_id, now)
        summary = snap.summaries.get(entry_id, "")
        for touch in plan.touches:
            lines.append(PreviewLine(
                entry_id, summary, touch.pathway, touch.step, touch.key, touch.due_at,
                touch.channel, touch.language, touch.template, "send",
                f"moved: {touch.moved}" if touch.moved else "",
                stored[touch.key].status if touch.key in stored else ""))
        for skip in plan.skips:
            pathway = config.by_name.get(skip.pathway)
            row = stored.get(skip.key)
            if row is None and (pathway is None or not applies(pathway.on, entry)):
                continue  # a pathway that is not about this entry at all
            lines.append(PreviewLine(
                entry_id, summary, skip.pathway, skip.step, skip.key,
                row.due_at if row else None, row.channel if row else "",
                row.language if row else "", pathway.steps[skip.step].template if pathway else "",
                "skip", skip.reason, row.status if row else ""))
    return lines
