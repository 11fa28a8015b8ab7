"""Retention: removing what is past the ``[retention]`` periods (``careloop purge``, and the
daily ``careloop.retention.purge`` beat task).

* Each kind of row has its own period and clock (see :class:`integration.settings.Retention`);
  an unset period keeps that kind forever.
* Only rows in a final state go: inbox rows processed, failed or rejected (never ``received``:
  stored and acknowledged but not yet processed), touches sent, cancelled, skipped or failed
  (never scheduled or sending), channel events processed or failed (never pending), outbox rows
  written (never pending, sending or failed: a failed write is still owed), timeline changes
  every consumer's cursor (``outreach_cursors``) has passed. The state is part
  of the SQL condition of both the ``SELECT`` that picks a batch and the ``DELETE`` that
  removes it, so a row that changed state in between stays.
* Rows go in batches of ``batch`` ids, each in its own short transaction (on SQLite under the
  background side of :func:`integration.db.write_lock`, so the ACK path goes first between
  batches; on PostgreSQL the batch's rows are locked ``FOR UPDATE SKIP LOCKED``, so a row a
  worker holds is left for the next run). Batches walk up the primary key (keyset), so each
  one starts where the last ended.
* A processed message's mapped resources go with it; resources also have their own period.
* Every run that removes (not a dry run, not a run with no period set) is an ``audit_events``
  row: actor ``retention``, action ``retention.purge``, detail the counts per table and the
  cut-offs (no patient data). The row is written first and completed at the end, so a run that
  stopped half-way is on record with what it had removed; it is never removed by its own run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Engine,
    Table,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from integration.db import write_lock
from integration.logs import get_logger
from integration.models import (
    InboxStatus,
    audit_events,
    channel_events,
    ehr_outbox,
    inbox,
    mapped_resources,
    outreach_cursors,
    timeline_changes,
    touches,
)
from integration.settings import Retention, Settings

__all__ = [
    "FINAL_CHANNEL_EVENT_STATUSES",
    "FINAL_INBOX_STATUSES",
    "FINAL_OUTBOX_STATUSES",
    "FINAL_TOUCH_STATUSES",
    "SETTING_OF",
    "TABLES",
    "cutoffs",
    "purge",
]

log = get_logger("careloop.retention")

FINAL_INBOX_STATUSES = (InboxStatus.PROCESSED.value, InboxStatus.FAILED.value,
                        InboxStatus.REJECTED.value)
FINAL_TOUCH_STATUSES = ("sent", "cancelled", "skipped", "failed")
FINAL_CHANNEL_EVENT_STATUSES = ("processed", "failed")
FINAL_OUTBOX_STATUSES = ("written",)

TABLES = ("mapped_resources", "inbox", "touches", "channel_events", "ehr_outbox",
          "timeline_changes", "audit_events")
"""The tables purged, in the order they are purged (the keys of :func:`purge`'s counts)."""

SETTING_OF = {
    "inbox": "raw_messages",
    "mapped_resources": "resources",
    "touches": "touches",
    "channel_events": "channel_events",
    "ehr_outbox": "writeback",
    "timeline_changes": "timeline_changes",
    "audit_events": "audit_events",
}
"""Table → the ``[retention]`` setting that governs it."""


def cutoffs(retention: Retention, now: datetime) -> dict[str, datetime]:
    """Setting name → the time before which rows go, for every period that is set."""
    out: dict[str, datetime] = {}
    for name in type(retention).model_fields:
        period: timedelta | None = getattr(retention, name)
        if period is not None:
            out[name] = now - period
    return out


@dataclass(frozen=True)
class _Rule:
    name: str
    table: Table
    condition: ColumnElement[bool]
    """Which rows may go: a final state and past the cut-off."""
    before_delete: Callable[[Connection, list[int]], int] | None = None
    """Removes rows that depend on a batch first (counted as ``mapped_resources``)."""


def _inbox_purgeable(cut: datetime) -> ColumnElement[bool]:
    return and_(inbox.c.status.in_(FINAL_INBOX_STATUSES), inbox.c.received_at < cut)


def _remove_resources_of(conn: Connection, inbox_ids: list[int]) -> int:
    t = mapped_resources
    return int(conn.execute(delete(t).where(t.c.inbox_id.in_(inbox_ids))).rowcount or 0)


def _rules(cuts: dict[str, datetime], own_audit_id: int | None) -> list[_Rule]:
    rules: list[_Rule] = []
    raw_cut = cuts.get("raw_messages")

    # mapped resources: their own period, or their message's; never those of a message that
    # is waiting to be processed (a replay puts a failed message back to received)
    m = mapped_resources
    wanted: list[ColumnElement[bool]] = []
    if "resources" in cuts:
        wanted.append(m.c.created_at < cuts["resources"])
    if raw_cut is not None:
        wanted.append(m.c.inbox_id.in_(select(inbox.c.id).where(_inbox_purgeable(raw_cut))))
    if wanted:
        settled = m.c.inbox_id.in_(
            select(inbox.c.id).where(inbox.c.status.in_(FINAL_INBOX_STATUSES)))
        rules.append(_Rule("mapped_resources", m, and_(or_(*wanted), settled)))

    if raw_cut is not None:
        rules.append(_Rule("inbox", inbox, _inbox_purgeable(raw_cut), _remove_resources_of))
    if "touches" in cuts:
        rules.append(_Rule("touches", touches, and_(
            touches.c.status.in_(FINAL_TOUCH_STATUSES), touches.c.updated_at < cuts["touches"])))
    if "channel_events" in cuts:
        c = channel_events
        rules.append(_Rule("channel_events", c, and_(
            c.c.status.in_(FINAL_CHANNEL_EVENT_STATUSES),
            c.c.received_at < cuts["channel_events"])))
    if "writeback" in cuts:
        o = ehr_outbox
        rules.append(_Rule("ehr_outbox", o, and_(
            o.c.status.in_(FINAL_OUTBOX_STATUSES), o.c.updated_at < cuts["writeback"])))
    if "timeline_changes" in cuts:
        t = timeline_changes
        # Only what every consumer has read (no cursor yet: nothing reads the log).
        read_by_all = select(func.min(outreach_cursors.c.last_id)).scalar_subquery()
        rules.append(_Rule("timeline_changes", t, and_(
            t.c.at < cuts["timeline_changes"],
            or_(read_by_all.is_(None), t.c.id <= read_by_all))))
    if "audit_events" in cuts:
        a = audit_events
        own = a.c.id != own_audit_id if own_audit_id is not None else a.c.id.is_not(None)
        rules.append(_Rule("audit_events", a, and_(a.c.at < cuts["audit_events"], own)))
    return rules


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _count(engine: Engine, rule: _Rule) -> int:
    with engine.connect() as conn:
        return int(conn.execute(
            select(func.count()).select_from(rule.table).where(rule.condition)).scalar_one())


def _run(engine: Engine, rule: _Rule, batch: int, counts: dict[str, int]) -> None:
    pk: Column[Any] = rule.table.c.id
    last = 0
    while True:
        with write_lock(engine), engine.begin() as conn:
            ids = [int(r[0]) for r in conn.execute(
                select(pk).where(rule.condition, pk > last).order_by(pk).limit(batch)
                .with_for_update(skip_locked=True))]
            if not ids:
                return
            if rule.before_delete is not None:
                counts["mapped_resources"] += rule.before_delete(conn, ids)
            removed = conn.execute(
                delete(rule.table).where(pk.in_(ids), rule.condition)).rowcount
            counts[rule.name] += int(removed or 0)
        last = ids[-1]
        if len(ids) < batch:
            return


def purge(
    engine: Engine,
    settings: Settings,
    *,
    now: datetime | None = None,
    batch: int = 1000,
    dry_run: bool = False,
) -> dict[str, int]:
    """Remove what is past ``settings.retention``; rows removed (or, ``dry_run``, that would
    be) per table, every table of :data:`TABLES` named (0 where nothing is set).

    A dry run writes nothing, not even its audit event.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    now = now or datetime.now(UTC)
    cuts = cutoffs(settings.retention, now)
    counts = dict.fromkeys(TABLES, 0)
    if not cuts:
        return counts
    if dry_run:
        for rule in _rules(cuts, None):
            counts[rule.name] += _count(engine, rule)
        return counts

    detail: dict[str, Any] = {
        "cutoffs": {name: _iso(at) for name, at in cuts.items()},
        "removed": counts,
        "complete": False,
    }
    with write_lock(engine), engine.begin() as conn:
        audit_id = int(conn.execute(insert(audit_events).values(
            at=now, actor="retention", action="retention.purge", target_type="",
            target_id="", detail=detail,
        ).returning(audit_events.c.id)).scalar_one())
    try:
        for rule in _rules(cuts, audit_id):
            _run(engine, rule, batch, counts)
        detail["complete"] = True
    finally:
        with write_lock(engine), engine.begin() as conn:
            conn.execute(update(audit_events).where(audit_events.c.id == audit_id)
                         .values(detail={**detail, "removed": dict(counts)}))
        log.info("retention_purged", complete=detail["complete"], **counts)
    return counts
