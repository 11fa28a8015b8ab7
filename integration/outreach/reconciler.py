"""The reconciler: timeline changes in, the difference in touches out, in one transaction.

It consumes ``timeline_changes`` in id order, a batch per transaction, and for every entry a
change affects asks the planner what should exist now and applies the difference beside the
cursor's advance:

* a new touch is scheduled; a scheduled one whose time, channel or language changed is moved;
* a scheduled touch the plan no longer wants is cancelled with the planner's reason (the
  appointment was cancelled, the patient opted out...);
* a skipped step is stored as ``skipped`` with its reason, upserted by key, so re-planning
  updates the reason; skips of pathways that are not about the entry at all are not stored;
* a touch being sent, sent or failed is never touched again.

Which entries a change affects: the entry itself; for a ``patient`` entry (new phone number,
language) all the patient's current entries; for a medication dispense the patient's orders
(the supply clock restarts); a ``moved`` entry (patient merge) takes its touches to the
survivor; a ``removed`` entry (joined into another) has its scheduled touches cancelled.

Idempotent: replaying changes plans the same state and writes nothing. On PostgreSQL the cursor
row is locked (``FOR UPDATE SKIP LOCKED``), so only one consumer advances it. Ids are handed
out before commit, so a change with a lower id can become visible after a higher one: the
cursor never steps over a gap in ids until ``gap_grace_s`` has passed (the transaction holding
the id committed or rolled back). Whatever a late or lost change would have cancelled is still
caught at send time, when the sender re-plans against the current timeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, or_, select, update

from integration.db import dialect_insert, write_lock
from integration.logs import get_logger
from integration.models import timeline_entries, touches
from integration.outreach.planner import Plan, Skip, Touch
from integration.outreach.record import Recorder
from integration.outreach.state import (
    PLANNED_KINDS,
    OutreachConfig,
    Snapshot,
    StoredTouch,
    applies,
    load_snapshot,
    one_of,
)
from integration.timeline.consumers import advance, next_changes

__all__ = ["ReconcileResult", "reconcile", "reconcile_entries"]

log = get_logger("careloop.outreach")

CURSOR = "outreach"
_REPLAN_WINDOW = timedelta(days=90)


@dataclass
class ReconcileResult:
    changes: int = 0
    entries: int = 0
    scheduled: int = 0
    moved: int = 0
    cancelled: int = 0
    skipped: int = 0

    def add(self, other: ReconcileResult) -> None:
        for name in ("changes", "entries", "scheduled", "moved", "cancelled", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def reconcile(
    engine: Engine,
    config: OutreachConfig,
    *,
    now: datetime | None = None,
    max_batches: int | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    name: str = CURSOR,
    record: Recorder | None = None,
) -> ReconcileResult:
    """Consume every pending timeline change (a batch per transaction). ``record`` is told,
    in the same transaction, of touches skipped for a reason (the write-back)."""
    total = ReconcileResult()
    batches = 0
    while max_batches is None or batches < max_batches:
        batches += 1
        with write_lock(engine), engine.begin() as conn:
            result = _batch(conn, config, (now or datetime.now(UTC)).astimezone(UTC),
                            clock().astimezone(UTC), name, record)
        if result is None:
            break
        total.add(result)
        if result.changes == 0:
            break
    if total.changes:
        log.info("outreach_reconciled", changes=total.changes, count=total.entries,
                 status=f"+{total.scheduled} ~{total.moved} -{total.cancelled}")
    return total



def _batch(  # noqa: PLR0917
    conn: Connection, config: OutreachConfig, now: datetime, wall: datetime, name: str,
    record: Recorder | None = None,
) -> ReconcileResult | None:
    run = next_changes(conn, name, limit=config.outreach.batch,
                       gap_grace_s=config.outreach.gap_grace_s, wall=wall)
    if run is None:
        return None  # another consumer holds the cursor
    if not run.changes:
        return ReconcileResult()
    result = _apply_changes(conn, config, run.changes, now, record)
    advance(conn, name, run, wall=wall)
    result.changes = len(run.changes)
    return result


def _apply_changes(
    conn: Connection, config: OutreachConfig, changes: list[Any], now: datetime,
    record: Recorder | None = None,
) -> ReconcileResult:
    entry_ids: set[str] = set()
    removed: set[str] = set()
    expand_patients: set[str] = set()
    medication_patients: set[str] = set()
    for ch in changes:
        if ch.change == "removed":
            removed.add(ch.entry_id)
        elif ch.kind == "patient":
            expand_patients.add(ch.patient_id)
        elif ch.kind == "medication":
            entry_ids.add(ch.entry_id)
            medication_patients.add(ch.patient_id)
        elif ch.kind in PLANNED_KINDS:
            entry_ids.add(ch.entry_id)
    entry_ids |= _patient_entries(conn, expand_patients, medication_patients, now)
    moved = {ch.entry_id for ch in changes if ch.change == "moved"}
    return reconcile_entries(conn, config, entry_ids - removed, now, gone=removed, moved=moved,
                             record=record)


def _patient_entries(
    conn: Connection, everything: set[str], medication: set[str], now: datetime
) -> set[str]:
    """A patient's current entries (a new phone number or language re-plans them), and the
    medication orders of patients with a new dispense."""
    t = timeline_entries
    out: set[str] = set()
    for pids, kinds in ((sorted(everything), PLANNED_KINDS),
                        (sorted(medication - everything), ("medication",))):
        for start in range(0, len(pids), 1000):
            chunk = pids[start : start + 1000]
            rows = conn.execute(
                select(t.c.id).where(
                    one_of(conn, t.c.patient_id, chunk),
                    t.c.kind.in_(kinds),
                    or_(t.c.time >= now - _REPLAN_WINDOW, t.c.status == "active"),
                )
            )
            out.update(r.id for r in rows)
    return out


def reconcile_entries(
    conn: Connection,
    config: OutreachConfig,
    entry_ids: Iterable[str],
    now: datetime,
    *,
    gone: Iterable[str] = (),
    moved: Iterable[str] = (),
    record: Recorder | None = None,
) -> ReconcileResult:
    """Re-plan ``entry_ids`` and apply the difference in the caller's transaction."""
    ids = sorted(set(entry_ids))
    now = _utc(now)
    snap = load_snapshot(conn, config, ids, now)
    writer = _Writer(now)
    result = ReconcileResult(entries=len(ids))
    gone_ids = sorted(set(gone) | {i for i in ids if i not in snap.entries})
    moved_ids = set(moved)
    if gone_ids:
        _cancel_gone(conn, gone_ids, writer)
    for entry_id in ids:
        entry = snap.entries.get(entry_id)
        if entry is None:
            continue
        if entry_id in moved_ids:
            conn.execute(
                update(touches)
                .where(touches.c.entry_id == entry_id, touches.c.patient_id != entry.patient_id)
                .values(patient_id=entry.patient_id, updated_at=now)
            )
            for t in snap.stored.get(entry_id, {}).values():
                t.patient_id = entry.patient_id
        planned = snap.plan(config, entry_id, now)
        kept = _diff(config, snap, entry_id, planned, writer)
        snap.booked(entry.patient_id, entry_id, kept)
    writer.flush(conn, result)
    if record is not None and writer.skipped:
        skipped_ids = _ids_of(conn, writer.skipped)
        if skipped_ids:
            record(conn, skipped_ids, now)
    return result


def _ids_of(conn: Connection, keys: list[str]) -> list[int]:
    out: list[int] = []
    for start in range(0, len(keys), 1000):
        out.extend(r.id for r in conn.execute(
            select(touches.c.id).where(touches.c.key.in_(keys[start : start + 1000]),
                                       touches.c.status.in_(("skipped", "cancelled")))))
    return out


def _cancel_gone(conn: Connection, entry_ids: list[str], writer: _Writer) -> None:
    for start in range(0, len(entry_ids), 1000):
        rows = conn.execute(
            select(touches).where(touches.c.entry_id.in_(entry_ids[start : start + 1000]),
                                  touches.c.status == "scheduled")
        )
        for r in rows:
            writer.update(StoredTouch.from_row(r), status="cancelled",
                          reason="the entry is no longer on the timeline (joined into another)")


def _diff(
    config: OutreachConfig, snap: Snapshot, entry_id: str, planned: Plan, writer: _Writer
) -> dict[str, datetime]:
    """Schedule, move, cancel and skip; returns the entry's scheduled touches (key → due)."""
    entry = snap.entries[entry_id]
    existing = snap.stored.get(entry_id, {})
    kept: dict[str, datetime] = {}
    wanted: set[str] = set()
    for t in planned.touches:
        wanted.add(t.key)
        kept[t.key] = t.due_at
        row = existing.get(t.key)
        if row is None:
            writer.insert(_touch_row(t, writer.now))
        elif row.status == "scheduled":
            values = _changed(row, t)
            if values:
                writer.update(row, reason=_moved_reason(row, t), **values)
        elif row.status in ("cancelled", "skipped"):
            writer.update(row, status="scheduled", reason=t.moved and f"moved: {t.moved}",
                          **_fields(t))
        else:
            kept.pop(t.key)  # sending, sent or failed: never changed here
    for s in planned.skips:
        if s.key in wanted:
            continue
        wanted.add(s.key)
        reason = s.reason[:255]
        # A care plan that stopped has no activities: its skip (bare key) stands for the
        # touches of every activity (``key|activity:i:n``).
        rows = [existing[s.key]] if s.key in existing else [
            r for k, r in existing.items() if k.startswith(s.key + "|") and k not in wanted]
        if not rows:
            pathway = config.by_name.get(s.pathway)
            if pathway is not None and applies(pathway.on, entry):
                writer.insert(_skip_row(s, entry.patient_id, pathway.steps[s.step].template,
                                        writer.now))
                writer.skipped.append(s.key)
        for row in rows:
            wanted.add(row.key)
            if row.status == "scheduled":
                writer.update(row, status="cancelled", reason=reason)
                writer.skipped.append(row.key)
            elif row.status in ("cancelled", "skipped") and row.reason != reason:
                writer.update(row, reason=reason)
    for key, row in existing.items():
        if key not in wanted and row.status == "scheduled":
            writer.update(row, status="cancelled", reason="no longer planned (pathway changed)")
    return kept


def _utc(value: datetime) -> datetime:
    """Stored times are UTC: SQLite keeps a datetime's wall time and drops its zone."""
    return value.astimezone(UTC)


def _fields(t: Touch) -> dict[str, Any]:
    return {"due_at": _utc(t.due_at), "moment": _utc(t.moment), "channel": t.channel,
            "address": t.address, "language": t.language, "template": t.template}


def _changed(row: StoredTouch, t: Touch) -> dict[str, Any]:
    fields = _fields(t)
    return fields if any(getattr(row, k) != v for k, v in fields.items()) else {}


def _moved_reason(row: StoredTouch, t: Touch) -> str:
    if row.moment != t.moment:
        return "moved: the time it is relative to changed"
    if row.due_at != t.due_at:
        return f"moved: {t.moved}" if t.moved else "moved"
    return "channel or language changed"


def _touch_row(t: Touch, now: datetime) -> dict[str, Any]:
    return {
        "key": t.key, "pathway": t.pathway, "step": t.step, "entry_id": t.entry_id,
        "patient_id": t.patient_id, "status": "scheduled",
        "reason": f"moved: {t.moved}" if t.moved else None, "attempts": 0, "sent_at": None,
        "provider_ref": None, "created_at": now, "updated_at": now, **_fields(t),
    }


def _skip_row(s: Skip, patient_id: str, template: str, now: datetime) -> dict[str, Any]:
    return {
        "key": s.key, "pathway": s.pathway, "step": s.step, "entry_id": s.entry_id,
        "patient_id": patient_id, "due_at": None, "moment": None, "channel": "",
        "address": "", "language": "", "template": template, "status": "skipped",
        "reason": s.reason[:255], "attempts": 0, "sent_at": None, "provider_ref": None,
        "created_at": now, "updated_at": now,
    }


_COLUMNS = ("status", "reason", "due_at", "moment", "channel", "address", "language",
            "template")

_UPDATE = (
    update(touches)
    .where(touches.c.id == bindparam("t_id"), touches.c.status == bindparam("t_expected"))
    .values({**{c: bindparam(f"v_{c}") for c in _COLUMNS},
             "updated_at": bindparam("v_updated_at")})
)


@dataclass
class _Writer:
    """Collects the batch's inserts and guarded updates; one executemany each."""

    now: datetime
    inserts: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    """Keys of touches skipped (or held back) for a reason the planner gave: written back."""

    def insert(self, row: dict[str, Any]) -> None:
        self.inserts.append(row)
        bucket = "scheduled" if row["status"] == "scheduled" else "skipped"
        self.counts[bucket] = self.counts.get(bucket, 0) + 1

    def update(self, row: StoredTouch, **values: Any) -> None:
        new = {c: values.get(c, getattr(row, c)) for c in _COLUMNS}
        if "reason" in values:
            new["reason"] = values["reason"][:255] if values["reason"] else None
        self.updates.append({"t_id": row.id, "t_expected": row.status, "v_updated_at": self.now,
                             **{f"v_{c}": v for c, v in new.items()}})
        bucket = {"cancelled": "cancelled", "scheduled": "moved", "skipped": "skipped"}.get(
            new["status"], "moved")
        if row.status != "scheduled" and new["status"] == "scheduled":
            bucket = "scheduled"
        self.counts[bucket] = self.counts.get(bucket, 0) + 1

    def flush(self, conn: Connection, result: ReconcileResult) -> None:
        if self.inserts:
            stmt = dialect_insert(conn, touches).on_conflict_do_nothing(index_elements=["key"])
            conn.execute(stmt, self.inserts)
        if self.updates:
            conn.execute(_UPDATE, self.updates)
        for name, n in self.counts.items():
            setattr(result, name, getattr(result, name) + n)


def counts(conn: Connection, patient_id: str | None = None) -> Mapping[str, int]:
    """Touches by status (for tests and the preview)."""
    query = select(touches.c.status)
    if patient_id:
        query = query.where(touches.c.patient_id == patient_id)
    out: dict[str, int] = {}
    for (status,) in conn.execute(query):
        out[status] = out.get(status, 0) + 1
    return out
